"""Client → NLB port → ALB → backend, in one process with real sockets: the NLB's data plane
sniffs HTTP, picks the registered ALB instance and sends PROXY v2 first; the ALB strips it and
forwards the real client address."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import httpx

from marchproxy.v1 import types_pb2
from marchproxy_nlb.config import NlbSettings
from marchproxy_nlb.metrics import NlbMetrics
from marchproxy_nlb.registry.table import InstanceRegistry
from marchproxy_nlb.traffic.plane import DataPlane as NlbDataPlane
from tests.alb.alb_support import route


async def test_client_to_nlb_to_alb_to_backend(alb, backends) -> None:
    b = await backends("origin")
    await alb.configure(
        [
            route("api", b.url, match={"host": "api.example.com", "path": "/echo"}, priority=10),
            route("ws", b.url, match={"host": "api.example.com", "path": "/ws"}),
        ]
    )
    settings = NlbSettings(
        nlb_listeners="0=http", nlb_sniff_timeout=0.2, nlb_connect_timeout=2.0, redis_url=""
    )
    registry = InstanceRegistry(heartbeat_timeout=30)
    nlb = NlbDataPlane(settings, registry, NlbMetrics())
    await nlb.start()
    try:
        registry.register(
            module_id="alb",
            module_type=types_pb2.MODULE_TYPE_ALB,
            protocols=(types_pb2.PROTOCOL_HTTP,),
            data_host="127.0.0.1",
            data_port=alb.port,
            instance_id="alb-1",
            version="1.0",
        )
        port = nlb.listener_addresses()[0][1]
        async with httpx.AsyncClient() as c:
            r = await c.get(
                f"http://127.0.0.1:{port}/echo/through", headers={"Host": "api.example.com"}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["path"] == "/echo/through"
            assert body["headers"]["X-Forwarded-For"] == "127.0.0.1"  # from the PROXY header
            assert body["headers"]["Host"] == "api.example.com"
            r = await c.get(f"http://127.0.0.1:{port}/other", headers={"Host": "x.example.com"})
            assert r.status_code == 404 and r.json()["error"] == "no_route"
        # a WebSocket echo through both hops (NLB relay, then the ALB's tunnel)
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(f"ws://127.0.0.1:{port}/ws", headers={"Host": "api.example.com"}) as ws,
        ):
            await ws.send_str("via nlb")
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.data == "echo:via nlb"
    finally:
        await nlb.stop_accepting()
        await nlb.drain(asyncio.get_running_loop().time() + 2)
    assert alb.hooks.plane.requests_total >= 2


async def test_nlb_hands_connections_to_a_co_located_alb(backends, tmp_path) -> None:
    """With HANDOFF_PATH set, the ALB's runtime advertises a hand-over socket; the NLB passes
    the client socket there (SCM_RIGHTS) instead of relaying, so the ALB talks to the client
    directly and sees its real address. When the hand-over fails the NLB relays as before."""
    from prometheus_client import generate_latest

    from marchproxy_alb.module import AlbHooks
    from marchproxy_common.module.runtime import ModuleRuntime
    from tests.alb.alb_support import Alb, alb_settings, make_cert, tls_get

    b = await backends("origin")
    cert, key = make_cert(tmp_path, "a.example.com")
    settings = alb_settings(
        handoff_path=str(tmp_path / "alb.sock"), grpc_port=0, admin_port=0, alb_tls_port=0
    )
    runtime = ModuleRuntime(settings, AlbHooks(settings))
    await runtime.start()
    nlb_settings = NlbSettings(
        nlb_listeners="0=http,tls", nlb_sniff_timeout=0.2, nlb_connect_timeout=2.0, redis_url=""
    )
    registry = InstanceRegistry(heartbeat_timeout=30)
    metrics = NlbMetrics()
    nlb = NlbDataPlane(nlb_settings, registry, metrics)
    await nlb.start()

    def handoffs(result: str) -> float:
        text = generate_latest(metrics.registry).decode()
        prefix = f'nlb_handoffs_total{{module="alb",result="{result}"}} '
        line = next((x for x in text.splitlines() if x.startswith(prefix)), prefix + "0")
        return float(line.rsplit(" ", 1)[1])

    try:
        alb = Alb(runtime.hooks)  # type: ignore[arg-type]
        tls = {"certificates": [{"server_names": ["a.example.com"], "cert_file": cert,
                                 "key_file": key}]}  # fmt: skip
        await alb.configure(
            [
                route("api", b.url, match={"host": "api.example.com"}),
                route("secure", b.url, match={"host": "a.example.com"}),
            ],
            {"tls": tls},
        )
        request = runtime._register_request()
        assert request.labels["handoff_path"] == settings.handoff_path

        def register(instance_id: str) -> None:
            registry.register(
                module_id="alb",
                module_type=request.module_type,
                protocols=tuple(request.protocols),
                data_host=request.data_address.host,
                data_port=request.data_address.port,
                instance_id=instance_id,
                version="1.0",
                labels=dict(request.labels),
                addresses={
                    pa.protocol: (pa.address.host, pa.address.port)
                    for pa in request.protocol_addresses
                },
            )

        # as if registered from another host with the same HANDOFF_PATH: the ALB answering on
        # that path greets as another instance, so the NLB relays (to the address registered)
        register("alb-elsewhere")
        port = nlb.listener_addresses()[0][1]
        url = f"http://127.0.0.1:{port}/echo/handed"
        headers = {"Host": "api.example.com"}
        async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
            assert r.status == 200, await r.text()
        assert handoffs("failed") == 1 and handoffs("ok") == 0
        registry.unregister("alb-elsewhere", graceful=False)
        register(runtime.instance_id)
        # a client on another loopback address: the NLB connects to modules from 127.0.0.1
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=1)
        async with aiohttp.ClientSession(connector=connector) as s:
            for _ in range(3):  # one keep-alive connection, handed over once
                async with s.get(url, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    body = await r.json()
                assert body["headers"]["X-Forwarded-For"] == "127.0.0.2"
            assert handoffs("ok") == 1
            assert not nlb._relays  # the NLB is not in the data path of the open connection
            assert runtime.status()["handoff"]["adopted"] == 1
        # TLS on the same NLB port goes to the ALB's TLS listener, which terminates it
        cn, data = await tls_get(port, "a.example.com", cert, "/echo/tls")
        assert cn == "a.example.com" and data.startswith(b"HTTP/1.1 200"), data[:200]
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]["X-Forwarded-Proto"] == (
            "https"
        )
        assert handoffs("ok") == 2
        assert runtime._handoff is not None
        await runtime._handoff.close()  # the module's hand-over socket is gone: relayed
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            for _ in range(2):
                async with s.get(url, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    body = await r.json()
                assert body["headers"]["X-Forwarded-For"] == "127.0.0.2"  # PROXY header
            cn, data = await tls_get(port, "a.example.com", cert, "/echo/tls-relayed")
            assert cn == "a.example.com" and data.startswith(b"HTTP/1.1 200"), data[:200]
        assert handoffs("failed") == 2  # then not tried again for a while
        assert handoffs("ok") == 2
    finally:
        await nlb.stop_accepting()
        await nlb.drain(asyncio.get_running_loop().time() + 2)
        await runtime.stop()
