"""The fast path (a bodiless keep-alive GET started from data_received on a pooled upstream
connection, finished from the upstream's callbacks) and its hand-overs to the connection's task,
through real sockets."""

from __future__ import annotations

import asyncio

import httptools

from tests.alb.alb_support import Alb, route


class _Responses:
    """Complete responses read off one keep-alive connection (status, headers, body)."""

    def __init__(self) -> None:
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._body = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""


async def _read(reader: asyncio.StreamReader, parsed: _Responses, n: int) -> None:
    async with asyncio.timeout(10):
        while len(parsed.done) < n:
            data = await reader.read(65536)
            assert data, "connection closed early"
            parsed.parser.feed_data(data)


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode()


async def _warm(alb: Alb, url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose first request (slow path: route cache miss, new upstream
    connection) is done, so the next GETs can take the fast path."""
    await alb.configure([route("all", url)])
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    writer.write(_get("/echo/warm"))
    parsed = _Responses()
    await _read(reader, parsed, 1)
    assert parsed.done[0][0] == 200
    return reader, writer


async def test_sequential_gets_take_the_fast_path_on_one_upstream_connection(alb, backends) -> None:
    b = await backends()
    reader, writer = await _warm(alb, b.url)
    plane = alb.hooks.plane
    parsed = _Responses()
    for i in range(20):
        writer.write(_get(f"/echo/{i}"))
        await _read(reader, parsed, i + 1)
        status, headers, body = parsed.done[-1]
        assert status == 200
        assert f'"/echo/{i}"'.encode() in body
        assert headers[b"via"] == b"1.1 marchproxy-alb"
        assert len(headers[b"x-request-id"]) == 32
        assert int(headers[b"content-length"]) == len(body)
    writer.close()
    assert plane.fast_requests >= 20
    assert len(b.requests) == 21
    assert len(b.peers) == 1, b.peers  # keep-alive reuse, counted on the upstream
    fwd = b.requests[-1]["headers"]
    assert fwd["X-Forwarded-For"] == "127.0.0.1"
    assert fwd["Via"] == "1.1 marchproxy-alb"
    assert fwd["Host"] == "a"  # preserve_host is the default
    assert "Connection" not in fwd or fwd["Connection"].lower() == "keep-alive"
    assert plane.requests_total == 21
    stats = plane.metrics.stats.requests
    assert stats[("all", "2xx")] == 21


async def test_pipelined_gets_answered_in_order_on_the_fast_path(alb, backends) -> None:
    b = await backends()
    reader, writer = await _warm(alb, b.url)
    plane = alb.hooks.plane
    before = plane.fast_requests
    parsed = _Responses()
    for batch in range(3):
        writer.write(b"".join(_get(f"/echo/{batch}-{i}") for i in range(8)))
        await _read(reader, parsed, (batch + 1) * 8)
    writer.close()
    paths = [body.split(b'"path": "', 1)[1].split(b'"', 1)[0] for _, _, body in parsed.done]
    assert paths == [f"/echo/{batch}-{i}".encode() for batch in range(3) for i in range(8)]
    assert all(status == 200 for status, _, _ in parsed.done)
    assert plane.fast_requests - before == 24
    assert len(b.peers) == 1, b.peers  # one request at a time: one upstream connection


async def test_chunked_response_is_handed_over_and_the_connection_goes_on(alb, backends) -> None:
    b = await backends()
    reader, writer = await _warm(alb, b.url)
    parsed = _Responses()
    writer.write(_get("/stream?n=50&size=3000&delay=0.001") + _get("/echo/after"))
    await _read(reader, parsed, 2)
    (s1, h1, body1), (s2, _, body2) = parsed.done
    assert s1 == 200 and h1[b"transfer-encoding"] == b"chunked"
    assert body1 == b"x" * 150_000
    assert s2 == 200 and b'"/echo/after"' in body2
    writer.write(_get("/echo/again"))
    await _read(reader, parsed, 3)
    assert parsed.done[2][0] == 200
    writer.close()
    assert len(b.peers) == 1, b.peers


async def test_upstream_timeout_on_the_fast_path_is_504(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url, backend={"timeout": 0.3})])
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    parsed = _Responses()
    writer.write(_get("/echo/warm"))
    await _read(reader, parsed, 1)
    before = alb.hooks.plane.fast_requests
    writer.write(_get("/slow?delay=2"))
    await _read(reader, parsed, 2)
    assert parsed.done[1][0] == 504
    assert alb.hooks.plane.fast_requests == before + 1
    assert await reader.read() == b""  # as on the slow path, a 5xx answer ends the connection
    writer.close()


async def test_client_leaving_mid_fast_exchange_frees_the_upstream(alb, backends) -> None:
    b = await backends()
    _reader, writer = await _warm(alb, b.url)
    plane = alb.hooks.plane
    before = plane.fast_requests
    writer.write(_get("/slow?delay=5"))
    await asyncio.sleep(0.2)
    assert plane.fast_requests == before + 1
    writer.close()
    async with asyncio.timeout(3):
        while plane.active_connections or plane.upstreams.open_connections:
            await asyncio.sleep(0.02)
    pool = plane.pools["all"]
    assert all(s.active == 0 for s in pool.states.values())
    assert plane.metrics.stats.requests.get(("all", "4xx")) == 1  # 499, client closed


async def test_upstream_closing_a_pooled_connection_is_retried(alb, backends) -> None:
    """The backend answers the first request and closes the connection right after: the next
    fast-path GET may go out on it before the close is seen; it is retried, not failed."""
    hits = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        await reader.readuntil(b"\r\n\r\n")
        hits += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await alb.configure([route("all", f"http://127.0.0.1:{port}")])
        reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
        parsed = _Responses()
        for i in range(6):
            writer.write(_get(f"/{i}"))
            await _read(reader, parsed, i + 1)
            assert parsed.done[-1][0] == 200, parsed.done[-1]
            await asyncio.sleep(0.03 if i % 2 else 0.1)
        writer.close()
        assert hits == 6
    finally:
        server.close()
        await server.wait_closed()
