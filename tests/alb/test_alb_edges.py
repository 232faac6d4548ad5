"""Edge cases of HTTP framing and failure handling, with raw-socket backends that misbehave
on purpose and real clients."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import pytest

from tests.alb.alb_support import raw_exchange, route

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawBackend:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def read_head(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


async def test_close_delimited_upstream_becomes_chunked(alb) -> None:
    async def h(r, w):
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello ")
        await w.drain()
        w.write(b"world")

    async with RawBackend(h) as be:
        await alb.configure([route("all", be.url)])
        async with aiohttp.ClientSession() as s, s.get(alb.url + "/x") as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert await resp.read() == b"hello world"


async def test_garbage_upstream_is_502(alb) -> None:
    async def h(r, w):
        await read_head(r)
        w.write(b"NOT-HTTP garbage\r\n\r\n")

    async with RawBackend(h) as be:
        await alb.configure([route("all", be.url, backend={"retries": 0})])
        async with httpx.AsyncClient() as c:
            resp = await c.get(alb.url + "/x")
        assert resp.status_code == 502


async def test_huge_upstream_header_in_pieces_is_502_early(alb) -> None:
    """A response head is bounded as it arrives, not when a header completes (httptools keeps
    a partial header value to itself)."""

    async def h(r, w):
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(64):  # up to 1 MiB, one piece at a time
            w.write(b"v" * 16384)
            await w.drain()
            await asyncio.sleep(0.005)
        await asyncio.sleep(30)

    async with RawBackend(h) as be:
        await alb.configure([route("all", be.url, backend={"timeout": 25, "retries": 0})])
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.get(alb.url + "/x")
    assert r.status_code == 502
    assert "head too large" in r.json()["message"]


async def test_upstream_dies_mid_body_cuts_the_client(alb, backends) -> None:
    async def h(r, w):
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    async with RawBackend(h) as be:
        await alb.configure([route("all", be.url, match={"path": "/cut"})])
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(alb.url + "/cut") as resp:
                    await resp.read()
    # the ALB itself is fine
    b = await backends()
    await alb.configure([route("all", b.url)])
    async with httpx.AsyncClient() as c:
        assert (await c.get(alb.url + "/ok")).status_code == 200


async def test_backend_closing_idle_keepalive_is_retried_transparently(alb) -> None:
    """A backend that closes after each response without saying so: reused pooled connections
    die under us; idempotent requests are re-sent on a fresh connection."""

    async def h(r, w):
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()

    async with RawBackend(h) as be:
        await alb.configure([route("all", be.url, backend={"retries": 0})])
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn) as s:
            for _ in range(15):
                async with s.get(alb.url + "/x") as resp:
                    assert resp.status == 200
                    assert await resp.read() == b"ok"
        assert be.connections >= 15


async def test_head_204_304_have_no_body_and_keep_alive(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    out = await raw_exchange(
        alb.port,
        b"HEAD /echo HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/304 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /echo/last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 204" in out and b"HTTP/1.1 304" in out
    assert out.count(b"HTTP/1.1 ") == 4
    assert out.rstrip().endswith(b"}")  # the last (GET) body; HEAD/204/304 added none
    assert len(b.peers) == 1


async def test_http10_client_gets_close_delimited_body(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    out = await raw_exchange(alb.port, b"GET /stream?n=3&size=5 HTTP/1.0\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"x" * 15


async def test_client_abort_mid_response_frees_upstream(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    writer.write(b"GET /stream?n=5000&size=65536 HTTP/1.1\r\nHost: a\r\n\r\n")
    async with asyncio.timeout(10):
        await reader.readexactly(100_000)
    writer.transport.abort()
    plane = alb.hooks.plane
    async with asyncio.timeout(15):
        while plane.upstreams.open_connections or plane.active_connections:
            await asyncio.sleep(0.02)
    assert alb.hooks.metrics_registry.get_sample_value("marchproxy_alb_internal_errors_total") == 0


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_leaving_before_the_head_releases_the_upstream_at_once(alb, how) -> None:
    """The upstream exchange is cancelled (connection closed, not pooled; target slot freed)
    when the client goes away (FIN after a keep-alive request, or RST) while we wait for the
    response head."""
    got_request = asyncio.Event()
    upstream_closed = asyncio.Event()

    async def h(r, w):
        await read_head(r)
        got_request.set()
        await r.read()  # never answers; returns once the proxy closes its side
        upstream_closed.set()

    async with RawBackend(h) as be:
        await alb.configure([route("hang", be.url, backend={"timeout": 60, "retries": 0})])
        _, writer = await asyncio.open_connection("127.0.0.1", alb.port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
        async with asyncio.timeout(10):
            await got_request.wait()
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        plane = alb.hooks.plane
        async with asyncio.timeout(10):  # long before the 60 s route timeout
            await upstream_closed.wait()
            while plane.upstreams.open_connections:
                await asyncio.sleep(0.02)
        assert [s["active"] for s in plane.pools["hang"].snapshot()] == [0]
        assert plane.upstreams.idle_connections == 0


async def test_one_shot_client_that_half_closes_still_gets_its_response(alb) -> None:
    """``Connection: close`` then shutdown(SHUT_WR), as ``nc -N`` does: a half-close, not a
    disconnect, so the response still comes."""

    async def h(r, w):
        await read_head(r)
        await asyncio.sleep(0.3)  # the client's FIN arrives before the answer
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await w.drain()

    async with RawBackend(h) as be:
        await alb.configure([route("all", be.url)])
        reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            writer.write_eof()
            async with asyncio.timeout(10):
                out = await reader.read()
                while chunk := await reader.read(65536):
                    out += chunk
        finally:
            writer.close()
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"late")


async def test_max_connections_refuses_with_503(alb_factory, backends) -> None:
    alb = await alb_factory(alb_max_connections=2)
    b = await backends()
    await alb.configure([route("all", b.url)])
    held = [await asyncio.open_connection("127.0.0.1", alb.port) for _ in range(2)]
    for _, w in held:
        w.write(b"GET")  # a first byte ends PROXY-header detection ("optional" mode)
    try:
        async with asyncio.timeout(10):
            while alb.hooks.plane.active_connections < 2:
                await asyncio.sleep(0.01)
        out = await raw_exchange(alb.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503")
    finally:
        for _, w in held:
            w.close()
    assert alb.hooks.plane.refusal_counts["max_connections"] == 1


async def test_drain_lets_in_flight_requests_finish(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    async with httpx.AsyncClient() as c:
        pending = asyncio.ensure_future(c.get(alb.url + "/slow?delay=0.5"))
        async with asyncio.timeout(10):
            while not b.requests:
                await asyncio.sleep(0.01)
        await alb.hooks.stop_accepting()
        loop = asyncio.get_running_loop()
        await alb.hooks.drain(loop.time() + 10)
        resp = await pending
    assert resp.status_code == 200 and resp.text == "late"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", alb.port)


async def test_idle_timeouts_both_directions(alb, backends) -> None:
    stall = asyncio.Event()

    async def h(r, w):
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await w.drain()
        await stall.wait()

    b = await backends()
    async with RawBackend(h) as be:
        await alb.configure(
            [
                route(
                    "stalls",
                    be.url,
                    match={"path": "/stall"},
                    backend={"idle_timeout": 0.3, "timeout": 30},
                ),
                route("upload", b.url, backend={"idle_timeout": 0.3, "timeout": 30}),
            ]
        )
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(alb.url + "/stall") as resp:
                    await resp.read()
        # a client that stops sending its body gets 408
        reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
        try:
            writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
            async with asyncio.timeout(10):
                out = await reader.read(4096)
            assert out.startswith(b"HTTP/1.1 408 ")
        finally:
            writer.close()
            stall.set()
    counts = alb.hooks.plane.refusal_counts
    assert counts["upstream_timeout"] == 1 and counts["body_idle_timeout"] == 1


async def test_reload_keeps_state_of_unchanged_routes_and_rejects_bad_sets(alb, backends) -> None:
    b1, b2 = await backends("b1"), await backends("b2")
    hc = {"path": "/healthz", "interval": 0.05}
    await alb.configure([route("a", b1.url, backend={"health_check": hc}), route("b", b2.url)])
    plane = alb.hooks.plane
    pool_a, pool_b = plane.pools["a"], plane.pools["b"]
    task_a = plane._health_tasks["a"][-1]
    await alb.configure(
        [route("a", b1.url, backend={"health_check": hc}), route("b", b1.url, priority=5)]
    )
    assert plane.pools["a"] is pool_a and plane._health_tasks["a"][-1] is task_a
    assert plane.pools["b"] is not pool_b  # its targets changed
    errors = await alb.hooks.apply_config(
        {"modules": [], "routes": [route("a", "not a url at all://")]}
    )
    assert errors
    assert plane.pools["a"] is pool_a  # the rejected snapshot changed nothing
    assert alb.hooks.metrics_registry.get_sample_value("marchproxy_alb_config_rejected_total") == 1


async def test_per_target_max_connections_sheds_load_with_503(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("cap", b.url, backend={"max_connections": 1})])
    async with httpx.AsyncClient() as c:
        first = asyncio.ensure_future(c.get(alb.url + "/slow?delay=1"))
        async with asyncio.timeout(10):
            while not b.requests:
                await asyncio.sleep(0.01)
        r = await c.get(alb.url + "/x")
        assert r.status_code == 503 and r.json()["error"] == "upstream_overflow"
        assert (await first).status_code == 200
        assert (await c.get(alb.url + "/x")).status_code == 200


async def test_request_version_wherever_the_request_line_sits(alb, backends) -> None:
    """The version of each request line (read from the line when it starts a read, else from
    llhttp): a pipelined HTTP/1.0 request after an HTTP/1.1 one, and one after an empty line,
    need no Host; an HTTP/1.1 request without Host is refused."""
    b = await backends()
    await alb.configure([route("all", b.url)])
    out = await raw_exchange(
        alb.port,
        b"GET /stream?n=1&size=3 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /stream?n=1&size=4 HTTP/1.0\r\n\r\n",
    )
    assert out.count(b"HTTP/1.1 200") == 2, out
    assert out.endswith(b"xxxx"), out
    out = await raw_exchange(alb.port, b"\r\nGET /stream?n=1&size=2 HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"xx"), out
    out = await raw_exchange(
        alb.port, b"GET /stream?n=1&size=2 HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 400"), out
