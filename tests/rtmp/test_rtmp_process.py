"""The packaged entry point (`python -m marchproxy_rtmp --config ...`) as a real process: ffmpeg
publishes, a player receives, /status shows it, and SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from marchproxy_rtmp.client import RtmpClientError
from marchproxy_rtmp.testing import ffmpeg_publish_argv, play_client, process, snapshot, wait_for
from tests.conftest import ProcessGroup, free_port, wait_port

pytestmark = pytest.mark.integration


async def test_packaged_rtmp_process(procs: ProcessGroup, tmp_path: Path) -> None:
    cfg = tmp_path / "rtmp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            snapshot([{"name": "live", "publish_keys": [{"key": "k", "stream": "cam"}]}])
        )
    )
    data_port, admin_port = free_port(), free_port()
    env = {
        "DATA_PORT": str(data_port),
        "ADMIN_PORT": str(admin_port),
        "GRPC_PORT": "0",
        "REGISTER_WITH_NLB": "false",
        "DRAIN_TIMEOUT": "2",
    }
    proc = procs.start("rtmp", [sys.executable, "-m", "marchproxy_rtmp", "--config", str(cfg)], env)
    await asyncio.to_thread(wait_port, data_port)
    await asyncio.to_thread(wait_port, admin_port)
    url = f"rtmp://127.0.0.1:{data_port}/live/cam?key=k"
    async with asyncio.timeout(60), process(*ffmpeg_publish_argv(url, 20)):
        player = None
        for _ in range(100):  # until ffmpeg has published
            try:
                player, rec = await play_client(data_port, "live", "cam")
            except (RtmpClientError, OSError):
                await asyncio.sleep(0.1)
                continue
            await wait_for(lambda: rec.video >= 30, 20)  # noqa: B023 - rec of this try
            break
        assert player is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{admin_port}/status") as r:
                status = await r.json()
            async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
                metrics = await r.text()
        stream = status["rtmp"]["applications"]["live"]["streams"][0]
        assert stream["publishing"] and stream["players"] == 1
        assert "marchproxy_rtmp_active_connections 2.0" in metrics
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        await asyncio.wait_for(player.closed, 10)
