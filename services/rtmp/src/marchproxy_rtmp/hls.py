"""HLS output from a live RTMP stream: FLV AVC/AAC -> MPEG-TS segments + an m3u8 playlist.

Pure code (no I/O): :class:`HlsMuxer` is fed the stream's media messages and keeps the last
``playlist_length`` segments in memory; the server serves them over HTTP. References: ISO/IEC
13818-1 (TS packets, PAT/PMT, PES), ISO/IEC 14496-15 (AVCDecoderConfigurationRecord, length-
prefixed NAL units -> Annex B), ISO/IEC 13818-7 (ADTS), RFC 8216 (playlist).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from marchproxy_common.wire.rtmp.chunks import MSG_AUDIO, MSG_VIDEO

TS_PACKET = 188
PID_PAT = 0x0000
PID_PMT = 0x1000
PID_VIDEO = 0x0100
PID_AUDIO = 0x0101
STREAM_TYPE_H264 = 0x1B
STREAM_TYPE_AAC = 0x0F
#: 90 kHz clock; timestamps are shifted so that decoders never see negative DTS
TS_OFFSET = 90_000
#: cap of one segment in memory (a broken publisher with no keyframes cannot grow it forever)
MAX_SEGMENT_BYTES = 64 << 20
AUD = b"\x00\x00\x00\x01\x09\xf0"
START_CODE = b"\x00\x00\x00\x01"


def _crc32_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc32_table()


def crc32_mpeg2(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[((crc >> 24) ^ b) & 0xFF]
    return crc


def _section_packet(pid: int, section: bytes, cc: int) -> bytes:
    body = b"\x00" + section + crc32_mpeg2(section).to_bytes(4, "big")
    header = bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | (cc & 0x0F)])
    return header + body + b"\xff" * (TS_PACKET - 4 - len(body))


def pat_packet(cc: int = 0) -> bytes:
    program = (1).to_bytes(2, "big") + (0xE000 | PID_PMT).to_bytes(2, "big")
    length = 5 + len(program) + 4
    section = bytes([0x00, 0xB0 | (length >> 8), length & 0xFF, 0x00, 0x01, 0xC1, 0x00, 0x00])
    return _section_packet(PID_PAT, section + program, cc)


def pmt_packet(has_video: bool, has_audio: bool, cc: int = 0) -> bytes:
    streams = b""
    if has_video:
        streams += bytes([STREAM_TYPE_H264, 0xE0 | (PID_VIDEO >> 8), PID_VIDEO & 0xFF, 0xF0, 0])
    if has_audio:
        streams += bytes([STREAM_TYPE_AAC, 0xE0 | (PID_AUDIO >> 8), PID_AUDIO & 0xFF, 0xF0, 0])
    pcr_pid = PID_VIDEO if has_video else PID_AUDIO
    length = 9 + len(streams) + 4
    section = bytes(
        [0x02, 0xB0 | (length >> 8), length & 0xFF, 0x00, 0x01, 0xC1, 0x00, 0x00,
         0xE0 | (pcr_pid >> 8), pcr_pid & 0xFF, 0xF0, 0x00]
    )  # fmt: skip
    return _section_packet(PID_PMT, section + streams, cc)


def _timestamp(prefix: int, ts: int) -> bytes:
    ts &= (1 << 33) - 1
    return bytes(
        [
            (prefix << 4) | (((ts >> 30) & 0x07) << 1) | 1,
            (ts >> 22) & 0xFF,
            (((ts >> 15) & 0x7F) << 1) | 1,
            (ts >> 7) & 0xFF,
            ((ts & 0x7F) << 1) | 1,
        ]
    )


def pes(stream_id: int, pts: int, dts: int | None, payload: bytes) -> bytes:
    if dts is not None and dts != pts:
        header = b"\x80\xc0\x0a" + _timestamp(3, pts) + _timestamp(1, dts)
    else:
        header = b"\x80\x80\x05" + _timestamp(2, pts)
    length = len(header) + len(payload)
    if length > 0xFFFF:
        length = 0  # allowed for video elementary streams
    return b"\x00\x00\x01" + bytes([stream_id]) + length.to_bytes(2, "big") + header + payload


class _Packetizer:
    """Splits PES packets into 188-byte TS packets with continuity counters per PID."""

    def __init__(self) -> None:
        self.cc: dict[int, int] = {}

    def next_cc(self, pid: int) -> int:
        cc = self.cc.get(pid, -1) + 1 & 0x0F
        self.cc[pid] = cc
        return cc

    def packets(self, pid: int, data: bytes, *, pcr: int | None, random_access: bool) -> bytes:
        out = []
        pos = 0
        first = True
        n = len(data)
        while pos < n:
            adaptation = b""
            if first and (pcr is not None or random_access):
                flags = (0x40 if random_access else 0) | (0x10 if pcr is not None else 0)
                field = bytes([flags])
                if pcr is not None:
                    base = pcr & ((1 << 33) - 1)
                    field += (base << 15 | 0x7E00).to_bytes(6, "big")
                adaptation = bytes([len(field)]) + field
            room = TS_PACKET - 4 - len(adaptation)
            remaining = n - pos
            if remaining < room:  # stuff the last packet through the adaptation field
                pad = room - remaining
                if adaptation:
                    adaptation = bytes([adaptation[0] + pad]) + adaptation[1:] + b"\xff" * pad
                elif pad == 1:
                    adaptation = b"\x00"
                else:
                    adaptation = bytes([pad - 1, 0x00]) + b"\xff" * (pad - 2)
                room = remaining
            afc = 0x30 if adaptation else 0x10
            header = bytes(
                [0x47, (0x40 if first else 0) | (pid >> 8), pid & 0xFF, afc | self.next_cc(pid)]
            )
            out.append(header + adaptation + data[pos : pos + room])
            pos += room
            first = False
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class Segment:
    sequence: int
    duration: float
    data: bytes


class HlsMuxer:
    def __init__(self, name: str, *, fragment: float = 2.0, playlist_length: int = 6) -> None:
        self.name = name
        self.fragment = fragment
        self.segments: deque[Segment] = deque(maxlen=playlist_length)
        self.ended = False
        self._seq = 0
        self._pk = _Packetizer()
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._seg_start: int | None = None  # ms
        self._last_ts = 0
        self._nal_length = 4
        self._sps_pps = b""
        self._adts: tuple[int, int, int] | None = None  # (profile, freq index, channels)
        self.has_video = False
        self.has_audio = False

    # -- input ---------------------------------------------------------------------------------

    def on_media(self, type_id: int, timestamp: int, payload: bytes) -> None:
        if self.ended or len(payload) < 2:
            return
        if type_id == MSG_VIDEO:
            self._video(timestamp, payload)
        elif type_id == MSG_AUDIO:
            self._audio(timestamp, payload)

    def _video(self, ts: int, p: bytes) -> None:
        if p[0] & 0x0F != 7:  # only AVC
            return
        if p[1] == 0:
            self._avc_config(p[5:])
            return
        if p[1] != 1 or not self._sps_pps or len(p) < 5:
            return
        self.has_video = True
        key = p[0] >> 4 == 1
        cts = int.from_bytes(p[2:5], "big", signed=True)
        if key:
            self._maybe_cut(ts)
        if self._seg_start is None:
            if not key:
                return  # a segment starts on a keyframe
            self._start_segment(ts)
        annexb = [AUD]
        if key:
            annexb.append(self._sps_pps)
        data = p[5:]
        pos = 0
        size = self._nal_length
        while pos + size <= len(data):
            n = int.from_bytes(data[pos : pos + size], "big")
            pos += size
            if n <= 0 or pos + n > len(data):
                break
            annexb.append(START_CODE)
            annexb.append(data[pos : pos + n])
            pos += n
        dts = ts * 90 + TS_OFFSET
        pts = (ts + cts) * 90 + TS_OFFSET
        packet = pes(0xE0, pts, dts, b"".join(annexb))
        self._append(self._pk.packets(PID_VIDEO, packet, pcr=dts if key else None,
                                      random_access=key))  # fmt: skip
        self._last_ts = ts

    def _avc_config(self, rec: bytes) -> None:
        if len(rec) < 7:
            return
        self._nal_length = (rec[4] & 0x03) + 1
        out = []
        pos = 5
        for i in range(2):  # SPS list then PPS list
            if pos >= len(rec):
                break
            count = rec[pos] & (0x1F if i == 0 else 0xFF)
            pos += 1
            for _ in range(count):
                n = int.from_bytes(rec[pos : pos + 2], "big")
                out.append(START_CODE + rec[pos + 2 : pos + 2 + n])
                pos += 2 + n
        self._sps_pps = b"".join(out)

    def _audio(self, ts: int, p: bytes) -> None:
        if p[0] >> 4 != 10:  # only AAC
            return
        if p[1] == 0:
            if len(p) >= 4:
                obj = p[2] >> 3
                freq = ((p[2] & 0x07) << 1) | (p[3] >> 7)
                channels = (p[3] >> 3) & 0x0F
                self._adts = (max(0, obj - 1) & 0x03, freq, channels)
            return
        if self._adts is None:
            return
        self.has_audio = True
        if self._seg_start is None:
            if self.has_video or self._sps_pps:
                return  # wait for the first keyframe
            self._start_segment(ts)
        elif not self._sps_pps:
            self._maybe_cut(ts)  # audio-only stream: cut anywhere
        raw = p[2:]
        profile, freq, ch = self._adts
        length = len(raw) + 7
        header = bytes(
            [0xFF, 0xF1, (profile << 6) | (freq << 2) | (ch >> 2),
             ((ch & 0x03) << 6) | (length >> 11), (length >> 3) & 0xFF,
             ((length & 0x07) << 5) | 0x1F, 0xFC]
        )  # fmt: skip
        pts = ts * 90 + TS_OFFSET
        packet = pes(0xC0, pts, None, header + raw)
        self._append(self._pk.packets(PID_AUDIO, packet, pcr=None, random_access=False))
        self._last_ts = max(self._last_ts, ts)

    # -- segments ------------------------------------------------------------------------------

    def _append(self, data: bytes) -> None:
        self._buf.append(data)
        self._buf_bytes += len(data)
        if self._buf_bytes > MAX_SEGMENT_BYTES:
            self._buf = []
            self._buf_bytes = 0
            self._seg_start = None

    def _start_segment(self, ts: int) -> None:
        self._seg_start = ts
        tables = pat_packet(self._pk.next_cc(PID_PAT)) + pmt_packet(
            True, True, self._pk.next_cc(PID_PMT)
        )
        self._buf = [tables]
        self._buf_bytes = len(tables)

    def _maybe_cut(self, ts: int) -> None:
        if self._seg_start is not None and (ts - self._seg_start) / 1000 >= self.fragment:
            self._close_segment(ts)

    def _close_segment(self, end_ts: int) -> None:
        if self._seg_start is None or len(self._buf) <= 1:
            return
        duration = max(0.001, (end_ts - self._seg_start) / 1000)
        self.segments.append(Segment(self._seq, duration, b"".join(self._buf)))
        self._seq += 1
        self._seg_start = None
        self._buf = []
        self._buf_bytes = 0

    def finish(self) -> None:
        """The publisher left: close the last segment and end the playlist."""
        self._close_segment(self._last_ts + 33)
        self.ended = True

    # -- output --------------------------------------------------------------------------------

    def segment_name(self, seq: int) -> str:
        return f"{self.name}-{seq}.ts"

    def segment(self, seq: int) -> bytes | None:
        for s in self.segments:
            if s.sequence == seq:
                return s.data
        return None

    def playlist(self) -> str:
        segs = list(self.segments)
        target = max((math.ceil(s.duration) for s in segs), default=math.ceil(self.fragment))
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{target}",
            f"#EXT-X-MEDIA-SEQUENCE:{segs[0].sequence if segs else 0}",
        ]
        for s in segs:
            lines.append(f"#EXTINF:{s.duration:.3f},")
            lines.append(self.segment_name(s.sequence))
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"
