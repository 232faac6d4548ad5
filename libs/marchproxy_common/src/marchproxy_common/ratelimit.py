"""Rate limiting: a pure token bucket, a Redis GCRA limiter and a cluster limiter with fallback.

API (stable):

- ``TokenBucket(rate, burst, clock=time.monotonic)``: ``rate`` tokens per second, ``burst`` the
  capacity (the bucket starts full). ``try_acquire(n=1) -> bool``, ``retry_after(n=1) -> float``
  (seconds until ``n`` tokens are there; ``0.0`` if now; ``inf`` if ``n > capacity``),
  ``tokens``, ``capacity``, ``rate``, ``allowed`` / ``denied`` counters, ``reconfigure(rate,
  burst)`` (keeps the current fill, clamped). No I/O, no locks: call it from one event loop.
- ``Decision(allowed, remaining, retry_after, reset_after)``: ``remaining`` whole tokens left,
  ``retry_after`` seconds until a denied request could pass (``0.0`` when allowed),
  ``reset_after`` seconds until the bucket is full again.
- ``RedisGCRA(client, prefix="marchproxy:rl:")``: ``await allow(key, rate, burst, n=1) ->
  Decision``. One atomic Lua script (GCRA, as redis-cell / go-redis/redis_rate), Redis ``TIME``
  as the shared clock, so any number of processes share one budget per key. Keys expire when
  the bucket would be full again. Raises ``redis.RedisError``/``OSError`` if Redis fails.
- ``ClusterLimiter(redis_url=None, *, prefix=..., backoff=RETRY_REDIS_AFTER, ...)``:
  ``await allow(key, rate, burst, n=1) -> Decision`` through Redis when a URL is given and it
  answers; otherwise (or for ``backoff`` seconds after a Redis failure) through local
  ``TokenBucket``s. ``backend`` (``"redis"``/``"local"``), ``redis_failures``,
  ``local_decisions``, ``redis_decisions``, ``allowed``/``denied`` counters, ``stats()`` (a dict
  for /status); ``await close()``. Local buckets are capped at ``MAX_LOCAL_BUCKETS`` (oldest
  dropped).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

__all__ = [
    "MAX_LOCAL_BUCKETS",
    "REDIS_TIMEOUT",
    "RETRY_REDIS_AFTER",
    "ClusterLimiter",
    "Decision",
    "RedisGCRA",
    "TokenBucket",
]

RETRY_REDIS_AFTER: Final = 5.0  # seconds of local-only limiting after a Redis failure
REDIS_TIMEOUT: Final = 0.25  # connect and per-command timeout: the data path cannot wait longer
MAX_LOCAL_BUCKETS: Final = 100_000  # per limiter; per-client-IP keys must not grow memory forever

_log = structlog.get_logger("marchproxy.ratelimit")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float


class TokenBucket:
    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens", "allowed", "denied")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        _check(rate, burst)
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self.allowed = 0
        self.denied = 0

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._stamp = now

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def capacity(self) -> float:
        return self._burst

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_acquire(self, n: float = 1) -> bool:
        self._refill()
        if n <= self._tokens:
            self._tokens -= n
            self.allowed += 1
            return True
        self.denied += 1
        return False

    def retry_after(self, n: float = 1) -> float:
        if n > self._burst:
            return math.inf
        self._refill()
        missing = n - self._tokens
        return 0.0 if missing <= 0 else missing / self._rate

    def reset_after(self) -> float:
        """Seconds until the bucket is full again."""
        self._refill()
        return (self._burst - self._tokens) / self._rate

    def reconfigure(self, rate: float, burst: float) -> None:
        _check(rate, burst)
        self._refill()
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = min(self._tokens, self._burst)

    def decide(self, n: float = 1) -> Decision:
        ok = self.try_acquire(n)
        return Decision(
            ok,
            int(self._tokens),
            0.0 if ok else self.retry_after(n),
            (self._burst - self._tokens) / self._rate,
        )


def _check(rate: float, burst: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number, got {rate}")
    if not (burst >= 1 and math.isfinite(burst)):
        raise ValueError(f"burst must be >= 1, got {burst}")


# GCRA (generic cell rate algorithm): the key holds the "theoretical arrival time" (TAT).
# ARGV: rate (tokens/s), burst, cost. Returns {allowed, remaining, retry_after, reset_after},
# floats as strings (Lua numbers become integers in Redis replies).
_GCRA_LUA: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) + tonumber(t[2]) / 1000000
local interval = 1.0 / rate
local increment = interval * cost
local burst_offset = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then
  tat = now
end
local new_tat = tat + increment
local diff = now - (new_tat - burst_offset)
if diff < 0 then
  local retry_after = -diff
  if increment > burst_offset then
    retry_after = -1
  end
  local remaining = math.floor((now - (tat - burst_offset)) / interval)
  return {0, remaining, tostring(retry_after), tostring(tat - now)}
end
local reset_after = new_tat - now
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(reset_after * 1000) + 1)
return {1, math.floor(diff / interval), '0', tostring(reset_after)}
"""


