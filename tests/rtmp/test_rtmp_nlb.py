"""Through the NLB data plane: one NLB port sniffs the RTMP handshake and relays (with a PROXY v2
header) to our RTMP module; ffmpeg publishes and plays through it, and the module sees the real
client address."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from marchproxy.v1 import types_pb2
from marchproxy_nlb.config import NlbSettings
from marchproxy_nlb.metrics import NlbMetrics
from marchproxy_nlb.registry.table import InstanceRegistry
from marchproxy_nlb.traffic.plane import DataPlane
from marchproxy_rtmp.client import open_client
from marchproxy_rtmp.synthetic import SyntheticPublisher
from marchproxy_rtmp.testing import (
    count_frames,
    ffmpeg_publish_argv,
    ffmpeg_record_argv,
    have,
    process,
    run_server,
    wait_for,
)

APPS = [{"name": "live", "publish_keys": [{"key": "k", "stream": "cam"}]}]


async def start_nlb(rtmp_port: int) -> DataPlane:
    settings = NlbSettings(
        nlb_listeners="0=http,rtmp", nlb_sniff_timeout=0.5, nlb_connect_timeout=2.0, redis_url=""
    )
    registry = InstanceRegistry(heartbeat_timeout=60)
    registry.register(
        module_id="rtmp",
        module_type=types_pb2.MODULE_TYPE_RTMP,
        protocols=(types_pb2.PROTOCOL_RTMP,),
        data_host="127.0.0.1",
        data_port=rtmp_port,
        instance_id="rtmp-1",
    )
    plane = DataPlane(settings, registry, NlbMetrics())
    await plane.start()
    return plane


async def stop_nlb(plane: DataPlane) -> None:
    await plane.stop_accepting()
    await plane.drain(asyncio.get_running_loop().time() + 2)


async def test_publisher_address_through_nlb_is_the_real_client() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (hooks, port):
        plane = await start_nlb(port)
        try:
            nlb_port = plane.listener_addresses()[0][1]
            proto = await open_client("127.0.0.1", nlb_port, "live")
            pub = SyntheticPublisher(proto, await proto.publish("cam?key=k"))
            assert proto.transport is not None
            me = proto.transport.get_extra_info("sockname")
            stream = hooks.status()["rtmp"]["applications"]["live"]["streams"][0]
            assert stream["publisher"]["address"] == f"{me[0]}:{me[1]}"
            pub.proto.close()
        finally:
            await stop_nlb(plane)


@pytest.mark.integration
@pytest.mark.skipif(not have("ffmpeg"), reason="ffmpeg not installed")
async def test_ffmpeg_through_nlb_port() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"p{i}.flv") for i in range(2)]
        async with asyncio.timeout(90), run_server(APPS) as (hooks, port):
            plane = await start_nlb(port)
            try:
                url = f"rtmp://127.0.0.1:{plane.listener_addresses()[0][1]}/live/cam"
                async with process(*ffmpeg_publish_argv(url + "?key=k", 7)) as pub:
                    await wait_for(lambda: hooks.server.registry.publishing(), 30)
                    async with (
                        process(*ffmpeg_record_argv(url, outs[0], 3)) as p0,
                        process(*ffmpeg_record_argv(url, outs[1], 3)) as p1,
                    ):
                        assert await asyncio.wait_for(p0.wait(), 45) == 0
                        assert await asyncio.wait_for(p1.wait(), 45) == 0
                    assert await asyncio.wait_for(pub.wait(), 45) == 0
            finally:
                await stop_nlb(plane)
        for out in outs:
            counts = await count_frames(out)
            assert counts.get("video", 0) >= 60, counts
            assert counts.get("audio", 0) >= 60, counts
