"""RTMP messages above the chunk layer (RTMP spec 1.0 sections 5.4, 6 and 7), sans-IO.

Command messages (type 20 AMF0, type 17 = one 0x00 format byte then AMF0 values, possibly with
0x11 AMF3 switches), data messages (18/15), protocol control messages (1-6), user control events
(type 4) and the FLV-style audio/video tag headers the server needs to recognise keyframes and
codec sequence headers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from marchproxy_common.wire.rtmp import amf0
from marchproxy_common.wire.rtmp.amf0 import AmfValue
from marchproxy_common.wire.rtmp.chunks import (
    MSG_COMMAND_AMF3,
    MSG_DATA_AMF3,
)
from marchproxy_common.wire.rtmp.errors import RtmpProtocolError

#: longest command/data message we parse as AMF (media is never parsed this way)
MAX_COMMAND_SIZE = 64 * 1024

_U32 = struct.Struct(">I")


class UserControl(enum.IntEnum):
    """RTMP spec 7.1.7 user control event types."""

    STREAM_BEGIN = 0
    STREAM_EOF = 1
    STREAM_DRY = 2
    SET_BUFFER_LENGTH = 3
    STREAM_IS_RECORDED = 4
    PING_REQUEST = 6
    PING_RESPONSE = 7


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    transaction_id: float
    command_object: AmfValue
    args: list[AmfValue] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UserControlEvent:
    event: int
    stream_id: int = 0
    #: SetBufferLength's buffer length (ms) or a ping timestamp
    value: int = 0


def _amf_payload(type_id: int, payload: bytes) -> bytes:
    if len(payload) > MAX_COMMAND_SIZE:
        raise RtmpProtocolError(f"command/data message of {len(payload)} bytes exceeds the cap")
    if type_id in (MSG_COMMAND_AMF3, MSG_DATA_AMF3):
        # AMF3 command/data messages start with a format byte (0 = AMF0 values follow)
        return payload[1:] if payload[:1] == b"\x00" else payload
    return payload


def parse_command(type_id: int, payload: bytes) -> Command:
    """Parse a command message (type 20 or 17)."""
    values = amf0.decode(_amf_payload(type_id, payload))
    if len(values) < 2 or not isinstance(values[0], str):
        raise RtmpProtocolError("command message without a name and transaction id")
    tid = values[1]
    if not isinstance(tid, int | float) or isinstance(tid, bool):
        raise RtmpProtocolError("command transaction id is not a number")
    obj = values[2] if len(values) > 2 else None
    return Command(values[0], float(tid), obj, list(values[3:]))


def parse_data(type_id: int, payload: bytes) -> list[AmfValue]:
    """Parse a data message (type 18 or 15), e.g. ``@setDataFrame``/``onMetaData``."""
    return amf0.decode(_amf_payload(type_id, payload))


def encode_command(
    name: str, transaction_id: float, command_object: AmfValue = None, *args: AmfValue
) -> bytes:
    return amf0.encode(name, transaction_id, command_object, *args)


def encode_data(*values: AmfValue) -> bytes:
    return amf0.encode(*values)


def status_info(level: str, code: str, description: str, **extra: AmfValue) -> dict[str, AmfValue]:
    info: dict[str, AmfValue] = {"level": level, "code": code, "description": description}
    info.update(extra)
    return info


def encode_on_status(level: str, code: str, description: str, **extra: AmfValue) -> bytes:
    return encode_command("onStatus", 0, None, status_info(level, code, description, **extra))


def parse_user_control(payload: bytes) -> UserControlEvent:
    if len(payload) < 2:
        raise RtmpProtocolError("short user control message")
    event = int.from_bytes(payload[:2], "big")
    stream_id = value = 0
    if event == UserControl.SET_BUFFER_LENGTH:
        if len(payload) < 10:
            raise RtmpProtocolError("short SetBufferLength")
        stream_id, value = struct.unpack_from(">II", payload, 2)
    elif event in (UserControl.PING_REQUEST, UserControl.PING_RESPONSE):
        if len(payload) < 6:
            raise RtmpProtocolError("short ping")
        value = _U32.unpack_from(payload, 2)[0]
    elif len(payload) >= 6:
        stream_id = _U32.unpack_from(payload, 2)[0]
    return UserControlEvent(event, stream_id, value)


def encode_user_control(ev: UserControlEvent) -> bytes:
    head = ev.event.to_bytes(2, "big")
    if ev.event == UserControl.SET_BUFFER_LENGTH:
        return head + struct.pack(">II", ev.stream_id, ev.value)
    if ev.event in (UserControl.PING_REQUEST, UserControl.PING_RESPONSE):
        return head + _U32.pack(ev.value)
    return head + _U32.pack(ev.stream_id)


def encode_u32(value: int) -> bytes:
    """Payload of Set Chunk Size / Abort / Acknowledgement / Window Acknowledgement Size."""
    return _U32.pack(value & 0xFFFFFFFF)


def encode_peer_bandwidth(size: int, limit_type: int = 2) -> bytes:
    """Set Peer Bandwidth payload (limit type 0 hard, 1 soft, 2 dynamic)."""
    return _U32.pack(size) + bytes([limit_type])


#: sub-messages one aggregate message (type 22) may carry
MAX_AGGREGATE_PARTS = 4096


def split_aggregate(payload: bytes, timestamp: int) -> list[tuple[int, int, bytes]]:
    """Split an aggregate message (RTMP spec 7.1.6) into (type_id, timestamp, payload) parts.

    Each part is an FLV tag: type (1), size (3), timestamp (3 + 1 extension), stream id (3), data,
    back-pointer (4). Part timestamps are rebased onto the aggregate message's own timestamp."""
    parts: list[tuple[int, int, bytes]] = []
    pos = 0
    first_ts: int | None = None
    n = len(payload)
    while pos < n:
        if n - pos < 11:
            raise RtmpProtocolError("truncated aggregate sub-message header")
        if len(parts) >= MAX_AGGREGATE_PARTS:
            raise RtmpProtocolError("too many aggregate sub-messages")
        type_id = payload[pos]
        size = int.from_bytes(payload[pos + 1 : pos + 4], "big")
        ts = int.from_bytes(payload[pos + 4 : pos + 7], "big") | payload[pos + 7] << 24
        end = pos + 11 + size
        if end + 4 > n:
            raise RtmpProtocolError("truncated aggregate sub-message")
        if first_ts is None:
            first_ts = ts
        parts.append((type_id, (timestamp + ts - first_ts) & 0xFFFFFFFF, payload[pos + 11 : end]))
        pos = end + 4
    return parts


