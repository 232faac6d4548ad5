"""Sans-IO decoders: bytes in, events out. A proxy forwards the raw bytes it was fed and uses
these events only for framing and observation.
"""

from __future__ import annotations

import struct

from .errors import RemoteProtocolError
from .messages import (
    CANCEL_REQUEST_CODE,
    DEFAULT_MAX_MESSAGE,
    F_BIND,
    F_CLOSE,
    F_COPY_DATA,
    F_COPY_DONE,
    F_COPY_FAIL,
    F_DESCRIBE,
    F_EXECUTE,
    F_FLUSH,
    F_FUNCTION_CALL,
    F_PARSE,
    F_PASSWORD,
    F_QUERY,
    F_SYNC,
    F_TERMINATE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET,
    MIN_MESSAGE_LEN,
    SSL_REQUEST_CODE,
    CancelRequest,
    DecoderState,
    FrontendEvent,
    GSSENCRequest,
    Message,
    SSLRequest,
    StartupMessage,
)

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_HEADER = struct.Struct("!BI")  # type byte + length
_STARTUP_HEAD = struct.Struct("!iI")  # length, then protocol version or request code

#: Every message type a client may send after startup (protocol 3.0).
FRONTEND_MESSAGE_TYPES = frozenset(
    {
        F_BIND,
        F_CLOSE,
        F_COPY_DATA,
        F_COPY_DONE,
        F_COPY_FAIL,
        F_DESCRIBE,
        F_EXECUTE,
        F_FLUSH,
        F_FUNCTION_CALL,
        F_PARSE,
        F_PASSWORD,
        F_QUERY,
        F_SYNC,
        F_TERMINATE,
    }
)


class MessageDecoder:
    """Frames typed messages (1 type byte + int32 length that counts itself).

    ``allowed_types`` (if given) rejects any other type byte; ``skip_bodies`` names bulky types
    whose bodies are not copied out unless ``feed(..., full=True)`` asks for them.
    """

    def __init__(
        self,
        *,
        max_message_len: int = DEFAULT_MAX_MESSAGE,
        allowed_types: frozenset[int] | None = None,
        skip_bodies: frozenset[int] = frozenset(),
    ) -> None:
        self.max_message_len = max_message_len
        self._allowed = allowed_types
        self._skip = skip_bodies
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes, *, full: bool = False) -> list[Message]:
        return self.feed_framed(data, full=full)[0]

    def feed_framed(self, data: bytes, *, full: bool = False) -> tuple[list[Message], bytes]:
        """Complete messages, and the exact raw bytes they came from (never a partial one).

        A proxy forwards those bytes as they are; a message cut across reads is forwarded once
        it is complete, so raw forwarding and re-encoding can be mixed freely.
        """
        had_buffer = bool(self._buf)
        if had_buffer:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        out: list[Message] = []
        pos = 0
        n = len(buf)
        allowed = self._allowed
        skip = frozenset() if full else self._skip
        limit = self.max_message_len
        while n - pos >= 5:
            mtype, length = _HEADER.unpack_from(buf, pos)
            if allowed is not None and mtype not in allowed:
                raise RemoteProtocolError(f"invalid message type 0x{mtype:02x}")
            if length < MIN_MESSAGE_LEN:
                raise RemoteProtocolError(f"invalid message length {length}")
            if length - 4 > limit:
                raise RemoteProtocolError(
                    f"message of {length - 4} bytes exceeds the limit of {limit} bytes"
                )
            end = pos + 1 + length
            if end > n:
                break
            if mtype in skip:
                out.append(Message(mtype, b"", length - 4))
            else:
                out.append(Message(mtype, bytes(buf[pos + 5 : end]), length - 4))
            pos = end
        if pos == n:
            raw = data if not had_buffer else bytes(buf)
            self._buf = bytearray()
        else:
            raw = bytes(buf[:pos])
            self._buf = bytearray(buf[pos:])
        return out, raw

    def feed_eof(self) -> None:
        if self._buf:
            raise RemoteProtocolError("connection closed in the middle of a message")


