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
