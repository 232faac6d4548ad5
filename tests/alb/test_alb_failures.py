"""504s through real sockets: a target that never completes the TCP handshake (a listener
with a full accept backlog, which works offline) and a target that accepts but does not send
its response head within header_timeout."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import httpx

from tests.alb.alb_support import route


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port whose SYNs go unanswered: listen(0) and a queued connection fill the accept
    queue, so the kernel drops further SYNs and connect() hangs until its timeout."""
    ls = socket.socket()
    fillers: list[socket.socket] = []
    try:
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        port = ls.getsockname()[1]
        for _ in range(2):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        yield port
    finally:
        for c in fillers:
            c.close()
        ls.close()


async def test_connect_timeout_is_504(alb) -> None:
    with black_hole() as port:
        await alb.configure(
            [
                route(
                    "hole",
                    f"http://127.0.0.1:{port}",
                    backend={"connect_timeout": 0.3, "timeout": 10, "retries": 0},
                )
            ]
        )
        async with httpx.AsyncClient(timeout=20) as c:
            r = await c.get(alb.url + "/x")
    assert r.status_code == 504
    assert r.json() == {
        "error": "upstream_timeout",
        "message": "upstream connect timed out",
        "details": {},
    }
    assert alb.hooks.plane.refusal_counts["upstream_connect_timeout"] == 1


async def test_connect_timeout_retries_another_target(alb, backends) -> None:
    b = await backends("alive")
    with black_hole() as port:
        await alb.configure(
            [
                route(
                    "pair",
                    [f"http://127.0.0.1:{port}", b.url],
                    backend={"connect_timeout": 0.3, "retries": 1},
                )
            ]
        )
        async with httpx.AsyncClient(timeout=20) as c:
            got = [(await c.get(alb.url + "/who")) for _ in range(4)]
    assert [(r.status_code, r.text) for r in got] == [(200, "alive")] * 4


async def test_upstream_header_timeout_is_504(alb, backends) -> None:
    b = await backends()
    await alb.configure(
        [route("slow", b.url, backend={"header_timeout": 0.3, "timeout": 20, "retries": 0})]
    )
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.get(alb.url + "/slow?delay=3")
        assert r.status_code == 504
        assert r.json()["error"] == "upstream_timeout"
        r = await c.get(alb.url + "/slow?delay=0.05")  # within header_timeout: fine
        assert r.status_code == 200 and r.text == "late"
    assert alb.hooks.plane.refusal_counts["upstream_timeout"] == 1
