"""Request-head limits through a real socket: a head that arrives in pieces is counted as it
arrives (httptools buffers a partial header without calling us), not when a header completes."""

from __future__ import annotations

import asyncio

import structlog

from tests.alb.alb_support import raw_exchange, route

HUGE = 12 * 1024 * 1024
PIECE = 64 * 1024


async def _send_pieces(port: int, first: bytes, piece: bytes, total: int) -> tuple[bytes, int]:
    """Send ``first`` then ``piece`` repeatedly (``total`` bytes at most) while reading the
    answer concurrently; returns (answer, bytes sent before the server stopped us)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0

    async def read_all() -> bytes:
        out = b""
        while chunk := await reader.read(65536):
            out += chunk
        return out

    answer = asyncio.ensure_future(read_all())
    try:
        writer.write(first)
        while sent < total and not answer.done():
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
            await asyncio.sleep(0.001)  # pieces, not one burst: each is its own read
    except ConnectionError:
        pass
    try:
        async with asyncio.timeout(20):
            return await answer, sent
    except ConnectionError:
        return b"", sent
    finally:
        writer.close()


async def test_huge_header_value_in_pieces_is_431_early(alb_factory, backends) -> None:
    alb = await alb_factory(alb_header_timeout=4)
    b = await backends()
    await alb.configure([route("all", b.url)])
    out, sent = await _send_pieces(
        alb.port, b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: ", b"v" * PIECE, HUGE
    )
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    assert sent < HUGE  # answered while the client was still sending
    assert alb.hooks.plane.refusal_counts["headers_too_large"] == 1
    assert b.requests == []


async def test_huge_header_name_in_pieces_is_431(alb_factory, backends) -> None:
    alb = await alb_factory(alb_header_timeout=4, alb_max_header_bytes=1024)
    b = await backends()
    await alb.configure([route("all", b.url)])
    out, sent = await _send_pieces(
        alb.port, b"GET /echo HTTP/1.1\r\nHost: a\r\nX-", b"n" * 512, 1 << 20
    )
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    assert sent < 1 << 20


async def test_long_request_target_in_pieces_is_414(alb_factory, backends) -> None:
    alb = await alb_factory(alb_header_timeout=4, alb_max_request_line=256)
    b = await backends()
    await alb.configure([route("all", b.url)])
    out, sent = await _send_pieces(alb.port, b"GET /", b"p" * 100, 1 << 20)
    assert out.startswith(b"HTTP/1.1 414 "), out[:200]
    assert sent < 1 << 20


async def test_header_count_limit_is_431(alb_factory, backends) -> None:
    alb = await alb_factory(alb_max_headers=20)
    b = await backends()
    await alb.configure([route("all", b.url)])
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(19))
    out = await raw_exchange(
        alb.port, b"GET /echo HTTP/1.1\r\nHost: a\r\n" + many + b"Connection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]  # 21 headers
    ok = b"".join(b"X-H%d: v\r\n" % i for i in range(18))
    out = await raw_exchange(
        alb.port, b"GET /echo HTTP/1.1\r\nHost: a\r\n" + ok + b"Connection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]  # exactly 20
    assert alb.hooks.plane.refusal_counts["headers_too_large"] == 1


async def test_pipelined_request_after_a_big_body_is_not_miscounted(alb_factory, backends) -> None:
    """A read holding the end of a large body and the start of the next head must not count
    the body towards the next head's limit."""
    alb = await alb_factory(alb_max_header_bytes=1024, alb_max_request_line=256)
    b = await backends()
    await alb.configure([route("all", b.url)])
    body = b"z" * 200_000
    data = (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
        + b"GET /echo/second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    out = await raw_exchange(alb.port, data)
    assert out.count(b"HTTP/1.1 200 OK") == 2, out[:300]


async def test_refusal_flood_is_counted_but_logged_sparingly(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("only", b.url, match={"path": "/only"})])
    now = [1000.0]
    alb.hooks.plane.clock = lambda: now[0]  # only the log limiter reads it after configure
    one = b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
    last = b"GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    with structlog.testing.capture_logs() as logs:
        out = await raw_exchange(alb.port, one * 49 + last)
        now[0] += 1.5
        await raw_exchange(alb.port, last)
    assert out.count(b"HTTP/1.1 404 ") == 50
    assert alb.hooks.plane.refusal_counts["no_route"] == 51  # every refusal is counted
    lines = [e for e in logs if e["event"] == "alb_refused" and e["reason"] == "no_route"]
    assert len(lines) == 2
    assert "suppressed" not in lines[0] and lines[1]["suppressed"] == 49
