"""The RTMP module on the shared runtime (static config file, admin /status and /metrics), PROXY
protocol v2 from the NLB, and the nginx-style on_publish HTTP callback."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web

from marchproxy.v1 import module_pb2, module_pb2_grpc, types_pb2
from marchproxy_common.module.runtime import run_module
from marchproxy_common.wire.proxy_protocol import build_v2
from marchproxy_rtmp.client import RtmpClientError, RtmpClientProtocol, open_client
from marchproxy_rtmp.config import RtmpSettings
from marchproxy_rtmp.module import RtmpHooks
from marchproxy_rtmp.synthetic import (
    AAC_SEQUENCE_HEADER,
    AVC_SEQUENCE_HEADER,
    SyntheticPublisher,
    audio_frame,
    video_frame,
)
from marchproxy_rtmp.testing import play_client, run_server, snapshot, wait_for

KEY = "rtmp-runtime-test-key"


async def test_rtmp_through_module_runtime(tmp_path: Path) -> None:
    cfg = tmp_path / "rtmp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            snapshot([{"name": "live", "publish_keys": [{"key": "k1", "stream": "cam"}]}])
        )
    )
    settings = RtmpSettings(
        data_port=0,
        grpc_port=0,
        admin_port=0,
        register_with_nlb=False,
        config_file=str(cfg),
        cluster_api_key=KEY,
    )
    hooks = RtmpHooks(settings)
    async with (
        asyncio.timeout(60),
        run_module(settings, hooks) as rt,
        aiohttp.ClientSession() as http,
    ):
        port = rt.data_address.port
        proto = await open_client("127.0.0.1", port, "live")
        pub = SyntheticPublisher(proto, await proto.publish("cam?key=k1"))
        pub.send_headers()
        player, rec = await play_client(port, "live", "cam")
        await pub.run(40, realtime=False)
        await wait_for(lambda: rec.video >= 10)
        admin = f"http://127.0.0.1:{rt.admin_address.port}"
        async with http.get(admin + "/status") as r:
            status = await r.json()
        stream = status["rtmp"]["applications"]["live"]["streams"][0]
        assert stream["name"] == "cam" and stream["players"] == 1
        assert stream["publisher"]["address"].startswith("127.0.0.1:")
        async with http.get(admin + "/metrics") as r:
            text = await r.text()
        assert "marchproxy_rtmp_players 1.0" in text
        assert "marchproxy_rtmp_publishes_total 1.0" in text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc_address.port}") as ch:
            stub = module_pb2_grpc.ModuleServiceStub(ch)
            resp = await stub.GetMetrics(
                module_pb2.GetMetricsRequest(), metadata=(("x-cluster-api-key", KEY),), timeout=10
            )
        values = {m.name: m.value for m in resp.metrics.metrics}
        assert values.get("players") == 1.0 and values.get("streams") == 1.0, resp
        player.close()
        proto.close()


async def test_status_values_and_grpc_status_and_stats(tmp_path: Path) -> None:
    cfg = tmp_path / "rtmp.yaml"
    cfg.write_text(yaml.safe_dump(snapshot([{"name": "live", "publish_open": True}])))
    settings = RtmpSettings(
        data_port=0,
        grpc_port=0,
        admin_port=0,
        register_with_nlb=False,
        config_file=str(cfg),
        cluster_api_key=KEY,
    )
    hooks = RtmpHooks(settings)
    frames = 75  # 2.5 s at 30 fps
    async with (
        asyncio.timeout(60),
        run_module(settings, hooks) as rt,
        aiohttp.ClientSession() as http,
    ):
        loop = asyncio.get_running_loop()
        port = rt.data_address.port
        proto = await open_client("127.0.0.1", port, "live")
        t_before_publish = loop.time()
        pub = SyntheticPublisher(proto, await proto.publish("cam"))
        t_published = loop.time()
        player, rec = await play_client(port, "live", "cam")
        pub.send_headers()
        t0 = loop.time()
        await pub.run(frames)  # paced at 30 fps
        sent_seconds = loop.time() - t0
        media = [video_frame(i, pub.gop, pub.video_size) + audio_frame(i) for i in range(frames)]
        payload = len(AVC_SEQUENCE_HEADER) + len(AAC_SEQUENCE_HEADER) + sum(map(len, media))
        stream = hooks.server.registry.get("live", "cam")
        assert stream is not None
        # the recorder counts the sequence headers too
        await wait_for(lambda: rec.video == rec.audio == frames + 1)
        t_before_status = loop.time()
        async with http.get(f"http://127.0.0.1:{rt.admin_address.port}/status") as r:
            status = (await r.json())["rtmp"]
        t_after_status = loop.time()
        entry = status["applications"]["live"]["streams"][0]
        assert entry["bytes_in"] == payload  # every media payload byte, sequence headers too
        # players get the payloads plus chunk headers, counted per player and per stream
        assert entry["bytes_out"] == entry["clients"][0]["bytes_out"]
        assert payload < entry["bytes_out"] <= player.bytes_in
        assert entry["video_frames"] == frames and entry["audio_frames"] == frames
        # bitrate over the last whole second of media, against what the publisher really sent
        sent_bps = (
            (payload - len(AVC_SEQUENCE_HEADER) - len(AAC_SEQUENCE_HEADER)) * 8 / sent_seconds
        )
        assert 0.6 * sent_bps < entry["bitrate_bps"] < 1.6 * sent_bps, (entry, sent_bps)
        assert t_before_status - t_published <= entry["uptime_seconds"]
        assert entry["uptime_seconds"] <= t_after_status - t_before_publish
        assert status["bytes_in"] >= payload and status["bytes_out"] >= entry["bytes_out"]
        assert status["streams"] == 1 and status["players"] == 1
        meta = {"x-cluster-api-key": KEY}.items()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc_address.port}") as ch:
            stub = module_pb2_grpc.ModuleServiceStub(ch)
            st = await stub.GetStatus(module_pb2.GetStatusRequest(), metadata=meta, timeout=10)
            stats = await stub.GetStats(module_pb2.GetStatsRequest(), metadata=meta, timeout=10)
        assert st.instance.module_type == types_pb2.MODULE_TYPE_RTMP
        assert list(st.instance.protocols) == [types_pb2.PROTOCOL_RTMP]
        assert st.instance.active_connections == 2 and not st.draining
        s = stats.stats
        assert s.active_connections == 2 and s.total_connections == 2
        assert s.total_requests == 2  # one publish, one play
        assert s.bytes_in >= status["bytes_in"] and s.bytes_out >= status["bytes_out"]
        assert s.custom["streams"] == 1.0 and s.custom["players"] == 1.0
        assert s.custom["frames_sent"] >= 2 * frames
        assert s.custom["ingest_bitrate_bps"] == entry["bitrate_bps"]
        player.close()
        proto.close()


class _ProxiedClient(RtmpClientProtocol):
    header = build_v2(("203.0.113.7", 5555), ("127.0.0.1", 1935))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.header)
        super().connection_made(transport)


async def test_proxy_protocol_v2_gives_real_client_address() -> None:
    async with (
        asyncio.timeout(30),
        run_server([{"name": "live", "publish_open": True}]) as (
            hooks,
            port,
        ),
    ):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_ProxiedClient, "127.0.0.1", port)
        await proto.connect("live", f"rtmp://127.0.0.1:{port}/live")
        await proto.publish("cam")
        app = hooks.status()["rtmp"]["applications"]["live"]
        assert app["streams"][0]["publisher"]["address"] == "203.0.113.7:5555"
        proto.close()


async def test_proxy_header_from_untrusted_peer_is_not_believed() -> None:
    apps = [{"name": "live", "publish_open": True}]
    trusted = {"proxy_trusted_sources": "10.0.0.0/8"}
    async with asyncio.timeout(30), run_server(apps, settings=trusted) as (hooks, port):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_ProxiedClient, "127.0.0.1", port)
        with pytest.raises(RtmpClientError):
            await proto.connect("live", f"rtmp://127.0.0.1:{port}/live")
        await asyncio.wait_for(proto.closed, 10)
        assert hooks.server.counters.protocol_errors == 1  # header bytes were not RTMP
        assert not hooks.server.registry.streams


def non_loopback_address() -> str | None:
    """One of this host's own addresses that is not loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


