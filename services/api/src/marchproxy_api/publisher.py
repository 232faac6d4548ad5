"""Desired state out of the API: Redis key + PUBLISH, retried until Redis takes it, and the
in-memory latest snapshots that long-poll clients wait on.

Commits happen in Postgres first; :meth:`StatePublisher.submit` is called after the commit and
never blocks on Redis. One worker task writes pending snapshots with a Lua script that only
replaces a key holding an older version, so concurrent writers (or API replicas) can never move
a component backwards.
"""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from marchproxy_api.metrics import ApiMetrics
from marchproxy_common.tasks import cancel_and_wait, spawn

_log = structlog.get_logger("marchproxy.api.publisher")

#: retry back-off bounds (seconds) while Redis is down
RETRY_MIN = 0.1
RETRY_MAX = 2.0
REDIS_TIMEOUT = 2.0

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
    def __init__(self, redis_url: str, prefix: str, metrics: ApiMetrics) -> None:
        self.prefix = prefix
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
        script = self._redis.register_script(_SET_IF_NEWER)
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            for comp, snap in list(self._pending.items()):
                version, text = snap
                try:
                    await script(
                        keys=[self.key(comp), f"{self.key(comp)}:version", self.channel],
                        args=[version, text, f"{comp} {version}"],
                    )
                except (RedisError, OSError) as exc:
                    self.redis_state = "down"
                    self.last_error = str(exc)[:200]
                    self._metrics.publishes.labels(comp, "error").inc()
                    _log.warning("state_publish_failed", component=comp, error=self.last_error)
                    self._wake.set()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    break
                delay = RETRY_MIN
                self.redis_state = "up"
                self.published[comp] = max(self.published.get(comp, 0), version)
                self._metrics.publishes.labels(comp, "ok").inc()
                if self._pending.get(comp) is snap:
                    del self._pending[comp]
            self._metrics.publish_pending.set(len(self._pending))
            if not self._pending:
                ev, self._changed_pending = self._changed_pending, asyncio.Event()
                ev.set()

    async def flushed(self) -> None:
        """Wait until nothing is pending (tests, shutdown); callers bound it with a timeout."""
        while self._pending:
            self._wake.set()
            ev = self._changed_pending
            await ev.wait()
