"""Client → NLB port → ALB → backend, in one process with real sockets: the NLB's data plane
sniffs HTTP, picks the registered ALB instance and sends PROXY v2 first; the ALB strips it and
forwards the real client address."""

from __future__ import annotations

import asyncio

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
