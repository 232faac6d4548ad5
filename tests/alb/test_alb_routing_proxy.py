"""The routing matrix of test_alb_routing.py again, through a real socket: every route points
at its own port of one backend, which answers with the port the request came in on."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from aiohttp import web

from tests.alb.alb_support import raw_exchange
from tests.alb.test_alb_routing import CASES, ROUTES


@pytest.fixture
async def ports_backend() -> AsyncIterator[dict[str, int]]:
    """One aiohttp app listening on one port per route name."""

    async def which(request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        return web.Response(text=str(sock[1] if sock else 0))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", which)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports: dict[str, int] = {}
    for r in ROUTES:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports[r["name"]] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield ports
    await runner.cleanup()


@pytest.mark.parametrize(("host", "path", "method", "headers", "query", "want"), CASES)
async def test_routing_matrix_through_the_proxy(
    alb, ports_backend, host, path, method, headers, query, want
) -> None:
    routes = copy.deepcopy(ROUTES)
    for r in routes:
        r["backend_config"]["target"] = f"http://127.0.0.1:{ports_backend[r['name']]}"
    await alb.configure(routes)
    target = quote(path) + (f"?{query}" if query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += ["Connection: close", "", ""]
    out = await raw_exchange(alb.port, "\r\n".join(lines).encode())
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    by_port = {str(p): name for name, p in ports_backend.items()}
    assert by_port[out.split(b"\r\n\r\n", 1)[1].decode()] == want


async def test_remembered_matches_follow_a_new_table(alb, backends) -> None:
    """Tables without header/query rules remember matches by host, path and method; a new
    table starts afresh, and hosts or paths too long to remember still route."""
    b1, b2 = await backends("b1"), await backends("b2")
    routes = [
        {"name": "a", "match_rules": {"path": "/a"}, "backend_config": {"target": b1.url}},
        {"name": "b", "match_rules": {"path": "/b"}, "backend_config": {"target": b2.url}},
    ]
    await alb.configure(routes)
    assert alb.hooks.plane._route_cache is not None

    async def who(path: str, host: str = "h") -> bytes:
        req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        out = await raw_exchange(alb.port, req)
        return out.split(b"\r\n\r\n", 1)[1] if out.startswith(b"HTTP/1.1 200") else out[:12]

    assert [await who(p) for p in ("/a", "/a", "/b/x", "/b/x")] == [b"b1", b"b1", b"b2", b"b2"]
    assert await who("/nope") == b"HTTP/1.1 404"
    assert await who("/a/" + "x" * 600) == b"b1"  # too long to remember: matched every time
    routes[0]["backend_config"]["target"], routes[1]["backend_config"]["target"] = b2.url, b1.url
    await alb.configure(routes)
    assert [await who(p) for p in ("/a", "/b/x")] == [b"b2", b"b1"]
