"""Desired-state client used by every data plane (docs/desired-state.md).

Sources, in order: a static file (``config_file``: loaded once, nothing watched); Redis (GET
``<prefix>:state:<component>``, then SUBSCRIBE ``<prefix>:state`` and re-fetch when the version
moves); the API long poll (``GET /api/v1/state/<component>?after=<v>``) when Redis is not
configured or not reachable. With no reachable source the client keeps the last applied state
(``fail_static``) and keeps retrying with back-off.

Rules: a snapshot older than (or equal to) the applied one is never applied; a snapshot whose
``apply`` returns errors (or raises) is rejected whole, counted, and the previous stays in force;
the same rejected version is not retried. Each outcome is reported to the API (ACK/NACK, best
effort) when ``api_url`` is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from marchproxy_common.configfile import ConfigFileError, load_config_file
from marchproxy_common.http1_client import call
from marchproxy_common.tasks import cancel_and_wait, spawn

Apply = Callable[[Mapping[str, Any]], Awaitable[list[str]]]

_log = structlog.get_logger("marchproxy.state")

CLUSTER_KEY_HEADER = "X-Cluster-Api-Key"
#: reconnect back-off bounds (seconds)
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
#: Redis connect/read timeouts (seconds)
REDIS_CONNECT_TIMEOUT = 2.0
REDIS_READ_TIMEOUT = 5.0
#: how long one pub/sub read waits before checking hints and stop (seconds)
PUBSUB_TICK = 0.5
#: while Redis is down, one API long poll lasts at most this long before Redis is retried
FALLBACK_POLL_SECONDS = 5.0
#: extra HTTP time on top of the long-poll wait (seconds)
HTTP_SLACK = 10.0
ACK_TIMEOUT = 5.0
DEFAULT_PREFIX = "marchproxy"
MAX_REASON = 2000
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024


class StateSourceError(Exception):
    """A source answered with something that is not a snapshot."""


class StateClient:
    def __init__(
        self,
        component: str,
        apply: Apply,
        *,
        redis_url: str = "",
        api_url: str = "",
        cluster_api_key: str = "",
        config_file: str = "",
        prefix: str = "",
        poll_timeout: float = 30.0,
        instance_id: str = "",
    ) -> None:
        self.component = component
        self._apply = apply
        self.redis_url = redis_url
        self.api_url = api_url.rstrip("/")
        self.cluster_api_key = cluster_api_key
        self.config_file = config_file
        # STATE_PREFIX lets several stacks share one Redis (tests, staging); DESIGN default.
        self.prefix = prefix or os.environ.get("STATE_PREFIX", "") or DEFAULT_PREFIX
        self.poll_timeout = poll_timeout
        self.instance_id = instance_id or f"{component}-{socket.gethostname()}-{os.getpid()}"
        self.applied_version = 0
        self.rejected_version = 0
        self.rejected_reason = ""
        self.applied_total = 0
        self.rejected_total = 0
        self.source = "none"
        self.fail_static = False
        self.last_update = 0.0
        self.last_error = ""
        self._applied_once = False
        self._lock = asyncio.Lock()
        self._hint = asyncio.Event()
        self._hinted = 0  # the highest version a hint already asked about
        self._ack_dirty = asyncio.Event()
        self._stopping = False
        self._redis: Redis | None = None
        self._api = False  # the API is a source (api_url set and started)
        self._watcher: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ public API
    @property
    def key(self) -> str:
        return f"{self.prefix}:state:{self.component}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:state"

    async def start(self) -> None:
        if self.config_file:
            try:
                snapshot = load_config_file(self.config_file)
            except ConfigFileError as exc:
                self._record_reject(int(_version_of({})), str(exc))
                raise
            self.source = "file"
            await self._offer(snapshot, "file")
            return
        if self.api_url:
            self._api = True
            self._acker = spawn(self._ack_loop(), name=f"state-ack {self.component}")
        if self.redis_url:
            self._redis = Redis.from_url(
                self.redis_url,
                socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
                socket_timeout=REDIS_READ_TIMEOUT,
            )
        await self._initial_fetch()
        if self._redis is not None:
            self._watcher = spawn(self._watch_redis(), name=f"state-redis {self.component}")
        elif self._api:
            self._watcher = spawn(self._watch_api(), name=f"state-api {self.component}")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._watcher, self._acker)
        self._watcher = self._acker = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._api = False

    def hint(self, version: int) -> None:
        """Another signal (e.g. a heartbeat response) saw ``version``: re-fetch soon if newer.

        Versions are global, so another component's newer version may leave this one unchanged:
        each newer version triggers one re-fetch, not one per heartbeat.
        """
        if version > max(self.applied_version, self._hinted) and version != self.rejected_version:
            self._hinted = version
            self._hint.set()

    def status(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "instance_id": self.instance_id,
            "applied_version": self.applied_version,
            "rejected_version": self.rejected_version,
            "rejected_reason": self.rejected_reason,
            "applied_total": self.applied_total,
            "rejected_total": self.rejected_total,
            "source": self.source,
            "fail_static": self.fail_static,
            "last_update": self.last_update,
            "last_error": self.last_error,
        }

    async def wait_for_version(self, version: int) -> None:
        """Wait until a version >= ``version`` is applied (callers bound it with a timeout)."""
        while self.applied_version < version:
            ev = self._changed
            await ev.wait()

    # ------------------------------------------------------------------ applying
    async def _offer(self, snapshot: Mapping[str, Any], source: str) -> bool:
        """Apply ``snapshot`` if it is newer than what runs; True when it was applied."""
        async with self._lock:
            version = _version_of(snapshot)
            if self._applied_once and version <= self.applied_version:
                return False
            if version and version == self.rejected_version:
                return False
            try:
                errors = list(await self._apply(snapshot))
            except Exception as exc:  # a data plane bug must not kill the watcher
                _log.exception("state_apply_raised", component=self.component, version=version)
                errors = [f"apply raised {type(exc).__name__}: {exc}"]
            if errors:
                self._record_reject(version, "; ".join(errors))
                return False
            self._applied_once = True
            self.applied_version = version
            self.applied_total += 1
            self.source = source
            self.last_update = time.time()
            _log.info("state_applied", component=self.component, version=version, source=source)
            self._ack_dirty.set()
            ev, self._changed = self._changed, asyncio.Event()
            ev.set()
            return True

    def _record_reject(self, version: int, reason: str) -> None:
        self.rejected_version = version
        self.rejected_reason = reason[:MAX_REASON]
        self.rejected_total += 1
        _log.warning(
            "state_rejected", component=self.component, version=version, reason=self.rejected_reason
        )
        self._ack_dirty.set()
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _reached(self, source: str) -> None:
        self.fail_static = False
        if self._applied_once:
            self.source = source

    def _unreachable(self, error: str) -> None:
        self.last_error = error[:MAX_REASON]
        self.fail_static = True

    # ------------------------------------------------------------------ sources
    async def _initial_fetch(self) -> None:
        if self._redis is not None:
            try:
                await self._fetch_redis()
                return
            except (RedisError, OSError, StateSourceError) as exc:
                self._unreachable(f"redis: {exc}")
        if self._api:
            try:
                await self._poll_api(0.0)
                return
            except (OSError, TimeoutError, StateSourceError) as exc:
                self._unreachable(f"api: {exc}")
        if self._redis is None and not self._api:
            self._unreachable("no desired-state source configured")

    async def _fetch_redis(self) -> None:
        assert self._redis is not None
        raw = await self._redis.get(self.key)
        self._reached("redis")
        if raw is None:
            return
        if len(raw) > MAX_SNAPSHOT_BYTES:
            raise StateSourceError("snapshot too large")
        try:
            snapshot = json.loads(raw)
        except ValueError:
            self._record_reject(0, "snapshot in Redis is not valid JSON")
            return
        if not isinstance(snapshot, dict):
            self._record_reject(0, "snapshot in Redis is not an object")
            return
        await self._offer(snapshot, "redis")

    async def _poll_api(self, wait: float) -> bool:
        """One long poll; True when a new snapshot arrived (applied or rejected)."""
        assert self._api
        url = f"{self.api_url}/api/v1/state/{self.component}"
        # after a rejection, wait for something newer than the rejected version (no busy loop)
        after = max(self.applied_version, self.rejected_version)
        params = {"after": str(after), "timeout": str(wait)}
        headers = {CLUSTER_KEY_HEADER: self.cluster_api_key}
        resp = await call(
            "GET",
            url,
            params=params,
            headers=headers,
            total_s=wait + HTTP_SLACK,
            connect_s=REDIS_CONNECT_TIMEOUT,
        )
        if resp.status == 304:
            self._reached("api")
            return False
        if resp.status != 200:
            raise StateSourceError(f"API answered {resp.status}")
        snapshot = resp.json()
        self._reached("api")
        if not isinstance(snapshot, dict):
            raise StateSourceError("API snapshot is not an object")
        await self._offer(snapshot, "api")
        return True

    async def _watch_api(self) -> None:
        delay = BACKOFF_MIN
        while not self._stopping:
            try:
                await self._poll_api(self.poll_timeout)
                delay = BACKOFF_MIN
            except (OSError, TimeoutError, StateSourceError) as exc:
                self._unreachable(f"api: {exc}")
                await self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _watch_redis(self) -> None:
        delay = BACKOFF_MIN
        while not self._stopping:
            try:
                await self._subscribe_loop()
            except (RedisError, OSError) as exc:
                self._unreachable(f"redis: {exc}")
                if self._api:
                    try:
                        await self._poll_api(min(self.poll_timeout, FALLBACK_POLL_SECONDS))
                        delay = BACKOFF_MIN
                        continue
                    except (OSError, TimeoutError, StateSourceError) as err:
                        self._unreachable(f"redis: {exc}; api: {err}")
                await self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _subscribe_loop(self) -> None:
        assert self._redis is not None
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            # catch up on anything published before the subscription existed
            await self._fetch_redis()
            while not self._stopping:
                if self._hint.is_set():
                    self._hint.clear()
                    await self._fetch_redis()
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PUBSUB_TICK)
                if msg is None or msg.get("type") != "message":
                    continue
                data = msg.get("data", b"")
                text = data.decode() if isinstance(data, bytes) else str(data)
                comp, _, ver = text.partition(" ")
                if comp != self.component:
                    continue
                try:
                    version = int(ver)
                except ValueError:
                    continue
                if version > self.applied_version and version != self.rejected_version:
                    await self._fetch_redis()
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError):
                pass

    async def _sleep(self, delay: float) -> None:
        """Back-off sleep that a hint cuts short."""
        try:
            async with asyncio.timeout(delay * (0.5 + random.random())):
                await self._hint.wait()
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ ACK/NACK
    async def _ack_loop(self) -> None:
        while not self._stopping:
            await self._ack_dirty.wait()
            self._ack_dirty.clear()
            if not await self._send_ack():
                await asyncio.sleep(BACKOFF_MAX)
                self._ack_dirty.set()

    async def _send_ack(self) -> bool:
        if not self._api:
            return True
        body = {
            "instance_id": self.instance_id,
            "applied_version": self.applied_version,
            "rejected_version": self.rejected_version,
            "reason": self.rejected_reason,
        }
        url = f"{self.api_url}/api/v1/state/{self.component}/ack"
        try:
            resp = await call(
                "POST",
                url,
                json_body=body,
                headers={CLUSTER_KEY_HEADER: self.cluster_api_key},
                total_s=ACK_TIMEOUT,
            )
        except (OSError, TimeoutError):
            return False
        return resp.status < 500


def _version_of(snapshot: Mapping[str, Any]) -> int:
    v = snapshot.get("version", 0)
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0