# ---------------------------------------------------------------- media tag headers (FLV spec)

VIDEO_FRAME_KEY = 1  # FLV VideoTagHeader FrameType
VIDEO_CODEC_AVC = 7
AUDIO_FORMAT_AAC = 10


def is_video_keyframe(payload: bytes) -> bool:
    """FLV VideoTagHeader frame type 1 (keyframe); enhanced RTMP keeps the same top nibble
    (with its 0x80 IsExHeader bit)."""
    return bool(payload) and (payload[0] >> 4) & 0x7 == VIDEO_FRAME_KEY


def is_video_sequence_header(payload: bytes) -> bool:
    """AVC sequence header (AVCDecoderConfigurationRecord) or enhanced-RTMP SequenceStart."""
    if len(payload) < 2:
        return False
    if payload[0] & 0x80:  # enhanced RTMP: PacketType in the low nibble, 0 = SequenceStart
        return payload[0] & 0x0F == 0
    codec = payload[0] & 0x0F
    return codec in (VIDEO_CODEC_AVC, 12) and payload[1] == 0  # 12: HEVC (non-standard id)


def is_audio_sequence_header(payload: bytes) -> bool:
    """AAC sequence header (AudioSpecificConfig): SoundFormat 10 and AACPacketType 0."""
    return len(payload) >= 2 and payload[0] >> 4 == AUDIO_FORMAT_AAC and payload[1] == 0
