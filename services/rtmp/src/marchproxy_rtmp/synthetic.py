"""Synthetic FLV-style media for tests and benchmarks: AVC/AAC sequence headers, keyframes every
``gop`` frames, inter frames and AAC frames, published through :class:`RtmpClientProtocol`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from marchproxy_common.wire.rtmp.chunks import MSG_AUDIO, MSG_DATA_AMF0, MSG_VIDEO
from marchproxy_common.wire.rtmp.messages import encode_data
from marchproxy_rtmp.client import RtmpClientProtocol

AVC_SEQUENCE_HEADER = b"\x17\x00\x00\x00\x00\x01\x42\xc0\x1e\xff\xe1\x00\x04gB\xc0\x1e"
AAC_SEQUENCE_HEADER = b"\xaf\x00\x12\x10"
CSID_AUDIO = 6
CSID_VIDEO = 7
CSID_DATA = 5


def video_frame(index: int, gop: int, size: int) -> bytes:
    key = index % gop == 0
    head = b"\x17\x01\x00\x00\x00" if key else b"\x27\x01\x00\x00\x00"
    body = index.to_bytes(4, "big") * (max(0, size - 5) // 4 + 1)
    return head + body[: max(0, size - 5)]


def audio_frame(index: int, size: int = 200) -> bytes:
    return b"\xaf\x01" + bytes([index & 0xFF]) * max(0, size - 2)


@dataclass
class SyntheticPublisher:
    proto: RtmpClientProtocol
    stream_id: int
    fps: float = 30.0
    gop: int = 30
    video_size: int = 3000
    audio_per_video: int = 1
    sent_video: int = 0

    def send_headers(self) -> None:
        meta = encode_data(
            "@setDataFrame", "onMetaData", {"width": 320.0, "height": 240.0, "framerate": self.fps}
        )
        self.proto.send(CSID_DATA, MSG_DATA_AMF0, self.stream_id, meta)
        self.proto.send(CSID_VIDEO, MSG_VIDEO, self.stream_id, AVC_SEQUENCE_HEADER)
        self.proto.send(CSID_AUDIO, MSG_AUDIO, self.stream_id, AAC_SEQUENCE_HEADER)

    def send_frame(self) -> None:
        i = self.sent_video
        ts = int(i * 1000 / self.fps)
        self.proto.send(
            CSID_VIDEO,
            MSG_VIDEO,
            self.stream_id,
            video_frame(i, self.gop, self.video_size),
            timestamp=ts,
        )
        for _ in range(self.audio_per_video):
            self.proto.send(CSID_AUDIO, MSG_AUDIO, self.stream_id, audio_frame(i), timestamp=ts)
        self.sent_video += 1

    async def run(self, frames: int, *, realtime: bool = True) -> None:
        """Send ``frames`` video frames (plus audio), paced at ``fps`` when ``realtime``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(frames):
            self.send_frame()
            if realtime:
                due = start + self.sent_video / self.fps
                await asyncio.sleep(max(0.0, due - loop.time()))
            elif self.sent_video % 50 == 0:
                await asyncio.sleep(0)
