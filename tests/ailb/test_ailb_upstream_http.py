"""The upstream HTTP client's response handling: any split of a response (Content-Length or
chunked) gives the same status, headers and body; garbage only fails the request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_ailb.errors import UpstreamError
from marchproxy_ailb.providers.base import relay
from marchproxy_ailb.providers.openai import OpenAIStreamDecoder
from marchproxy_ailb.upstream_http import UpstreamPool, UpstreamResponse, _Conn


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.paused = False

    def write(self, data: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def response(body: bytes, chunked: bool, pieces: int) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Test: 1\r\n"
    if not chunked:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    out = head + b"Transfer-Encoding: chunked\r\n\r\n"
    step = max(1, len(body) // max(1, pieces))
    for i in range(0, len(body), step):
        part = body[i : i + step]
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


async def _feed(data_pieces: list[bytes]) -> tuple[int, dict[str, str], bytes, bool]:
    pool = UpstreamPool("http://127.0.0.1:1/v1")
    conn = _Conn(pool)
    conn.connection_made(FakeTransport())

    async def reader() -> bytes:
        await conn.head
        out = b""
        while (chunk := await conn.next_chunk()) is not None:
            out += chunk
        return out

    task = asyncio.ensure_future(reader())
    for piece in data_pieces:
        conn.data_received(piece)
        await asyncio.sleep(0)
    body = await asyncio.wait_for(task, 5)
    return conn.status, conn.headers, body, conn.keep_alive


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=2000),
    st.booleans(),
    st.integers(1, 7),
    st.lists(st.integers(min_value=0), max_size=15),
)
def test_any_split_same_response(body: bytes, chunked: bool, pieces: int, cuts: list[int]) -> None:
    raw = response(body, chunked, pieces)
    status, headers, got, keep_alive = asyncio.run(_feed(splits(raw, cuts)))
    assert (status, got, keep_alive) == (200, body, True)
    assert headers["x-test"] == "1"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_fails_the_request(data: bytes) -> None:
    async def run() -> None:
        pool = UpstreamPool("http://127.0.0.1:1")
        conn = _Conn(pool)
        transport = FakeTransport()
        conn.connection_made(transport)
        conn.data_received(b"XTTP/9 nonsense\r\n" + data)
        if conn.error is not None:
            assert isinstance(conn.error, UpstreamError)
            assert transport.closed
        conn.connection_lost(None)
        assert conn.closed

    asyncio.run(run())


async def _chunked_stream() -> _Conn:
    """An upstream connection that has read the head of a chunked event stream."""
    conn = _Conn(UpstreamPool("http://127.0.0.1:1/v1"))
    conn.connection_made(FakeTransport())
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    conn.data_received(head + b"Transfer-Encoding: chunked\r\n\r\n")
    await conn.head
    return conn


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_chunks_that_arrive_together_are_read_together() -> None:
    """A stream's HTTP chunks that came in one network read (several SSE events at once) are
    handed on as one piece, so the gateway relays them to its client in one write; a chunk
    that arrives later is a piece of its own, handed on as soon as it is there."""
    events = [b'data: {"n": %d}\n\n' % i for i in range(4)]

    async def run() -> None:
        conn = await _chunked_stream()
        conn.data_received(b"".join(map(_chunk, events[:3])))
        assert await conn.next_chunk() == b"".join(events[:3])
        assert conn.buffered == 0
        later = asyncio.ensure_future(conn.next_chunk())
        await asyncio.sleep(0)
        assert not later.done()
        conn.data_received(_chunk(events[3]))
        assert await asyncio.wait_for(later, 5) == events[3]
        conn.data_received(b"0\r\n\r\n")
        assert await conn.next_chunk() is None

    asyncio.run(run())


def test_events_before_an_error_in_the_same_read_still_reach_the_client() -> None:
    """Two content events and an error event in one read: the relay yields the two first
    (the client gets them), then raises the error (sent in-band after them)."""
    good = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "%d"}}]}\n\n' % i for i in (1, 2)
    ]
    bad = b'data: {"error": {"message": "overloaded"}}\n\n'

    async def run() -> None:
        conn = await _chunked_stream()
        conn.data_received(b"".join(map(_chunk, [*good, bad])))
        chunks = relay(UpstreamResponse(conn), OpenAIStreamDecoder(), 5.0)
        batch = await anext(chunks)
        assert [c["choices"][0]["delta"]["content"] for c in batch] == ["1", "2"]
        with pytest.raises(UpstreamError, match="upstream stream error"):
            await anext(chunks)
        assert conn.closed  # not back to the pool: the stream did not end well

    asyncio.run(run())


def test_a_stream_that_arrived_whole_leaves_no_stall_timer_behind() -> None:
    """A fast upstream's whole answer can be in before the relay starts watching for stalls:
    nothing can stall then, and no timer may be armed. (One was, for the deployment's whole
    timeout: at thousands of streams a second they held tens of MiB until they expired.)"""
    events = [b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"]

    async def run() -> None:
        conn = await _chunked_stream()
        conn.data_received(b"".join(map(_chunk, events)) + b"0\r\n\r\n")
        assert conn.complete
        resp = UpstreamResponse(conn)
        batches = [b async for b in relay(resp, OpenAIStreamDecoder(), 60.0)]
        assert batches == [[{"choices": []}]]
        assert conn._stall_handle is None
        loop = asyncio.get_running_loop()
        live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert live == []

    asyncio.run(run())