async def _proxied_publish(host: str, port: int) -> RtmpClientProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_ProxiedClient, host, port)
    await proto.connect("live", f"rtmp://{host}:{port}/live")
    await proto.publish("cam")
    return proto


async def test_proxy_header_is_believed_only_from_loopback_by_default() -> None:
    ip = non_loopback_address()
    if ip is None:
        pytest.skip("this host has no non-loopback address")
    apps = [{"name": "live", "publish_open": True}]
    assert RtmpSettings().proxy_trusted_networks() == ("127.0.0.0/8", "::1/128")
    async with asyncio.timeout(30), run_server(apps, settings={"data_host": ip}) as (hooks, port):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_ProxiedClient, ip, port)
        with pytest.raises(RtmpClientError):  # the header is passed on unparsed: not RTMP
            await proto.connect("live", f"rtmp://{ip}:{port}/live")
        await asyncio.wait_for(proto.closed, 10)
        assert hooks.server.counters.protocol_errors == 1
        assert not hooks.server.registry.streams
        # without a header the same peer is served, under its own address
        plain = await open_client(ip, port, "live")
        await plain.publish("cam")
        pub = hooks.status()["rtmp"]["applications"]["live"]["streams"][0]["publisher"]
        assert pub["address"].startswith(f"{ip}:")
        plain.close()
    # "*" trusts every peer (the old default), when the operator says so
    everyone = {"data_host": ip, "proxy_trusted_sources": "*"}
    async with asyncio.timeout(30), run_server(apps, settings=everyone) as (hooks, port):
        proto = await _proxied_publish(ip, port)
        pub = hooks.status()["rtmp"]["applications"]["live"]["streams"][0]["publisher"]
        assert pub["address"] == "203.0.113.7:5555"
        proto.close()


async def test_on_publish_callback() -> None:
    seen: list[dict[str, Any]] = []

    async def on_publish(request: web.Request) -> web.Response:
        form = dict(await request.post())
        seen.append(form)
        return web.Response(status=200 if form.get("token") == "ok" else 403)

    app = web.Application()
    app.router.add_post("/on_publish", on_publish)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    cb_port = runner.addresses[0][1]
    try:
        apps = [{"name": "live", "on_publish": f"http://127.0.0.1:{cb_port}/on_publish"}]
        async with asyncio.timeout(30), run_server(apps) as (_, port):
            good = await open_client("127.0.0.1", port, "live")
            await good.publish("cam?token=ok")
            bad = await open_client("127.0.0.1", port, "live")
            with pytest.raises(RtmpClientError, match="Unauthorized"):
                await bad.publish("cam2?token=no")
            good.close()
            bad.close()
        assert seen[0]["call"] == "publish" and seen[0]["name"] == "cam"
        assert seen[0]["app"] == "live" and seen[0]["addr"] == "127.0.0.1"
    finally:
        await runner.cleanup()