class FrontendDecoder:
    """Client side: STARTUP (untyped packets) -> MESSAGES (typed) -> CLOSED.

    ``strict_negotiation``: bytes that arrive in the same ``feed()`` as an SSLRequest or
    GSSENCRequest, i.e. before the one-byte answer could have reached the client, are a
    protocol violation, as in PostgreSQL since CVE-2021-23214: they were sent in clear
    and may have been injected by a man in the middle.
    """

    def __init__(
        self,
        *,
        max_startup_len: int = MAX_STARTUP_PACKET,
        max_message_len: int = DEFAULT_MAX_MESSAGE,
        strict_negotiation: bool = False,
    ) -> None:
        self._max_startup = max_startup_len
        self._strict_negotiation = strict_negotiation
        self._state = DecoderState.STARTUP
        self._startup_buf = bytearray()
        self._messages = MessageDecoder(
            max_message_len=max_message_len, allowed_types=FRONTEND_MESSAGE_TYPES
        )

    @property
    def state(self) -> DecoderState:
        return self._state

    @property
    def max_message_len(self) -> int:
        return self._messages.max_message_len

    @max_message_len.setter
    def max_message_len(self, value: int) -> None:
        self._messages.max_message_len = value

    @property
    def buffered(self) -> int:
        """Bytes held of a startup packet or message that is not complete yet."""
        return len(self._startup_buf) + self._messages.buffered

    def feed(self, data: bytes) -> list[FrontendEvent]:
        if self._state is DecoderState.MESSAGES:
            return list(self._feed_messages(data))
        if self._state is DecoderState.CLOSED:
            if data:
                raise RemoteProtocolError("data after the end of the connection")
            return []
        if not self._startup_buf and len(data) >= 8:
            # the usual case: one whole packet per read, parsed without copying it in
            (length,) = _INT32.unpack_from(data, 0)
            if length == len(data) and length <= self._max_startup:
                return [self._startup_event(data[4:])]
        self._startup_buf += data
        events: list[FrontendEvent] = []
        while self._state is DecoderState.STARTUP and len(self._startup_buf) >= 4:
            (length,) = _INT32.unpack_from(self._startup_buf, 0)
            if length < 8 or length > self._max_startup:
                raise RemoteProtocolError(f"invalid startup packet length {length}")
            if len(self._startup_buf) < length:
                break
            packet = bytes(self._startup_buf[4:length])
            del self._startup_buf[:length]
            event = self._startup_event(packet)
            if self._strict_negotiation and self._startup_buf:
                if isinstance(event, SSLRequest):
                    raise RemoteProtocolError("received unencrypted data after SSL request")
                if isinstance(event, GSSENCRequest):
                    raise RemoteProtocolError(
                        "received unencrypted data after GSSAPI encryption request"
                    )
            events.append(event)
        if self.state is DecoderState.MESSAGES and self._startup_buf:
            rest = bytes(self._startup_buf)
            self._startup_buf.clear()
            events.extend(self._feed_messages(rest))
        elif self.state is DecoderState.CLOSED and self._startup_buf:
            raise RemoteProtocolError("data after the end of the connection")
        return events

    def feed_startup(self, data: bytes) -> StartupMessage | None:
        """``data`` as exactly one whole protocol 3.x StartupMessage while nothing is buffered
        (a client's usual read after its SSLRequest was answered): the event, with the state
        moved on as ``feed()`` moves it. None for anything else: nothing was consumed, and
        ``feed()`` takes the read (and raises if it is invalid)."""
        if self._state is not DecoderState.STARTUP or self._startup_buf or len(data) < 8:
            return None
        length, code = _STARTUP_HEAD.unpack_from(data, 0)
        if length != len(data) or length > self._max_startup or code >> 16 != 3:
            return None
        return self._startup_message(code, data[8:])

    def feed_messages(self, data: bytes) -> tuple[list[Message], bytes]:
        """Fast path once startup is over: complete messages and their raw bytes."""
        if self._state is not DecoderState.MESSAGES:
            msgs = [m for m in self.feed(data) if isinstance(m, Message)]
            return msgs, b"".join(m.raw for m in msgs)
        msgs, raw = self._messages.feed_framed(data)
        self._check_terminate(msgs)
        return msgs, raw

    def _feed_messages(self, data: bytes) -> list[Message]:
        msgs = self._messages.feed(data)
        self._check_terminate(msgs)
        return msgs

    def _check_terminate(self, msgs: list[Message]) -> None:
        if msgs and (msgs[-1].type == F_TERMINATE or any(m.type == F_TERMINATE for m in msgs)):
            for i, m in enumerate(msgs):
                if m.type == F_TERMINATE:
                    self._state = DecoderState.CLOSED
                    if i != len(msgs) - 1 or self._messages.buffered:
                        raise RemoteProtocolError("data after Terminate")

    def feed_eof(self) -> None:
        if self._startup_buf:
            raise RemoteProtocolError("connection closed in the middle of a startup packet")
        self._messages.feed_eof()

    def _startup_event(self, packet: bytes) -> FrontendEvent:
        (code,) = _UINT32.unpack_from(packet, 0)
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            if len(packet) != 4:
                raise RemoteProtocolError("invalid length of SSL/GSSENC request")
            return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
        if code == CANCEL_REQUEST_CODE:
            if len(packet) != 12:
                raise RemoteProtocolError("invalid length of cancel request")
            pid, key = struct.unpack_from("!ii", packet, 4)
            self._state = DecoderState.CLOSED
            return CancelRequest(pid, key)
        major = code >> 16
        if major != 3:
            raise RemoteProtocolError(
                f"unsupported frontend protocol {major}.{code & 0xFFFF}", sqlstate="0A000"
            )
        return self._startup_message(code, packet[4:])

    def _startup_message(self, code: int, payload: bytes) -> StartupMessage:
        """A protocol 3.x StartupMessage's parameters (``payload``): the event, and the state
        moves on to typed messages."""
        params = parse_startup_parameters(payload)
        if "user" not in params:
            raise RemoteProtocolError("no PostgreSQL user name specified in startup packet")
        self._state = DecoderState.MESSAGES
        return StartupMessage(code, params)


