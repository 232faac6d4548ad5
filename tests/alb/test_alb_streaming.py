"""Large bodies stream through with bounded memory; retries, ejection, 429 and WebSocket."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import httpx
import pytest

from tests.alb.alb_support import route

BIG = int(os.environ.get("ALB_TEST_BIG_BYTES", str(1024 * 1024 * 1024)))  # 1 GiB: ~1.5 s here
BLOCK = 256 * 1024


def rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_big_upload_and_download_bounded_memory(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url, backend={"timeout": 120})])
    block = b"\xab" * BLOCK
    samples = 0

    async def gen():
        nonlocal peak, samples
        for i in range(BIG // BLOCK):
            if i % 16 == 0:  # while the upload streams (client, ALB and backend share RSS)
                peak = max(peak, rss())
                samples += 1
            yield block

    before = rss()
    peak = before
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(alb.url + "/echo", data=gen()) as r:
            body = await r.json()
        assert body["body_len"] == BIG
        assert samples >= BIG // BLOCK // 16
        peak = max(peak, rss())
        n = BIG // BLOCK
        got = 0
        async with s.get(f"{alb.url}/stream?n={n}&size={BLOCK}") as r:
            async for chunk in r.content.iter_chunked(BLOCK):
                got += len(chunk)
                if got % (16 * BLOCK) == 0:
                    peak = max(peak, rss())
        assert got == BIG
    growth = peak - before
    # the body is 1 GiB each way; the proxy holds at most a few high-water marks of it
    assert growth < 64 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"


async def test_retry_and_ejection_when_a_backend_dies(alb, backends) -> None:
    b1 = await backends("b1")
    b2 = await backends("b2")
    await alb.configure(
        [
            route(
                "pair",
                [b1.url, b2.url],
                backend={
                    "retries": 2,
                    "outlier_detection": {
                        "consecutive_failures": 2,
                        "base_ejection_time": 60,
                        "max_ejection_percent": 50,
                    },
                },
            )
        ]
    )
    async with httpx.AsyncClient() as c:
        seen = {(await c.get(alb.url + "/who")).text for _ in range(4)}
        assert seen == {"b1", "b2"}
        await b2.stop()
        results = [await c.get(alb.url + "/who") for _ in range(20)]
    assert [r.status_code for r in results] == [200] * 20
    assert {r.text for r in results} == {"b1"}
    pool = alb.hooks.plane.pools["pair"]
    state = {s["target"]: s for s in pool.snapshot()}
    assert state[b2.url.replace("127.0.0.1", "127.0.0.1")]["ejected"] is True
    assert alb.hooks.status()["backends"]["pair"]
    metrics = alb.hooks.metrics_registry
    assert metrics.get_sample_value("marchproxy_alb_retries_total", {"route": "pair"}) >= 1


async def test_rate_limit_429_with_headers(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("rl", b.url, rate_limit={"requests_per_second": 0.5, "burst": 3})])
    async with httpx.AsyncClient() as c:
        ok = [await c.get(alb.url + "/x") for _ in range(3)]
        assert [r.status_code for r in ok] == [200, 200, 200]
        assert ok[0].headers["X-RateLimit-Limit"] == "3"
        assert ok[0].headers["X-RateLimit-Remaining"] == "2"
        r = await c.get(alb.url + "/x")
    assert r.status_code == 429
    assert r.json()["error"] == "rate_limited"
    assert r.headers["X-RateLimit-Limit"] == "3"
    assert r.headers["X-RateLimit-Remaining"] == "0"
    assert int(r.headers["Retry-After"]) >= 1
    assert int(r.headers["X-RateLimit-Reset"]) >= 1
    assert len(b.requests) == 3


@pytest.mark.parametrize("client", ["aiohttp", "websockets"])
async def test_websocket_echo_through_proxy(alb, backends, client: str) -> None:
    b = await backends()
    await alb.configure([route("ws", b.url, backend={"timeout": 1})])
    if client == "aiohttp":
        url = f"ws://127.0.0.1:{alb.port}/ws"
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            for i in range(20):
                await ws.send_str(f"m{i}")
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.data == f"echo:m{i}"
            await asyncio.sleep(1.2)  # longer than the route timeout: tunnels are not cut
            big = os.urandom(300_000)
            await ws.send_bytes(big)
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.data == big
    else:
        import websockets

        async with websockets.connect(f"ws://127.0.0.1:{alb.port}/ws") as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 10) == "echo:hello"
    async with asyncio.timeout(10):
        while alb.hooks.plane.active_connections:
            await asyncio.sleep(0.02)


async def test_idle_websocket_tunnel_is_closed(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("ws", b.url, backend={"tunnel_idle_timeout": 0.3})])
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{alb.port}/ws") as ws:
        await ws.send_str("x")
        assert (await asyncio.wait_for(ws.receive(), 10)).data == "echo:x"
        msg = await asyncio.wait_for(ws.receive(), 10)  # nothing more: the proxy closes it
        assert msg.type in (
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.ERROR,
        )
    assert alb.hooks.plane.refusal_counts["tunnel_idle"] == 1


async def test_consistent_hash_and_weighted_through_the_proxy(alb, backends) -> None:
    bs = [await backends(f"b{i}") for i in range(3)]
    await alb.configure(
        [
            route(
                "sticky",
                [x.url for x in bs],
                match={"path": "/sticky"},
                backend={"load_balancing": "consistent_hash", "hash_on": {"header": "x-user"}},
            ),
            route(
                "weighted",
                [{"target": bs[0].url, "weight": 3}, {"target": bs[1].url, "weight": 1}],
                match={"path": "/weighted"},
                backend={"load_balancing": "weighted"},
            ),
        ]
    )
    async with httpx.AsyncClient() as c:
        seen: dict[str, set[str]] = {}
        for i in range(40):
            user = f"u{i % 8}"
            r = await c.get(alb.url + "/sticky", headers={"X-User": user})
            seen.setdefault(user, set()).add(r.text)
        assert all(len(v) == 1 for v in seen.values()), seen
        assert len({next(iter(v)) for v in seen.values()}) > 1  # users spread over targets
        got = [(await c.get(alb.url + "/weighted")).text for _ in range(40)]
    assert got.count("b0") == 30 and got.count("b1") == 10


@pytest.mark.integration
async def test_cluster_rate_limit_shared_by_two_albs_through_redis(alb_factory, backends) -> None:
    """scope: cluster → one budget across instances (Redis GCRA on 127.0.0.1:6379)."""
    import uuid

    prefix = f"marchproxy:test:alb:{uuid.uuid4().hex}:"
    albs = [
        await alb_factory(redis_url="redis://127.0.0.1:6379/0", alb_ratelimit_prefix=prefix)
        for _ in range(2)
    ]
    b = await backends()
    rl = {"requests_per_second": 0.1, "burst": 4, "scope": "cluster"}
    for a in albs:
        await a.configure([route("shared", b.url, rate_limit=rl)])
    codes = []
    async with httpx.AsyncClient() as c:
        for i in range(6):
            r = await c.get(albs[i % 2].url + "/x")
            codes.append(r.status_code)
    assert codes == [200, 200, 200, 200, 429, 429]
    stats = albs[0].hooks.status()["cluster_rate_limiter"]
    assert stats["backend"] == "redis" and stats["redis_decisions"] >= 3
