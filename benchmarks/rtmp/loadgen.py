"""Lightweight RTMP player load generator (in the spirit of SRS's srs-bench).

Many real RTMP play sessions in one asyncio process: handshake, connect, createStream, play, then
count media messages per player with a chunk parser that skips payloads instead of reassembling
them. Reports per-player video frame rate over a measurement window and time to first frame.

    python benchmarks/rtmp/loadgen.py --url rtmp://127.0.0.1:1935/live/bench --players 200 \
        --window 8 --fps 30

Prints ``window-start`` / ``window-end`` lines (so a driver can sample server CPU) and then one
JSON line with the results. ``--until-eof`` instead plays until the server ends the stream and
reports total frames (used to check the counts against ffmpeg's).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, cast
from urllib.parse import urlsplit

from marchproxy_common.wire.rtmp.amf0 import decode as amf_decode
from marchproxy_common.wire.rtmp.chunks import ChunkWriter
from marchproxy_common.wire.rtmp.handshake import HANDSHAKE_SIZE
from marchproxy_common.wire.rtmp.messages import encode_command, encode_u32

_FMT_SIZE = (11, 7, 3, 0)


class CountingPlayer(asyncio.Protocol):
    """One play session; media payloads are skipped, only their count and first byte kept."""

    def __init__(self, app: str, tc_url: str, stream: str, stats: Stats, record: int = 0) -> None:
        self.app, self.tc_url, self.stream = app, tc_url, stream
        self.stats = stats
        #: MD5s of the first ``record`` video/audio frames (the codec data after the FLV
        #: AVC/AAC header, what ffprobe -show_data_hash hashes): where in the source they are
        self.record = record
        self.hashes: dict[int, list[str]] = {8: [], 9: []}
        self.t_start = time.monotonic()
        self.t_first_video: float | None = None
        self.first_video_key: bool | None = None
        self.video = 0
        self.audio = 0
        self.eof = False
        self.failed = ""
        self.transport: asyncio.Transport | None = None
        self._hs_need = 1 + 2 * HANDSHAKE_SIZE
        self._buf = bytearray()
        self._writer = ChunkWriter()
        self._chunk_size = 128
        # csid -> [length, type_id, received, ext, parts or None, first 2 bytes, media parts]
        self._cs: dict[int, list[Any]] = {}
        self._recv = 0
        self._acked = 0
        self._window = 0
        self._stream_id = 0
        self.done = asyncio.get_running_loop().create_future()

    # -- asyncio -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't assert
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"\x03" + bytes(8) + os.urandom(HANDSHAKE_SIZE - 8))

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if not self.done.done():
            self.done.set_result(None)

    def _send(self, csid: int, type_id: int, sid: int, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self._writer.write(csid, type_id, sid, 0, payload))

    def data_received(self, data: bytes) -> None:
        self._recv += len(data)
        buf = self._buf
        buf += data
        if self._hs_need:
            if len(buf) < self._hs_need:
                return
            s1 = bytes(buf[1 : 1 + HANDSHAKE_SIZE])
            del buf[: self._hs_need]
            self._hs_need = 0
            assert self.transport is not None
            self.transport.write(s1)
            self._send(
                3,
                20,
                0,
                encode_command(
                    "connect",
                    1,
                    {"app": self.app, "tcUrl": self.tc_url, "flashVer": "LNX 9,0,124,2"},
                ),
            )
            self._send(3, 20, 0, encode_command("createStream", 2, None))
        pos = 0
        end = len(buf)
        while pos < end:
            n = self._chunk(buf, pos, end)
            if n == 0:
                break
            pos += n
        if pos:
            del buf[:pos]
        if self._window and self._recv - self._acked >= self._window:
            self._acked = self._recv
            self._send(2, 3, 0, encode_u32(self._recv))

    def _chunk(self, buf: bytearray, pos: int, end: int) -> int:
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
        mh = _FMT_SIZE[fmt]
        if end - p < mh:
            return 0
        st = self._cs.get(csid)
        if st is None:
            st = [0, 0, 0, False, None, 0, None]
            self._cs[csid] = st
        ext = buf[p] == 255 and buf[p + 1] == 255 and buf[p + 2] == 255 if fmt <= 2 else st[3]
        length: int
        type_id: int
        length, type_id = st[0], st[1]
        if fmt <= 1:
            length = (buf[p + 3] << 16) | (buf[p + 4] << 8) | buf[p + 5]
            type_id = buf[p + 6]
        p += mh
        if ext:
            if end - p < 4:
                return 0
            p += 4
        new = st[2] == 0 or fmt != 3
        received = 0 if new else st[2]
        take = min(self._chunk_size, length - received)
        if end - p < take:
            return 0
        if new:
            st[0], st[1], st[3] = length, type_id, ext
            media = type_id in (8, 9)
            st[4] = None if media else []
            st[5] = (buf[p] << 8 | buf[p + 1]) if take >= 2 else 0
            st[6] = [] if media and len(self.hashes[type_id]) < self.record else None
        parts = st[4]
        if parts is not None:
            parts.append(bytes(buf[p : p + take]))
        elif st[6] is not None:
            st[6].append(bytes(buf[p : p + take]))
        received += take
        p += take
        if received >= length:
            st[2] = 0
            if type_id == 9:
                self._on_video(st[5], st[6])
            elif type_id == 8:
                self._on_audio(st[5], st[6])
            elif parts is not None:
                st[4] = None
                self._on_control(type_id, b"".join(parts))
        else:
            st[2] = received
        return p - pos

    def _on_video(self, head: int, parts: list[bytes] | None) -> None:
        b0, b1 = head >> 8, head & 0xFF
        if (b0 & 0x0F == 7 and b1 != 1) or (b0 & 0x80 and b0 & 0x0F in (0, 2)):
            return  # AVC sequence header / end of sequence (or enhanced-RTMP ones): not frames
        if self.t_first_video is None:
            self.t_first_video = time.monotonic()
            self.first_video_key = (b0 >> 4) & 0x7 == 1
            self.stats.first_frame(self)
        self.video += 1
        if parts is not None:
            self.hashes[9].append(hashlib.md5(b"".join(parts)[5:]).hexdigest())

    def _on_audio(self, head: int, parts: list[bytes] | None) -> None:
        if head >> 12 == 10 and head & 0xFF == 0:
            return  # AAC sequence header (AudioSpecificConfig): not a frame
        self.audio += 1
        if parts is not None:
            header = 2 if head >> 12 == 10 else 1
            self.hashes[8].append(hashlib.md5(b"".join(parts)[header:]).hexdigest())

    def _on_control(self, type_id: int, payload: bytes) -> None:
        if type_id == 1:
            self._chunk_size = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        elif type_id == 5:
            self._window = int.from_bytes(payload[:4], "big")
        elif type_id == 4 and payload[:2] == b"\x00\x06":  # ping request -> response
            self._send(2, 4, 0, b"\x00\x07" + payload[2:6])
        elif type_id == 20:
            values = amf_decode(payload)
            name = values[0] if values else ""
            if name == "_result" and len(values) >= 4 and values[1] == 2.0:
                self._stream_id = int(values[3])  # type: ignore[arg-type]
                self._send(
                    8, 20, self._stream_id, encode_command("play", 0, None, self.stream, -2000.0)
                )
            elif name == "onStatus" and len(values) >= 4 and isinstance(values[3], dict):
                code = str(values[3].get("code", ""))
                if code in ("NetStream.Play.UnpublishNotify", "NetStream.Play.Stop"):
                    self.eof = True
                    if not self.done.done():
                        self.done.set_result(None)
                elif values[3].get("level") == "error":
                    self.failed = code
            elif name == "_error":
                self.failed = "connect refused"


class Stats:
    def __init__(self) -> None:
        self.ttff: list[float] = []

    def first_frame(self, p: CountingPlayer) -> None:
        self.ttff.append(p.t_first_video - p.t_start)  # type: ignore[operator]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    u = urlsplit(args.url)
    segs = [s for s in u.path.split("/") if s]
    app, stream = segs[0], "/".join(segs[1:])
    host, port = u.hostname or "127.0.0.1", u.port or 1935
    tc_url = f"rtmp://{host}:{port}/{app}"
    loop = asyncio.get_running_loop()
    stats = Stats()
    players: list[CountingPlayer] = []
    failures = 0
    interval = 1.0 / args.connect_rate
    for _ in range(args.players):
        try:
            _, proto = await loop.create_connection(
                lambda: CountingPlayer(app, tc_url, stream, stats, args.record), host, port
            )
            players.append(proto)
        except OSError:
            failures += 1
        await asyncio.sleep(interval)
    cpu0 = time.process_time()
    if args.until_eof:
        await asyncio.wait_for(asyncio.gather(*(p.done for p in players)), args.timeout)
        result = {
            "players": len(players),
            "video": [p.video for p in players],
            "audio": [p.audio for p in players],
            "first_video_key": [p.first_video_key for p in players],
            "video_md5": [p.hashes[9] for p in players],
            "audio_md5": [p.hashes[8] for p in players],
            "failed": [p.failed for p in players],
        }
        return result
    await asyncio.sleep(args.warmup)
    before = [p.video for p in players]
    print("window-start", flush=True)
    t0 = time.monotonic()
    await asyncio.sleep(args.window)
    dt = time.monotonic() - t0
    after = [p.video for p in players]
    print("window-end", flush=True)
    rates = [(b - a) / dt for a, b in zip(before, after, strict=True)]
    good = sum(1 for r in rates if r >= 0.95 * args.fps)
    cpu = time.process_time() - cpu0
    for p in players:
        if p.transport is not None:
            p.transport.abort()
    return {
        "window_frames": [b - a for a, b in zip(before, after, strict=True)],
        "window_seconds": round(dt, 3),
        "players": args.players,
        "connected": len(players),
        "connect_failures": failures,
        "play_failures": sum(1 for p in players if p.failed),
        "no_video": sum(1 for p in players if p.t_first_video is None),
        "fps_median": round(statistics.median(rates), 2) if rates else 0.0,
        "fps_p5": round(pct(rates, 0.05), 2),
        "good_fraction": round(good / args.players, 4),
        "ttff_median_ms": round(pct(stats.ttff, 0.5) * 1000, 1),
        "ttff_p95_ms": round(pct(stats.ttff, 0.95) * 1000, 1),
        "loadgen_cpu_s": round(cpu, 2),
        "loadgen_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--players", type=int, default=10)
    ap.add_argument("--connect-rate", type=float, default=400.0, help="new sessions per second")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--window", type=float, default=8.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--until-eof", action="store_true")
    ap.add_argument(
        "--record", type=int, default=0, help="MD5s of the first N frames per type (--until-eof)"
    )
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        result = uvloop.run(main(args))
    else:
        result = asyncio.run(main(args))
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    cli()
