# ruff: noqa: ASYNC109, ASYNC110 - polling helpers for tests, bounded by asyncio.timeout
"""Helpers for tests and benchmarks (like aiohttp.test_utils): run a server on port 0, drive
ffmpeg/ffprobe, start nginx-rtmp. Every process started here is killed by its context manager."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from marchproxy_rtmp.client import RtmpClientProtocol, open_client
from marchproxy_rtmp.config import RtmpSettings
from marchproxy_rtmp.module import RtmpHooks

NGINX_RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"
FFMPEG_PUBLISH_ARGS = (
    "-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=30", "-f", "lavfi", "-i", "sine",
    "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "30",
    "-c:a", "aac",
)  # fmt: skip


def snapshot(applications: Sequence[Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "component": "rtmp",
        "version": 1,
        "modules": [
            {"name": "rtmp", "type": "RTMP", "config": {"applications": applications, **extra}}
        ],
        "routes": [],
    }


@contextlib.asynccontextmanager
async def run_server(
    applications: Sequence[Mapping[str, Any]],
    *,
    hls_port: int = -1,
    settings: Mapping[str, Any] | None = None,
    **config: Any,
) -> AsyncIterator[tuple[RtmpHooks, int]]:
    values: dict[str, Any] = {"data_port": 0, "register_with_nlb": False}
    values.update(settings or {})
    hooks = RtmpHooks(RtmpSettings(rtmp_hls_port=hls_port, **values))
    addr = await hooks.start_data_plane()
    try:
        errors = await hooks.apply_config(snapshot(applications, **config))
        if errors:
            raise ValueError(errors)
        yield hooks, addr.port
    finally:
        await hooks.server.close()


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 10)


@contextlib.asynccontextmanager
async def process(*argv: str, **kw: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=kw.pop("stdout", asyncio.subprocess.DEVNULL),
        stderr=kw.pop("stderr", asyncio.subprocess.PIPE),
        **kw,
    )
    try:
        yield proc
    finally:
        await kill(proc)


def ffmpeg_publish_argv(url: str, seconds: float) -> list[str]:
    return [
        "ffmpeg", "-hide_banner", "-nostats", "-loglevel", "error", *FFMPEG_PUBLISH_ARGS,
        "-t", str(seconds), "-f", "flv", url,
    ]  # fmt: skip


def ffmpeg_record_argv(url: str, out: str, seconds: float) -> list[str]:
    return [
        "ffmpeg", "-hide_banner", "-nostats", "-loglevel", "error", "-rw_timeout", "15000000",
        "-i", url, "-t", str(seconds), "-c", "copy", "-f", "flv", "-y", out,
    ]  # fmt: skip


async def count_frames(path: str) -> dict[str, int]:
    """Decoded frames per stream type of a recorded file (``ffprobe -count_frames``)."""
    proc = await asyncio.create_subprocess_exec(
        "ffprobe", "-v", "error", "-count_frames", "-show_entries",
        "stream=codec_type,nb_read_frames", "-of", "csv=p=0", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await kill(proc)
    counts: dict[str, int] = {}
    for line in out.decode().splitlines():
        kind, _, n = line.partition(",")
        if n.strip().isdigit():
            counts[kind] = counts.get(kind, 0) + int(n)
    return counts


async def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def rtmp_port_open(port: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            w.close()
            await w.wait_closed()
            return


class Recorder:
    """Collects what a play session receives (media type, timestamp, first payload bytes)."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, int, bytes]] = []
        #: payload length of each message in ``messages``
        self.lengths: list[int] = []
        self.video = 0
        self.audio = 0
        self.first_video = asyncio.Event()

    def __call__(self, ev: Any) -> None:
        self.messages.append((ev.type_id, ev.timestamp, bytes(ev.payload[:2])))
        self.lengths.append(len(ev.payload))
        if ev.type_id == 9:
            self.video += 1
            self.first_video.set()
        elif ev.type_id == 8:
            self.audio += 1


async def play_client(port: int, app: str, name: str) -> tuple[RtmpClientProtocol, Recorder]:
    rec = Recorder()
    proto = await open_client("127.0.0.1", port, app, on_media=rec)
    await proto.play(name)
    return proto, rec


@contextlib.asynccontextmanager
async def nginx_rtmp(rtmp_port: int, extra_app_conf: str = "") -> AsyncIterator[Path]:
    """nginx with the rtmp module on ``rtmp_port``, one open application ``live``."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp = Path(tempfile.mkdtemp(prefix="mp-nginx-rtmp-"))
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""
load_module {NGINX_RTMP_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
rtmp {{
    server {{
        listen 127.0.0.1:{rtmp_port};
        chunk_size 4096;
        application live {{
            live on;
            wait_key on;
            {extra_app_conf}
        }}
    }}
}}
"""
    )
    proc = await asyncio.create_subprocess_exec(
        nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await rtmp_port_open(rtmp_port)
        yield tmp
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                await kill(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def have(binary: str) -> bool:
    return shutil.which(binary) is not None or os.path.exists(binary)