class RedisGCRA:
    def __init__(self, client: aioredis.Redis, prefix: str = "marchproxy:rl:") -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_GCRA_LUA)

    async def allow(self, key: str, rate: float, burst: float, n: float = 1) -> Decision:
        _check(rate, burst)
        reply: list[Any] = await self._script(keys=[self._prefix + key], args=[rate, burst, n])
        allowed, remaining, retry_after, reset_after = reply
        retry = float(retry_after)
        return Decision(
            bool(int(allowed)),
            max(0, int(remaining)),
            math.inf if retry < 0 else retry,
            max(0.0, float(reset_after)),
        )


class ClusterLimiter:
    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str = "marchproxy:rl:",
        backoff: float = RETRY_REDIS_AFTER,
        redis_timeout: float = REDIS_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        max_local_buckets: int = MAX_LOCAL_BUCKETS,
    ) -> None:
        self._clock = clock
        self._backoff = backoff
        self._max_local = max_local_buckets
        self._local: dict[str, TokenBucket] = {}
        self._client: aioredis.Redis | None = None
        self._gcra: RedisGCRA | None = None
        if redis_url:
            self._client = aioredis.Redis.from_url(
                redis_url,
                socket_timeout=redis_timeout,
                socket_connect_timeout=redis_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._gcra = RedisGCRA(self._client, prefix)
        self._redis_down_until = 0.0
        self.redis_failures = 0
        self.redis_decisions = 0
        self.local_decisions = 0
        self.allowed = 0
        self.denied = 0

    @property
    def backend(self) -> str:
        if self._gcra is not None and self._clock() >= self._redis_down_until:
            return "redis"
        return "local"

    @property
    def local_buckets(self) -> dict[str, TokenBucket]:
        return self._local

    async def allow(self, key: str, rate: float, burst: float, n: float = 1) -> Decision:
        decision: Decision | None = None
        if self._gcra is not None and self._clock() >= self._redis_down_until:
            try:
                decision = await self._gcra.allow(key, rate, burst, n)
                self.redis_decisions += 1
                if self._redis_down_until:
                    self._redis_down_until = 0.0
                    _log.info("ratelimit_redis_recovered", failures=self.redis_failures)
            except (RedisError, OSError) as exc:
                self.redis_failures += 1
                self._redis_down_until = self._clock() + self._backoff
                _log.warning(
                    "ratelimit_redis_unavailable",
                    error=repr(exc),
                    retry_in=self._backoff,
                    failures=self.redis_failures,
                )
        if decision is None:
            decision = self._local_bucket(key, rate, burst).decide(n)
            self.local_decisions += 1
        if decision.allowed:
            self.allowed += 1
        else:
            self.denied += 1
        return decision

    def _local_bucket(self, key: str, rate: float, burst: float) -> TokenBucket:
        bucket = self._local.get(key)
        if bucket is None:
            if len(self._local) >= self._max_local:
                del self._local[next(iter(self._local))]
            bucket = self._local[key] = TokenBucket(rate, burst, self._clock)
        elif bucket.rate != rate or bucket.capacity != burst:
            bucket.reconfigure(rate, burst)
        return bucket

    def stats(self) -> dict[str, int | str]:
        """A snapshot for /status."""
        return {
            "backend": self.backend,
            "redis_configured": int(self._gcra is not None),
            "redis_failures": self.redis_failures,
            "redis_decisions": self.redis_decisions,
            "local_decisions": self.local_decisions,
            "local_buckets": len(self._local),
            "allowed": self.allowed,
            "denied": self.denied,
        }

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
