"""Token bucket (injected clock), Redis GCRA shared by two clients, local fallback."""

from __future__ import annotations

import asyncio
import math
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_common.ratelimit import ClusterLimiter, Decision, RedisGCRA, TokenBucket
from tests.conftest import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


def test_bucket_starts_full_and_refills() -> None:
    clock = FakeClock()
    b = TokenBucket(rate=2, burst=5, clock=clock)
    assert b.capacity == 5
    assert b.tokens == 5
    assert all(b.try_acquire() for _ in range(5))
    assert not b.try_acquire()
    assert b.retry_after() == pytest.approx(0.5)
    assert b.retry_after(3) == pytest.approx(1.5)
    assert b.retry_after(6) == math.inf
    clock.advance(0.5)
    assert b.retry_after() == 0.0
    assert b.try_acquire()
    assert not b.try_acquire()
    clock.advance(100)
    assert b.tokens == 5  # capped at the burst
    assert b.try_acquire(5)
    assert (b.allowed, b.denied) == (7, 2)


def test_bucket_decide_and_reconfigure() -> None:
    clock = FakeClock()
    b = TokenBucket(rate=1, burst=3, clock=clock)
    assert b.decide() == Decision(True, 2, 0.0, 1.0)
    assert b.decide(2) == Decision(True, 0, 0.0, 3.0)
    assert b.decide() == Decision(False, 0, 1.0, 3.0)
    clock.advance(2)
    b.reconfigure(rate=10, burst=1)
    assert b.tokens == 1  # clamped to the new burst
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1, 0.5)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.1, 1000),
    st.integers(1, 100),
    st.lists(st.tuples(st.floats(0, 2), st.integers(1, 5)), max_size=200),
)
def test_bucket_never_allows_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    b = TokenBucket(rate, burst, clock)
    granted = 0
    elapsed = 0.0
    for dt, n in steps:
        clock.advance(dt)
        elapsed += dt
        before = b.retry_after(n)
        if b.try_acquire(n):
            granted += n
            assert before == 0.0
        else:
            assert before > 0
        assert 0 <= b.tokens <= burst
    assert granted <= burst + rate * elapsed + 1e-6


def _prefix() -> str:
    return f"test:rl:{uuid.uuid4().hex}:"


@pytest.mark.integration
async def test_redis_gcra_shares_one_budget_between_two_clients() -> None:
    prefix = _prefix()
    a = aioredis.Redis.from_url(REDIS_URL)
    b = aioredis.Redis.from_url(REDIS_URL)
    try:
        la, lb = RedisGCRA(a, prefix), RedisGCRA(b, prefix)
        results = []
        for i in range(20):
            limiter = la if i % 2 else lb
            results.append(await limiter.allow("client:1.2.3.4", rate=0.01, burst=5))
        assert sum(d.allowed for d in results) == 5
        assert [d.allowed for d in results[:5]] == [True] * 5
        assert results[0].remaining == 4
        assert results[4].remaining == 0
        denied = results[5]
        assert not denied.allowed
        assert 90 < denied.retry_after <= 100  # one token every 100 s
        assert denied.reset_after > 400
        ttl = await a.pttl(prefix + "client:1.2.3.4")
        assert 0 < ttl <= 500_001
        other = await la.allow("client:5.6.7.8", rate=0.01, burst=5)  # its own budget
        assert other.allowed
        too_big = await la.allow("client:9.9.9.9", rate=1, burst=2, n=3)
        assert not too_big.allowed
        assert too_big.retry_after == math.inf
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.integration
async def test_cluster_limiters_share_redis_budget() -> None:
    prefix = _prefix()
    one = ClusterLimiter(REDIS_URL, prefix=prefix)
    two = ClusterLimiter(REDIS_URL, prefix=prefix)
    try:
        allowed = 0
        for i in range(30):
            d = await (one if i % 3 else two).allow("listener:443", rate=0.01, burst=10)
            allowed += d.allowed
        assert allowed == 10
        assert one.backend == "redis"
        assert one.redis_failures == two.redis_failures == 0
        assert one.redis_decisions + two.redis_decisions == 30
        assert one.denied + two.denied == 20
    finally:
        await one.close()
        await two.close()


async def test_cluster_limiter_falls_back_to_local_and_retries_after_backoff() -> None:
    clock = FakeClock()
    limiter = ClusterLimiter(
        f"redis://127.0.0.1:{free_port()}/0", prefix=_prefix(), backoff=5.0, clock=clock
    )
    try:
        first = await limiter.allow("k", rate=1, burst=2)
        assert first.allowed
        assert limiter.redis_failures == 1
        assert limiter.backend == "local"
        assert (await limiter.allow("k", rate=1, burst=2)).allowed
        denied = await limiter.allow("k", rate=1, burst=2)
        assert not denied.allowed
        assert denied.retry_after == pytest.approx(1.0)
        assert limiter.redis_failures == 1  # no Redis attempt during the back-off
        assert limiter.local_decisions == 3
        clock.advance(5.0)
        assert limiter.backend == "redis"
        assert (await limiter.allow("k", rate=1, burst=2)).allowed  # refilled locally
        assert limiter.redis_failures == 2  # it tried Redis again, then fell back
        stats = limiter.stats()
        assert stats["backend"] == "local"
        assert (stats["redis_failures"], stats["local_decisions"], stats["allowed"]) == (2, 4, 3)
    finally:
        await limiter.close()


async def test_local_only_limiter_caps_bucket_count() -> None:
    clock = FakeClock()
    limiter = ClusterLimiter(None, clock=clock, max_local_buckets=3)
    for i in range(10):
        assert (await limiter.allow(f"ip:{i}", rate=1, burst=1)).allowed
    assert len(limiter.local_buckets) == 3
    assert not (await limiter.allow("ip:9", rate=1, burst=1)).allowed
    assert limiter.backend == "local"
    await limiter.close()


async def test_cluster_limiter_falls_back_when_redis_hangs() -> None:
    """A Redis that accepts but never answers costs one short timeout, then local limiting."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = ClusterLimiter(f"redis://127.0.0.1:{port}/0", prefix=_prefix(), redis_timeout=0.2)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(10):
            started = loop.time()
            decision = await limiter.allow("k", rate=1, burst=1)
            first_call = loop.time() - started
            assert decision.allowed
            assert limiter.redis_failures == 1
            assert limiter.local_decisions == 1
            assert first_call < 5  # bounded by the Redis timeout, not by a hang
            assert not (await limiter.allow("k", rate=1, burst=1)).allowed
            assert limiter.redis_failures == 1  # backing off: no second wait
    finally:
        await limiter.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