class BackendDecoder(MessageDecoder):
    """Server side: typed messages only (we never send SSLRequest to servers)."""


def parse_startup_parameters(payload: bytes) -> dict[str, str]:
    """``name NUL value NUL ... NUL``: pairs of C strings ended by an empty name."""
    if not payload or payload[-1] != 0:
        raise RemoteProtocolError("startup parameters are not NUL-terminated")
    body = payload[:-1]
    if not body:
        return {}
    if body[-1] != 0:
        raise RemoteProtocolError("startup parameter without a value")
    # decoded whole, then split: NUL never occurs inside a UTF-8 sequence (one decode per
    # login, not one per name and value)
    parts = _text(body[:-1]).split("\x00")
    if len(parts) % 2:
        raise RemoteProtocolError("startup parameter without a value")
    names = parts[0::2]
    if "" in names:
        raise RemoteProtocolError("empty startup parameter name")
    return dict(zip(names, parts[1::2], strict=True))


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("invalid UTF-8 in a protocol string") from exc


def read_cstring(body: bytes, pos: int = 0) -> tuple[str, int]:
    """Read a NUL-terminated string at ``pos``; return it and the position after the NUL."""
    end = body.find(b"\x00", pos)
    if end < 0:
        raise RemoteProtocolError("missing NUL terminator")
    return _text(body[pos:end]), end + 1


def read_cstring_bytes(body: bytes, pos: int = 0) -> tuple[bytes, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise RemoteProtocolError("missing NUL terminator")
    return body[pos:end], end + 1


def parse_query(body: bytes) -> str:
    text, _ = read_cstring(body)
    return text


def parse_parse(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Parse: statement name, query text, and the raw remainder (parameter type oids)."""
    name, pos = read_cstring_bytes(body)
    query, pos = read_cstring_bytes(body, pos)
    rest = body[pos:]
    if len(rest) < 2:
        raise RemoteProtocolError("truncated Parse message")
    (count,) = struct.unpack_from("!h", rest, 0)
    if count < 0 or len(rest) != 2 + 4 * count:
        raise RemoteProtocolError("bad parameter type count in Parse")
    return name, query, rest


def parse_bind(body: bytes) -> tuple[bytes, bytes, int]:
    """Bind: portal name, statement name and the offset where the rest starts."""
    portal, pos = read_cstring_bytes(body)
    statement, pos = read_cstring_bytes(body, pos)
    return portal, statement, pos


def parse_describe_or_close(body: bytes) -> tuple[int, bytes]:
    """Describe/Close: kind (ord 'S' or 'P') and name."""
    if len(body) < 2 or body[0] not in (ord("S"), ord("P")):
        raise RemoteProtocolError("bad Describe/Close target")
    name, pos = read_cstring_bytes(body, 1)
    if pos != len(body):
        raise RemoteProtocolError("trailing bytes in Describe/Close")
    return body[0], name


def parse_data_row(body: bytes) -> list[bytes | None]:
    """DataRow: the column values (None for NULL), as sent (text or binary)."""
    if len(body) < 2:
        raise RemoteProtocolError("truncated DataRow")
    (count,) = struct.unpack_from("!h", body, 0)
    if count < 0:
        raise RemoteProtocolError("negative DataRow column count")
    values: list[bytes | None] = []
    pos = 2
    for _ in range(count):
        if pos + 4 > len(body):
            raise RemoteProtocolError("truncated DataRow")
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length == -1:
            values.append(None)
            continue
        if length < 0 or pos + length > len(body):
            raise RemoteProtocolError("bad DataRow value length")
        values.append(body[pos : pos + length])
        pos += length
    if pos != len(body):
        raise RemoteProtocolError("trailing bytes after DataRow values")
    return values


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields: code letter -> value."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstring(body, pos + 1)
        fields[code] = value
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body)
    value, _ = read_cstring(body, pos)
    return name, value


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise RemoteProtocolError("bad BackendKeyData length")
    pid, key = struct.unpack("!ii", body)
    return pid, key


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise RemoteProtocolError("truncated Authentication message")
    (code,) = _INT32.unpack_from(body, 0)
    return code, body[4:]


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    mechs: list[str] = []
    pos = 0
    while pos < len(data) and data[pos] != 0:
        mech, pos = read_cstring(data, pos)
        mechs.append(mech)
    return mechs


def parse_ready_for_query(body: bytes) -> int:
    if len(body) != 1 or body[0] not in b"ITE":
        raise RemoteProtocolError("bad ReadyForQuery status")
    return body[0]


def parse_password(body: bytes) -> str:
    text, pos = read_cstring(body)
    if pos != len(body):
        raise RemoteProtocolError("trailing bytes in PasswordMessage")
    return text


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mech, pos = read_cstring(body)
    if len(body) - pos < 4:
        raise RemoteProtocolError("truncated SASLInitialResponse")
    (length,) = _INT32.unpack_from(body, pos)
    data = body[pos + 4 :]
    if length == -1:
        return mech, b""
    if length != len(data):
        raise RemoteProtocolError("bad SASLInitialResponse length")
    return mech, data
