"""RTMP chunk stream (RTMP spec 1.0 sections 5.3-5.4), sans-IO.

A message is split into chunks of at most ``chunk_size`` payload bytes. Every chunk starts with a
basic header (fmt + chunk stream id in 1, 2 or 3 bytes) and a message header of 11/7/3/0 bytes
for fmt 0/1/2/3. fmt 1-3 compress against the previous header *of the same chunk stream*, so the
decoder keeps per-csid state, and chunks of different csids interleave. A timestamp field of
0xFFFFFF means a 4-byte extended timestamp follows (also repeated on fmt 3 continuation chunks, as
ffmpeg, librtmp and nginx-rtmp do). Protocol control messages (types 1-6) update decoder state and
are still emitted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from marchproxy_common.wire.rtmp.errors import RtmpProtocolError

DEFAULT_CHUNK_SIZE = 128  # RTMP spec 5.4.1: initial chunk size in both directions
MAX_CHUNK_SIZE = 0x7FFFFFFF  # RTMP spec 5.4.1: 31 bits
#: we refuse larger inbound chunk sizes: each chunk is buffered whole before it is consumed
MAX_ACCEPTED_CHUNK_SIZE = 1 << 20
#: largest single message we reassemble (video keyframes of 1080p are well below this)
MAX_MESSAGE_SIZE = 8 << 20
#: how many distinct chunk streams one peer may open (csid range is 2..65599)
MAX_CHUNK_STREAMS = 64
#: bytes of unfinished messages held across all chunk streams at once
MAX_PENDING_BYTES = 32 << 20
EXTENDED_TIMESTAMP = 0xFFFFFF  # RTMP spec 5.3.1.3
MAX_CSID = 65599  # RTMP spec 5.3.1.1: 3-byte basic header

# Message type ids (RTMP spec 5.4 and 7.1)
MSG_SET_CHUNK_SIZE = 1
MSG_ABORT = 2
MSG_ACK = 3
MSG_USER_CONTROL = 4
MSG_WINDOW_ACK_SIZE = 5
MSG_SET_PEER_BANDWIDTH = 6
MSG_AUDIO = 8
MSG_VIDEO = 9
MSG_DATA_AMF3 = 15
MSG_SHARED_OBJECT_AMF3 = 16
MSG_COMMAND_AMF3 = 17
MSG_DATA_AMF0 = 18
MSG_SHARED_OBJECT_AMF0 = 19
MSG_COMMAND_AMF0 = 20
MSG_AGGREGATE = 22

_MESSAGE_HEADER_SIZE = (11, 7, 3, 0)
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class MessageReceived:
    csid: int
    type_id: int
    stream_id: int
    timestamp: int
    payload: bytes


class _ChunkStreamState:
    __slots__ = ("delta", "extended", "length", "parts", "received", "stream_id", "timestamp",
                 "type_id")  # fmt: skip

    def __init__(self) -> None:
        self.timestamp = 0
        self.delta = 0
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.extended = False
        self.parts: list[bytes] = []
        self.received = 0


class ChunkStreamDecoder:
    """Feed bytes, get :class:`MessageReceived` events. Raises :class:`RtmpProtocolError`."""

    def __init__(
        self,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_chunk_size: int = MAX_ACCEPTED_CHUNK_SIZE,
        max_chunk_streams: int = MAX_CHUNK_STREAMS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self._max_message_size = max_message_size
        self._max_chunk_size = max_chunk_size
        self._max_chunk_streams = max_chunk_streams
        self._max_pending = max_pending_bytes
        self._pending = 0  # bytes of unfinished messages over all chunk streams
        self._streams: dict[int, _ChunkStreamState] = {}
        self._buf = bytearray()
        self.chunk_size = DEFAULT_CHUNK_SIZE
        #: window the peer asked us to acknowledge (Window Acknowledgement Size), if any
        self.window_ack_size: int | None = None
        #: bandwidth the peer set for us (Set Peer Bandwidth), if any
        self.peer_bandwidth: int | None = None
        #: sequence number of the last Acknowledgement the peer sent
        self.peer_acked: int = 0
        self.bytes_received = 0
        self._last_ack_at = 0

    def ack_due(self) -> int | None:
        """The sequence number to acknowledge now, when a whole window has arrived since the last
        Acknowledgement (RTMP spec 5.4.3), else None."""
        window = self.window_ack_size
        if window and self.bytes_received - self._last_ack_at >= window:
            self._last_ack_at = self.bytes_received
            return self.bytes_received & 0xFFFFFFFF
        return None

    def feed(self, data: bytes) -> list[MessageReceived]:
        self.bytes_received += len(data)
        buf = self._buf
        buf += data
        events: list[MessageReceived] = []
        pos = 0
        end = len(buf)
        while pos < end:
            consumed = self._chunk(buf, pos, end, events)
            if consumed == 0:
                break
            pos += consumed
        if pos:
            del buf[:pos]
        return events

    def _chunk(  # noqa: C901 - one linear walk over the chunk header fields
        self, buf: bytearray, pos: int, end: int, events: list[MessageReceived]
    ) -> int:
        """Parse one chunk at ``pos``; return bytes consumed, 0 when more input is needed."""
        b0 = buf[pos]
        fmt = b0 >> 6
        csid = b0 & 0x3F
        p = pos + 1
        if csid == 0:
            if end - p < 1:
                return 0
            csid = buf[p] + 64
            p += 1
        elif csid == 1:
            if end - p < 2:
                return 0
            csid = buf[p] + (buf[p + 1] << 8) + 64
            p += 2
        mh = _MESSAGE_HEADER_SIZE[fmt]
        if end - p < mh:
            return 0
        st = self._streams.get(csid)
        if st is None:
            if fmt != 0:
                raise RtmpProtocolError(f"chunk fmt {fmt} on csid {csid} with no previous header")
            if len(self._streams) >= self._max_chunk_streams:
                raise RtmpProtocolError("too many chunk streams")
            st = _ChunkStreamState()
            self._streams[csid] = st
        if fmt <= 2:
            ts_field = (buf[p] << 16) | (buf[p + 1] << 8) | buf[p + 2]
            extended = ts_field == EXTENDED_TIMESTAMP
        else:
            ts_field = 0
            extended = st.extended
        length = st.length
        type_id = st.type_id
        stream_id = st.stream_id
        if fmt <= 1:
            length = (buf[p + 3] << 16) | (buf[p + 4] << 8) | buf[p + 5]
            type_id = buf[p + 6]
            if length > self._max_message_size:
                raise RtmpProtocolError(f"message of {length} bytes exceeds the size cap")
        if fmt == 0:
            stream_id = int.from_bytes(buf[p + 7 : p + 11], "little")
        p += mh
        if extended:
            if end - p < 4:
                return 0
            ext = _U32.unpack_from(buf, p)[0]
            p += 4
            if fmt <= 2:
                ts_field = ext
        new_message = st.received == 0 or fmt != 3
        remaining = length - st.received if not new_message else length
        take = min(self.chunk_size, remaining)
        if end - p < take:
            return 0
        # the whole chunk is here: commit header state
        if new_message:
            self._pending -= st.received  # a new header mid-message drops the partial one
            st.parts = []
            st.received = 0
            if fmt == 0:
                st.timestamp = ts_field
                st.delta = ts_field
            elif fmt <= 2:
                st.delta = ts_field
                st.timestamp = (st.timestamp + ts_field) & 0xFFFFFFFF
            else:
                st.timestamp = (st.timestamp + st.delta) & 0xFFFFFFFF
            st.length = length
            st.type_id = type_id
            st.stream_id = stream_id
            st.extended = extended
        if take:
            st.parts.append(bytes(buf[p : p + take]))
            st.received += take
            self._pending += take
            if self._pending > self._max_pending:
                raise RtmpProtocolError("too many bytes of unfinished messages")
        p += take
        if st.received >= st.length:
            self._pending -= st.received
            payload = st.parts[0] if len(st.parts) == 1 else b"".join(st.parts)
            st.parts = []
            st.received = 0
            event = MessageReceived(csid, st.type_id, st.stream_id, st.timestamp, payload)
            if st.type_id <= MSG_SET_PEER_BANDWIDTH:
                self._control(event)
            events.append(event)
        return p - pos

    def _control(self, ev: MessageReceived) -> None:
        t = ev.type_id
        if t == MSG_SET_CHUNK_SIZE:
            if len(ev.payload) < 4:
                raise RtmpProtocolError("short Set Chunk Size")
            size = _U32.unpack_from(ev.payload)[0] & MAX_CHUNK_SIZE
            if size < 1 or size > self._max_chunk_size:
                raise RtmpProtocolError(f"chunk size {size} outside 1..{self._max_chunk_size}")
            self.chunk_size = size
        elif t == MSG_ABORT:
            if len(ev.payload) < 4:
                raise RtmpProtocolError("short Abort")
            aborted = self._streams.get(_U32.unpack_from(ev.payload)[0])
            if aborted is not None:
                self._pending -= aborted.received
                aborted.parts = []
                aborted.received = 0
        elif t == MSG_ACK:
            if len(ev.payload) < 4:
                raise RtmpProtocolError("short Acknowledgement")
            self.peer_acked = _U32.unpack_from(ev.payload)[0]
        elif t == MSG_WINDOW_ACK_SIZE:
            if len(ev.payload) < 4:
                raise RtmpProtocolError("short Window Acknowledgement Size")
            self.window_ack_size = _U32.unpack_from(ev.payload)[0] or None
        elif t == MSG_SET_PEER_BANDWIDTH:
            if len(ev.payload) < 5:
                raise RtmpProtocolError("short Set Peer Bandwidth")
            self.peer_bandwidth = _U32.unpack_from(ev.payload)[0]


def basic_header(fmt: int, csid: int) -> bytes:
    if 2 <= csid <= 63:
        return bytes([(fmt << 6) | csid])
    if 64 <= csid <= 319:
        return bytes([fmt << 6, csid - 64])
    if 320 <= csid <= MAX_CSID:
        c = csid - 64
        return bytes([(fmt << 6) | 1, c & 0xFF, c >> 8])
    raise RtmpProtocolError(f"chunk stream id {csid} out of range")


def _u24(v: int) -> bytes:
    return bytes([(v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF])


def _split(first_header: bytes, cont_header: bytes, payload: bytes, chunk_size: int) -> bytes:
    n = len(payload)
    if n <= chunk_size:
        return first_header + payload
    parts = [first_header, payload[:chunk_size]]
    for off in range(chunk_size, n, chunk_size):
        parts.append(cont_header)
        parts.append(payload[off : off + chunk_size])
    return b"".join(parts)


def encode_message(
    csid: int, type_id: int, stream_id: int, timestamp: int, payload: bytes, chunk_size: int
) -> bytes:
    """A whole message as chunks with a fmt 0 first header: stateless, so the same bytes can be
    written to every player regardless of what else was sent on their connection."""
    timestamp &= 0xFFFFFFFF
    ext = timestamp >= EXTENDED_TIMESTAMP
    ext_bytes = _U32.pack(timestamp) if ext else b""
    header = (
        basic_header(0, csid)
        + _u24(EXTENDED_TIMESTAMP if ext else timestamp)
        + _u24(len(payload))
        + bytes([type_id])
        + stream_id.to_bytes(4, "little")
        + ext_bytes
    )
    return _split(header, basic_header(3, csid) + ext_bytes, payload, chunk_size)


class ChunkWriter:
    """Encodes outbound messages with header compression (fmt 0/1/2, fmt 3 for continuations)."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self._last: dict[int, tuple[int, int, int, int]] = {}  # csid -> (type, len, sid, ts)

    def write(
        self, csid: int, type_id: int, stream_id: int, timestamp: int, payload: bytes
    ) -> bytes:
        if len(payload) > 0xFFFFFF:
            raise RtmpProtocolError("message longer than 16 MiB cannot be encoded")
        timestamp &= 0xFFFFFFFF
        prev = self._last.get(csid)
        self._last[csid] = (type_id, len(payload), stream_id, timestamp)
        if prev is None or prev[2] != stream_id or timestamp < prev[3]:
            return encode_message(csid, type_id, stream_id, timestamp, payload, self.chunk_size)
        delta = timestamp - prev[3]
        ext = delta >= EXTENDED_TIMESTAMP
        ext_bytes = _U32.pack(delta) if ext else b""
        field = _u24(EXTENDED_TIMESTAMP if ext else delta)
        if prev[0] == type_id and prev[1] == len(payload):
            header = basic_header(2, csid) + field + ext_bytes
        else:
            header = (
                basic_header(1, csid) + field + _u24(len(payload)) + bytes([type_id]) + ext_bytes
            )
        return _split(header, basic_header(3, csid) + ext_bytes, payload, self.chunk_size)

    def forget(self, csid: int) -> None:
        """Make the next message on ``csid`` use a full fmt 0 header (e.g. after someone else
        wrote stateless chunks on it)."""
        self._last.pop(csid, None)

    def set_chunk_size(self, size: int) -> bytes:
        """Encode Set Chunk Size (sent with the old size) and switch to ``size`` afterwards."""
        if not 1 <= size <= MAX_CHUNK_SIZE:
            raise RtmpProtocolError(f"chunk size {size} out of range")
        out = self.write(2, MSG_SET_CHUNK_SIZE, 0, 0, _U32.pack(size))
        self.chunk_size = size
        return out
