"""Classify a connection by its first client bytes (sans-IO, like sslh / mitmproxy's next_layer).

API (stable; the NLB calls it on every connection):

``classify(buf, *, final=False) -> NeedMore | Match | Unknown``

- ``NEED_MORE``: ``buf`` is a prefix of something we recognise and the details are not complete
  yet; read more and call again with the whole buffer (never more than ``MAX_SNIFF_BYTES``).
- ``Match(protocol, details)``: ``protocol`` is a ``SniffedProtocol`` (a ``str`` enum whose value,
  upper-cased and prefixed with ``PROTOCOL_``, is the ``marchproxy.v1.Protocol`` name:
  ``SniffedProtocol.POSTGRESQL`` → ``PROTOCOL_POSTGRESQL``); ``details`` is the per-protocol
  dataclass (``TlsDetails``, ``HttpDetails``, ``Http2Details``, ``PostgresDetails``,
  ``RtmpDetails``, ``RedisDetails``).
- ``UNKNOWN``: not a protocol we recognise (route by the listener default).

``final=True`` means no more bytes will come in time (sniff deadline or EOF): instead of
``NEED_MORE`` it returns the best ``Match`` the bytes allow (e.g. HTTP/1 without a Host) or
``UNKNOWN``. A buffer of ``MAX_SNIFF_BYTES`` or more is always treated as final.

Property (tested): for any prefix of a valid opening, ``classify(prefix)`` is ``NEED_MORE`` or the
same ``Match`` as the whole opening. ``classify`` never raises (``SniffError`` is internal and is
turned into ``UNKNOWN``/a detail-less ``Match``).

Checks, dispatched on the first byte: TLS record 0x16 0x03 (ClientHello SNI + ALPN, reassembled
across records), PostgreSQL (int32 length then SSLRequest/GSSENCRequest/CancelRequest codes or
protocol 3.x StartupMessage), RTMP (C0 0x03, or 0x06 for RTMPE, plus the first 8 bytes of C1),
Redis (``*<n>\\r\\n`` arrays, a few inline commands), the HTTP/2 prior-knowledge preface, and
HTTP/1.x (an upper-case method token + SP; Host from the complete header block).
MySQL cannot be sniffed: the server speaks first.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HTTP2_PREFACE",
    "MAX_SNIFF_BYTES",
    "NEED_MORE",
    "UNKNOWN",
    "Details",
    "Http2Details",
    "HttpDetails",
    "Match",
    "NeedMore",
    "PostgresDetails",
    "RedisDetails",
    "RtmpDetails",
    "SniffError",
    "SniffedProtocol",
    "TlsDetails",
    "Unknown",
    "Verdict",
    "classify",
]

_HEAD_END: Final = re.compile(rb"\n\r?\n")  # end of an HTTP/1 header block
MAX_SNIFF_BYTES: Final = 16384  # give up waiting for details past this many bytes
HTTP2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
MAX_HTTP_METHOD_LEN: Final = 24  # longest registered methods are ~17 chars
MAX_TLS_RECORD_LEN: Final = 16384 + 2048  # RFC 8446 §5.2 (TLSCiphertext upper bound)
PG_SSL_REQUEST: Final = 80877103  # PostgreSQL protocol docs, "Message Formats"
PG_GSSENC_REQUEST: Final = 80877104
PG_CANCEL_REQUEST: Final = 80877102
PG_MAX_STARTUP_PACKET: Final = 10000  # postgres MAX_STARTUP_PACKET_LENGTH
PG_MAX_CANCEL_PACKET: Final = 264  # 3.2 allows cancel keys up to 256 bytes
RTMP_C1_PEEK: Final = 8  # C1 time (4) + zero/version (4) bytes we want before deciding
MAX_REDIS_ARRAY_LEN: Final = 1024 * 1024  # redis proto-max-multibulk default
MAX_REDIS_COMMAND_LEN: Final = 64  # longest command names are ~20 chars
REDIS_INLINE_COMMANDS: Final = frozenset(
    {b"PING", b"AUTH", b"HELLO", b"ECHO", b"INFO", b"QUIT", b"SELECT", b"COMMAND"}
)


class SniffError(Exception):
    """Internal: the bytes are malformed for the protocol they started like."""


class SniffedProtocol(enum.StrEnum):
    TLS = "tls"
    HTTP = "http"
    HTTP2 = "http2"
    POSTGRESQL = "postgresql"
    RTMP = "rtmp"
    REDIS = "redis"


@dataclass(frozen=True, slots=True)
class TlsDetails:
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    client_hello: bool = False  # False: the ClientHello was incomplete, too large or malformed


@dataclass(frozen=True, slots=True)
class HttpDetails:
    method: str
    target: str | None = None  # request-target as sent (path, absolute URI or authority)
    version: str | None = None  # "HTTP/1.1"
    host: str | None = None  # Host header, else the authority of an absolute-form target


@dataclass(frozen=True, slots=True)
class Http2Details:
    prior_knowledge: bool = True


@dataclass(frozen=True, slots=True)
class PostgresDetails:
    kind: str  # "startup" | "ssl_request" | "gssenc_request" | "cancel_request"
    user: str | None = None
    database: str | None = None  # defaults to user, as the server does
    protocol_version: tuple[int, int] | None = None
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RtmpDetails:
    encrypted: bool = False  # C0 0x06 (RTMPE)


@dataclass(frozen=True, slots=True)
class RedisDetails:
    command: str | None = None  # upper-cased first word, when it was complete


Details = TlsDetails | HttpDetails | Http2Details | PostgresDetails | RtmpDetails | RedisDetails


@dataclass(frozen=True, slots=True)
class NeedMore:
    pass


@dataclass(frozen=True, slots=True)
class Unknown:
    pass


@dataclass(frozen=True, slots=True)
class Match:
    protocol: SniffedProtocol
    details: Details


Verdict = NeedMore | Match | Unknown
NEED_MORE: Final = NeedMore()
UNKNOWN: Final = Unknown()


def classify(buf: bytes | bytearray | memoryview, *, final: bool = False) -> Verdict:
    """Classify the first bytes of a client connection. Never raises."""
    data = bytes(buf[:MAX_SNIFF_BYTES])
    if len(data) >= MAX_SNIFF_BYTES:
        final = True
    if not data:
        return UNKNOWN if final else NEED_MORE
    first = data[0]
    try:
        if first == 0x16:
            return _tls(data, final)
        if first == 0x00:
            return _postgres(data, final)
        if first in (0x03, 0x06):
            return _rtmp(data, final)
        if first == 0x2A:  # '*'
            return _redis_array(data, final)
        if 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A:  # ASCII letter
            return _text(data, final)
    except SniffError:
        return UNKNOWN
    return UNKNOWN


# ------------------------------------------------------------------------------ TLS


def _tls(data: bytes, final: bool) -> Verdict:
    if len(data) >= 2 and data[1] != 0x03:
        return UNKNOWN
    if len(data) < 3:
        return UNKNOWN if final else NEED_MORE
    if data[2] > 0x04:
        return UNKNOWN
    handshake, pos, ok = _tls_handshake_bytes(data)
    if handshake and handshake[0] != 0x01:  # not a ClientHello
        return _tls_giveup(pos)
    if len(handshake) >= 4:
        need = 4 + int.from_bytes(handshake[1:4], "big")
        if need > MAX_SNIFF_BYTES:
            return Match(SniffedProtocol.TLS, TlsDetails())
        if len(handshake) >= need:
            try:
                sni, alpn = _parse_client_hello(bytes(handshake[4:need]))
            except SniffError:
                return Match(SniffedProtocol.TLS, TlsDetails())
            return Match(SniffedProtocol.TLS, TlsDetails(sni, alpn, True))
    if not ok:  # a later record is not a handshake record
        return _tls_giveup(pos)
    if final:
        return Match(SniffedProtocol.TLS, TlsDetails())
    return NEED_MORE


def _tls_handshake_bytes(data: bytes) -> tuple[bytes, int, bool]:
    """Concatenate handshake fragments of complete records (RFC 8446 §5.1), then a partial one.

    Returns (handshake bytes, offset after the last complete record, records well-formed).
    A ClientHello larger than one record is only usable once all its records are complete, but
    handshake bytes of a partial last record still count for the header and length checks.
    """
    handshake = bytearray()
    pos = 0
    while len(data) - pos >= 5:
        ctype, major, _minor, rlen = struct.unpack_from("!BBBH", data, pos)
        if ctype != 0x16 or major != 0x03 or rlen == 0 or rlen > MAX_TLS_RECORD_LEN:
            return bytes(handshake), pos, False
        if len(data) - pos - 5 < rlen:
            return bytes(handshake + data[pos + 5 :]), pos, True
        handshake += data[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
    return bytes(handshake), pos, True


def _tls_giveup(pos: int) -> Verdict:
    # The first record was a TLS handshake header; later bytes are odd: still TLS.
    return Match(SniffedProtocol.TLS, TlsDetails()) if pos > 0 else UNKNOWN


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SniffError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> bool:
        return self.pos >= len(self.data)


def _parse_client_hello(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    """RFC 8446 §4.1.2 ClientHello; SNI (RFC 6066 §3), ALPN (RFC 7301 §3.1)."""
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vec8()  # legacy_session_id
    r.vec16()  # cipher_suites
    r.vec8()  # legacy_compression_methods
    if r.done():
        return None, ()
    exts = _Reader(r.vec16())
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    while not exts.done():
        etype = exts.u16()
        ext = _Reader(exts.vec16())
        if etype == 0:  # server_name
            names = _Reader(ext.vec16())
            while not names.done():
                ntype = names.u8()
                name = names.vec16()
                if ntype == 0 and sni is None:
                    try:
                        sni = name.decode("ascii").lower().rstrip(".")
                    except UnicodeDecodeError as exc:
                        raise SniffError("non-ascii SNI") from exc
        elif etype == 16:  # application_layer_protocol_negotiation
            protos = _Reader(ext.vec16())
            found: list[str] = []
            while not protos.done():
                found.append(protos.vec8().decode("latin-1"))
            alpn = tuple(found)
    return sni, alpn


# ------------------------------------------------------------------------- Postgres


def _postgres(data: bytes, final: bool) -> Verdict:
    if len(data) < 8:
        if len(data) >= 4:
            length = int.from_bytes(data[:4], "big")
            if not 8 <= length <= PG_MAX_STARTUP_PACKET:
                return UNKNOWN
        return UNKNOWN if final else NEED_MORE
    length, code = struct.unpack_from("!II", data, 0)
    if not 8 <= length <= PG_MAX_STARTUP_PACKET:
        return UNKNOWN
    if code == PG_SSL_REQUEST and length == 8:
        return Match(SniffedProtocol.POSTGRESQL, PostgresDetails("ssl_request"))
    if code == PG_GSSENC_REQUEST and length == 8:
        return Match(SniffedProtocol.POSTGRESQL, PostgresDetails("gssenc_request"))
    if code == PG_CANCEL_REQUEST and 12 <= length <= PG_MAX_CANCEL_PACKET:
        return Match(SniffedProtocol.POSTGRESQL, PostgresDetails("cancel_request"))
    if code >> 16 != 3:
        return UNKNOWN
    version = (code >> 16, code & 0xFFFF)
    if len(data) < length:
        if final:
            return Match(SniffedProtocol.POSTGRESQL, PostgresDetails("startup"))
        return NEED_MORE
    params = _pg_params(data[8:length])
    if params is None:
        return Match(SniffedProtocol.POSTGRESQL, PostgresDetails("startup"))
    d = dict(params)
    user = d.get("user")
    database = d.get("database") or user
    return Match(
        SniffedProtocol.POSTGRESQL,
        PostgresDetails("startup", user, database, version, tuple(params)),
    )


def _pg_params(raw: bytes) -> list[tuple[str, str]] | None:
    """``name\\0value\\0 ... \\0``; None if malformed."""
    if not raw.endswith(b"\x00"):
        return None
    body = raw[:-1]
    if not body:
        return []
    if not body.endswith(b"\x00"):
        return None
    parts = body[:-1].split(b"\x00")
    if len(parts) % 2:
        return None
    try:
        texts = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError:
        return None
    return list(zip(texts[0::2], texts[1::2], strict=True))


# ----------------------------------------------------------------------------- RTMP


def _rtmp(data: bytes, final: bool) -> Verdict:
    if len(data) < 1 + RTMP_C1_PEEK and not final:
        return NEED_MORE
    return Match(SniffedProtocol.RTMP, RtmpDetails(encrypted=data[0] == 0x06))


# ---------------------------------------------------------------------------- Redis


def _read_int_line(data: bytes, pos: int, limit: int) -> tuple[int, int] | None:
    """Parse ``<digits>\\r\\n`` at ``pos``; None if incomplete. Raises SniffError if malformed."""
    end = data.find(b"\r\n", pos, pos + 22)
    if end < 0:
        chunk = data[pos : pos + 22]
        body = chunk[:-1] if chunk.endswith(b"\r") else chunk
        if len(chunk) >= 22 or (body and not body.isdigit()):
            raise SniffError("bad RESP integer")
        return None
    digits = data[pos:end]
    if not digits.isdigit() or int(digits) > limit:
        raise SniffError("bad RESP integer")
    return int(digits), end + 2


def _redis_array(data: bytes, final: bool) -> Verdict:
    head = _read_int_line(data, 1, MAX_REDIS_ARRAY_LEN)
    if head is None:
        if final and len(data) > 1 and data[1:2].isdigit():
            return Match(SniffedProtocol.REDIS, RedisDetails())
        return UNKNOWN if final else NEED_MORE
    count, pos = head
    if count == 0:
        return Match(SniffedProtocol.REDIS, RedisDetails())
    if len(data) <= pos:
        return Match(SniffedProtocol.REDIS, RedisDetails()) if final else NEED_MORE
    if data[pos] != 0x24:  # '$'
        raise SniffError("RESP command is not a bulk string")
    bulk = _read_int_line(data, pos + 1, MAX_REDIS_COMMAND_LEN)
    if bulk is None:
        return Match(SniffedProtocol.REDIS, RedisDetails()) if final else NEED_MORE
    n, pos = bulk
    if len(data) < pos + n + 2:
        return Match(SniffedProtocol.REDIS, RedisDetails()) if final else NEED_MORE
    if data[pos + n : pos + n + 2] != b"\r\n":
        raise SniffError("RESP bulk string not terminated")
    name = data[pos : pos + n].decode("latin-1").upper()
    return Match(SniffedProtocol.REDIS, RedisDetails(name))


# --------------------------------------------------------------- HTTP/1, HTTP/2, inline


def _text(data: bytes, final: bool) -> Verdict:
    if HTTP2_PREFACE.startswith(data[: len(HTTP2_PREFACE)]):
        if len(data) >= len(HTTP2_PREFACE) or (final and len(data) >= 4):
            return Match(SniffedProtocol.HTTP2, Http2Details())
        if not final:
            return NEED_MORE
    # method token (mitmproxy-style: letters, then SP); upper case for HTTP
    i = 0
    limit = min(len(data), MAX_HTTP_METHOD_LEN + 1)
    while i < limit and (0x41 <= data[i] <= 0x5A or data[i] in b"-_"):
        i += 1
    if i < len(data) and data[i] == 0x20 and i > 0:
        return _http1(data, data[:i].decode("ascii"), final)
    if i == len(data) and i <= MAX_HTTP_METHOD_LEN:
        # still inside the first word
        if final:
            return _redis_inline(data, final=True)
        return NEED_MORE
    return _redis_inline(data, final)


def _redis_inline(data: bytes, final: bool) -> Verdict:
    window = data[: MAX_REDIS_COMMAND_LEN + 2]
    end = window.find(b"\n")  # redis accepts inline commands ending in LF alone
    line = window if end < 0 else window[:end].rstrip(b"\r")
    sp = line.find(b" ")
    if sp >= 0:
        word, complete = line[:sp], True
    elif end >= 0:
        word, complete = line, True
    elif line.endswith(b"\r"):
        word, complete = line[:-1], True
    else:
        word, complete = line, final
    if not word or len(word) > MAX_REDIS_COMMAND_LEN:
        return UNKNOWN
    upper = word.upper()
    if not complete:
        return NEED_MORE if any(c.startswith(upper) for c in _INLINE) else UNKNOWN
    if upper in REDIS_INLINE_COMMANDS:
        if end < 0 and not final:
            return NEED_MORE
        return Match(SniffedProtocol.REDIS, RedisDetails(upper.decode("ascii")))
    return UNKNOWN


_INLINE: Final = tuple(REDIS_INLINE_COMMANDS)


def _http1(data: bytes, method: str, final: bool) -> Verdict:
    # lines end in CRLF; a bare LF is tolerated as llhttp's lenient mode and nginx do
    line_end = data.find(b"\n")
    if line_end < 0:
        if final:
            return Match(SniffedProtocol.HTTP, HttpDetails(method))
        return NEED_MORE
    parts = data[:line_end].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        # not an HTTP/1 request line: maybe an inline Redis command ("SET k v")
        return _redis_inline(data, final)
    target = parts[1].decode("latin-1")
    version = parts[2].decode("latin-1")
    end = _HEAD_END.search(data, line_end)
    if end is None:
        if final:
            return Match(SniffedProtocol.HTTP, HttpDetails(method, target, version))
        return NEED_MORE
    host: str | None = None
    for line in data[line_end + 1 : end.start()].split(b"\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            break
    if host is None and "://" in target:
        host = target.split("://", 1)[1].split("/", 1)[0] or None
    elif host is None and method == "CONNECT":
        host = target
    return Match(SniffedProtocol.HTTP, HttpDetails(method, target, version, host))
