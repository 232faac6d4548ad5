"""Hypothesis against the live proxy: random and mutated request bytes, random splits. The ALB
must answer with an HTTP response or close, never hang, never hit an internal error, and keep
serving. The ALB and its backend run on their own loop in a thread; the test uses plain
blocking sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marchproxy_alb.module import AlbHooks
from tests.alb.alb_support import Backend, alb_settings, route, start_backend

VALID = [
    b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"GET /echo HTTP/1.0\r\n\r\n",
]


@dataclass
class Live:
    loop: asyncio.AbstractEventLoop
    hooks: AlbHooks
    backend: Backend
    port: int


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, object] = {}

    async def setup() -> None:
        b = await start_backend("fuzz")
        hooks = AlbHooks(alb_settings(alb_header_timeout=2.0))
        await hooks.start_data_plane()
        errors = await hooks.apply_config(
            {"modules": [], "routes": [route("all", b.url, backend={"timeout": 5})]}
        )
        assert errors == []
        box.update(b=b, hooks=hooks)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(setup())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, name="alb-fuzz-loop", daemon=True)
    t.start()
    assert ready.wait(30)
    hooks = box["hooks"]
    assert isinstance(hooks, AlbHooks)
    b = box["b"]
    assert isinstance(b, Backend)
    try:
        yield Live(loop, hooks, b, hooks.data_address.port)
    finally:

        async def teardown() -> None:
            await hooks.close()
            await b.stop()

        asyncio.run_coroutine_threadsafe(teardown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(30)
        loop.close()


def exchange(port: int, pieces: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for p in pieces:
                s.sendall(p)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the ALB may have answered and closed already
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, pos = [], 0
    for c in [*points, len(data)]:
        if c > pos:
            out.append(data[pos:c])
            pos = c
    return out


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "concat"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=300))
    base = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(base) - 1))
            op = draw(st.sampled_from(["flip", "drop", "insert"]))
            if op == "flip":
                base[i] = draw(st.integers(0, 255))
            elif op == "drop":
                del base[i]
            else:
                base[i:i] = draw(st.binary(min_size=1, max_size=8))
            if not base:
                base = bytearray(b"x")
    return bytes(base)


@settings(
    max_examples=int(os.environ.get("ALB_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=request_bytes(), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_random_bytes_never_break_the_proxy(live: Live, data: bytes, cuts: list[int]) -> None:
    out = exchange(live.port, split(data, cuts))
    assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:200]
    errors = live.hooks.metrics_registry.get_sample_value("marchproxy_alb_internal_errors_total")
    assert errors == 0


def test_still_serving_after_fuzz(live: Live) -> None:
    out = exchange(live.port, [b"GET /echo/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"])
    assert out.startswith(b"HTTP/1.1 200")
