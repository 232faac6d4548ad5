"""Desired state out of the API: Redis key + PUBLISH, retried until Redis takes it, and the
in-memory latest snapshots that long-poll clients wait on.

Commits happen in Postgres first; :meth:`StatePublisher.submit` is called after the commit and
never blocks on Redis. One worker task writes pending snapshots with a Lua script that only
replaces a key holding an older version, so concurrent writers (or API replicas) can never move
a component backwards.

Redis is a cache of desired state, not its truth: it may restart empty (no persistence) or
lose keys (FLUSH, eviction). The worker therefore checks every ``check_interval`` seconds, with
one EXISTS over all snapshot keys, that Redis still holds them, and queues every snapshot again
when one is missing or when Redis comes back after being unreachable, so data planes that
start later always find their state.
"""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from marchproxy_common.tasks import cancel_and_wait, spawn

from .metrics import ApiMetrics

_log = structlog.get_logger("marchproxy.api.publisher")

#: retry back-off bounds (seconds) while Redis is down
RETRY_MIN = 0.1
RETRY_MAX = 2.0
REDIS_TIMEOUT = 2.0
#: how often the worker checks that Redis still holds every snapshot (seconds)
CHECK_INTERVAL = 1.0

# KEYS: snapshot key, version key, channel; ARGV: version, body, message
_SET_IF_NEWER = """
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('EXISTS', KEYS[1]) == 1 and cur >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""


class StatePublisher:
    def __init__(
        self,
        redis_url: str,
        prefix: str,
        metrics: ApiMetrics,
        *,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.prefix = prefix
        self.check_interval = check_interval
        self.channel = f"{prefix}:state"
        self._metrics = metrics
        self._redis: Redis | None = (
            Redis.from_url(
                redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
            )
            if redis_url
            else None
        )
        #: component -> (version, snapshot JSON text)
        self.latest: dict[str, tuple[int, str]] = {}
        self.published: dict[str, int] = {}
        self._pending: dict[str, tuple[int, str]] = {}
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._changed_pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.redis_state = "disabled" if self._redis is None else "unknown"
        self.last_error = ""

    def key(self, component: str) -> str:
        return f"{self.prefix}:state:{component}"

    @property
    def pending(self) -> int:
        return len(self._pending)

    def version_of(self, component: str) -> int:
        snap = self.latest.get(component)
        return snap[0] if snap else 0

    def submit(self, snapshots: dict[str, tuple[int, str]]) -> None:
        """Record committed snapshots, wake long-pollers and queue them for Redis."""
        changed = False
        for comp, snap in snapshots.items():
            cur = self.latest.get(comp)
            if cur is not None and snap[0] < cur[0]:
                continue
            self.latest[comp] = snap
            changed = True
            if self._redis is not None:
                self._pending[comp] = snap
        if changed:
            self._metrics.publish_pending.set(len(self._pending))
            ev, self._changed = self._changed, asyncio.Event()
            ev.set()
            self._wake.set()

    async def wait_newer(self, component: str, after: int, wait: float) -> tuple[int, str] | None:
        """The latest snapshot of ``component`` newer than ``after``, waiting up to ``wait`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            snap = self.latest.get(component)
            if snap is not None and snap[0] > after:
                return snap
            left = deadline - loop.time()
            if left <= 0:
                return None
            ev = self._changed
            try:
                async with asyncio.timeout(left):
                    await ev.wait()
            except TimeoutError:
                return None

    async def start(self) -> None:
        if self._redis is not None and self._task is None:
            self._task = spawn(self._run(), name="state-publisher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._redis is not None:
            await self._redis.aclose()

    async def ping(self) -> bool:
        if self._redis is None:
            return False
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def _run(self) -> None:
        assert self._redis is not None
        delay = RETRY_MIN
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.check_interval
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_check - loop.time())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            ok = True
            if loop.time() >= next_check:
                next_check = loop.time() + self.check_interval
                ok = await self._check_keys()
            if ok and self._pending:
                ok = await self._publish_pending()
            self._metrics.publish_pending.set(len(self._pending))
            if not ok:
                self._wake.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            if not self._pending:
                ev, self._changed_pending = self._changed_pending, asyncio.Event()
                ev.set()

    async def _publish_pending(self) -> bool:
        """Write every pending snapshot in one pipelined round trip; False when Redis failed.

        EVAL, not EVALSHA: the script is 300 bytes next to snapshots of hundreds of KB, and it
        needs no SCRIPT EXISTS round trip nor NOSCRIPT handling after Redis restarts.
        """
        assert self._redis is not None
        batch = list(self._pending.items())
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for comp, (version, text) in batch:
                    key = self.key(comp)
                    pipe.eval(
                        _SET_IF_NEWER,
                        3,
                        key,
                        f"{key}:version",
                        self.channel,
                        version,
                        text,
                        f"{comp} {version}",
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            for comp, _ in batch:
                self._metrics.publishes.labels(comp, "error").inc()
            self._down(exc)
            return False
        self._up()
        for comp, snap in batch:
            self.published[comp] = max(self.published.get(comp, 0), snap[0])
            self._metrics.publishes.labels(comp, "ok").inc()
            if self._pending.get(comp) is snap:
                del self._pending[comp]
        return True

    async def _check_keys(self) -> bool:
        """One EXISTS over every snapshot key; queue them all again when one is missing."""
        assert self._redis is not None
        if not self.latest:
            return True
        keys = [self.key(comp) for comp in self.latest]
        try:
            present = int(await self._redis.exists(*keys))
        except (RedisError, OSError) as exc:
            self._down(exc)
            return False
        self._up()
        if present < len(keys):
            _log.warning("state_keys_missing", present=present, expected=len(keys))
            self._requeue_all("missing")
        return True

    def _requeue_all(self, reason: str) -> None:
        self._pending.update(self.latest)
        self._metrics.republishes.labels(reason).inc()
        self._wake.set()

    def _down(self, exc: BaseException) -> None:
        self.last_error = str(exc)[:200]
        if self.redis_state != "down":
            _log.warning("state_redis_unreachable", error=self.last_error)
        self.redis_state = "down"

    def _up(self) -> None:
        if self.redis_state == "down":
            # Redis may be a fresh, empty instance now: publish everything again
            _log.info("state_redis_reconnected")
            self._requeue_all("reconnect")
        self.redis_state = "up"

    async def flushed(self) -> None:
        """Wait until nothing is pending (tests, shutdown); callers bound it with a timeout."""
        while self._pending:
            self._wake.set()
            ev = self._changed_pending
            await ev.wait()
