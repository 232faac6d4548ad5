"""The ALB data plane: routing state plus the request/response exchange between a client
connection (``http/downstream.py``) and an upstream connection (``http/upstream.py``).

Failures map to small JSON answers: no route → 404, rate limited → 429, body too large → 413,
no healthy target → 503, upstream refused/reset/garbled → 502, upstream timeout → 504.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import structlog

from marchproxy_common.ratelimit import ClusterLimiter, Decision, TokenBucket
from marchproxy_common.tasks import cancel_and_wait, spawn

from .balancer import BackendPool
from .config import Limits
from .health import run_health_checks
from .http.downstream import DownstreamProtocol, PendingRequest
from .http.errors import ClientGone
from .http.framing import (
    CONTINUE_100,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    ForwardInfo,
    RequestHead,
    ResponseHead,
    ambiguous_separators,
    build_request_head,
    build_response_head,
    decoded_separators,
    encode_chunk,
    error_response,
    normalize_path,
    split_target,
)
from .http.upstream import UpstreamConnection, UpstreamError, UpstreamPool
from .metrics import AlbMetrics
from .routing import RequestView, Route, RoutingTable, Target

log = structlog.get_logger("marchproxy.alb")
access_log = structlog.get_logger("marchproxy.alb.access")

MAX_REQUEST_ID_LEN = 200
MAX_STALE_RETRIES = 2  # re-sends after a pooled keep-alive connection turned out closed
LATENCY_SAMPLES = 2048
COALESCE_LIMIT = 64 * 1024  # join small pieces into one write up to this size
ROUTE_CACHE_SIZE = 4096  # remembered matches (cleared when full)
ROUTE_CACHE_MAX_KEY = 512  # longer host + path are matched without the cache
REFUSAL_LOG_INTERVAL = 1.0  # seconds: at most one alb_refused line per reason in this time


class _Miss(enum.Enum):
    """A route cache miss; ``None`` in the cache is a remembered "no route". An enum member, not
    ``object()``, so that ``route is _MISS`` narrows the cached value back to ``Route | None``."""

    MISS = enum.auto()


_MISS: Final = _Miss.MISS


class _Reply(Exception):
    """Answer the client with a local error instead of a proxied response."""

    def __init__(
        self, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra or []


class _BodyTooLarge(Exception):
    pass


class _ClientIdle(Exception):
    """The client sent no request body bytes for the route's idle_timeout."""


class _UpstreamIdle(Exception):
    """The upstream accepted no request body bytes for the route's idle_timeout."""


_STATUS_CLASSES = tuple(f"{i}xx" for i in range(10))


def status_class(status: int) -> str:
    return _STATUS_CLASSES[status // 100] if 0 <= status < 1000 else f"{status // 100}xx"


_RID_PREFIX = uuid.uuid4().hex[:16].encode()
_rid_counter = itertools.count(1)


def _request_id(head: RequestHead) -> bytes:
    """The client's X-Request-ID when sane, else a new one: a random per-process prefix plus a
    counter (unique, and cheaper than a uuid4 per request)."""
    rid = head.request_id
    if rid and len(rid) <= MAX_REQUEST_ID_LEN and all(33 <= c < 127 for c in rid):
        return rid
    return b"%s%016x" % (_RID_PREFIX, next(_rid_counter))


def _write_eof(transport: asyncio.Transport | None) -> None:
    if transport is not None and not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class DataPlane:
    def __init__(
        self,
        limits: Limits,
        metrics: AlbMetrics,
        *,
        access_log_enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        redis_url: str = "",
        ratelimit_prefix: str = "marchproxy:rl:alb:",
    ) -> None:
        self._redis_url = redis_url
        self._ratelimit_prefix = ratelimit_prefix
        self.cluster_limiter: ClusterLimiter | None = None
        self.limits = limits
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled
        self.clock = clock
        self.table = RoutingTable()
        self._needs_headers = False
        self._route_cache: dict[tuple[bytes | None, str, str], Route | None] | None = None
        self.pools: dict[str, BackendPool] = {}
        self.limiters: dict[str, TokenBucket] = {}
        self.upstreams = UpstreamPool(on_open=self._upstream_opened, on_close=self._upstream_closed)
        self.connections: set[DownstreamProtocol] = set()
        self.accepting = True
        self.total_connections = 0
        self.requests_total = 0
        self.fast_requests = 0  # of requests_total: started on the fast path (no task)
        self.errors_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.refusal_counts: dict[str, int] = {}
        self._refusal_log: dict[str, tuple[float, int]] = {}  # reason → (last line, left out)
        self._idle: asyncio.Event | None = None
        self._health_tasks: dict[str, tuple[BackendPool, str | None, asyncio.Task[None]]] = {}

    # ------------------------------------------------------------------ bookkeeping

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    def conn_opened(self, conn: DownstreamProtocol) -> None:
        self.connections.add(conn)
        self.total_connections += 1
        self.metrics.downstream_connections.inc()

    def conn_closed(self, conn: DownstreamProtocol) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.downstream_connections.dec()
        if not self.connections and self._idle is not None:
            self._idle.set()

    def refused(self, reason: str) -> None:
        self.refusal_counts[reason] = self.refusal_counts.get(reason, 0) + 1
        self.metrics.refusals.labels(reason).inc()
        # every refusal is counted; the log gets at most one line per reason per interval,
        # saying how many were left out, so a flood cannot flood the log (reasons are a
        # fixed set, so this dict stays small)
        now = self.clock()
        last, suppressed = self._refusal_log.get(reason, (-math.inf, 0))
        if now - last >= REFUSAL_LOG_INTERVAL:
            self._refusal_log[reason] = (now, 0)
            if suppressed:
                log.info("alb_refused", reason=reason, suppressed=suppressed)
            else:
                log.info("alb_refused", reason=reason)
        else:
            self._refusal_log[reason] = (last, suppressed + 1)

    def count_error_response(self, status: int) -> None:
        self.requests_total += 1
        self.errors_total += 1
        self.metrics.stats.observe("", status_class(status), None, 0.0, 0, 0)

    def internal_error(self) -> None:
        self.metrics.internal_errors.inc()

    def _upstream_opened(self, target: Target) -> None:
        self.metrics.upstream_connections.inc()
        self.metrics.upstream_connects.labels(target.key).inc()

    def _upstream_closed(self, target: Target) -> None:
        self.metrics.upstream_connections.dec()

    # ------------------------------------------------------------------ config

    def install(self, table: RoutingTable) -> None:
        """Swap in a compiled table; keep pool and limiter state of unchanged routes."""
        pools: dict[str, BackendPool] = {}
        limiters: dict[str, TokenBucket] = {}
        for r in table.routes:
            old = self.pools.get(r.name)
            b = r.backend
            if old is not None and (old.targets, old.policy, old.health, old.outlier) == (
                b.targets,
                b.load_balancing,
                b.health_check,
                b.outlier,
            ):
                pools[r.name] = old
            else:
                pools[r.name] = BackendPool(
                    b.targets, b.load_balancing, b.outlier, b.health_check, clock=self.clock
                )
            pools[r.name].max_active = b.max_connections
            if r.rate_limit is not None:
                prev = self.limiters.get(r.name)
                rl = r.rate_limit
                if prev is not None:
                    if (prev.rate, prev.capacity) != (rl.requests_per_second, rl.burst):
                        prev.reconfigure(rl.requests_per_second, rl.burst)
                    limiters[r.name] = prev
                else:
                    limiters[r.name] = TokenBucket(rl.requests_per_second, rl.burst, self.clock)
        if self.cluster_limiter is None and any(
            r.rate_limit is not None and r.rate_limit.scope == "cluster" for r in table.routes
        ):
            # Redis when REDIS_URL answers, else local buckets (ClusterLimiter falls back)
            self.cluster_limiter = ClusterLimiter(
                self._redis_url or None, prefix=self._ratelimit_prefix
            )
        self.table = table
        self._needs_headers = table.needs_headers
        # host + path + method → route, for tables where nothing else matters
        self._route_cache = {} if table.cacheable else None
        self.pools = pools
        self.limiters = limiters
        self._restart_health_checks()

    def _restart_health_checks(self) -> None:
        """One checker task per pool with active checks; unchanged pools keep theirs."""
        live: dict[str, tuple[BackendPool, str | None, asyncio.Task[None]]] = {}
        for r in self.table.routes:
            name, pool = r.name, self.pools[r.name]
            if not pool.health.enabled:
                continue
            sni = r.backend.tls_server_name
            old = self._health_tasks.pop(name, None)
            if old is not None and old[0] is pool and old[1] == sni and not old[2].done():
                live[name] = old
                continue
            if old is not None:
                old[2].cancel()
            task = spawn(
                run_health_checks(
                    pool, self.metrics, ssl_context=self.upstreams.ssl_context, server_name=sni
                ),
                name=f"alb health {name}",
            )
            live[name] = (pool, sni, task)
        for *_, task in self._health_tasks.values():
            task.cancel()
        self._health_tasks = live

    async def close(self) -> None:
        await cancel_and_wait(*[task for *_, task in self._health_tasks.values()])
        if self.cluster_limiter is not None:
            await self.cluster_limiter.close()
            self.cluster_limiter = None
        self._health_tasks.clear()
        self.upstreams.close_all()

    async def drain(self, deadline: float) -> None:
        """Close idle keep-alive connections now, the busy ones after their current response
        (answered with ``Connection: close``), and whatever is left at ``deadline``."""
        loop = asyncio.get_running_loop()
        self.accepting = False
        for c in list(self.connections):
            c.close_if_idle()
        if self.connections:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for c in list(self.connections):
            c.abort()
        del loop

    # ------------------------------------------------------------------ one request

    def start_fast(self, req: PendingRequest, down: DownstreamProtocol) -> bool:
        """Start a bodiless GET without a task when nothing needs waiting for: a cached route
        with no rate limit or hashing, a normal path, and an idle pooled connection to the
        picked target. The request goes out now and :meth:`Exchange.on_upstream_event`
        finishes it from the upstream's callbacks. False (nothing done, except remembering a
        target it picked but had no idle connection to) when the task has to serve it."""
        head = req.head
        cache = self._route_cache
        if head is None or cache is None:
            req.slow = True
            return False
        # (str, not bytes: ``b"%" in some_bytes`` first tries the needle as an int and pays
        # for a TypeError each time)
        path = head.target.partition(b"?")[0].decode("latin-1")
        host = head.host
        if (
            path[:1] != "/"
            or "%" in path
            or "/." in path
            or "//" in path
            or "\\" in path
            or len(path) + len(host or b"") > ROUTE_CACHE_MAX_KEY
        ):
            req.slow = True
            return False
        # host, path and method decide (cacheable): no headers or query needed
        route = cache.get((host, path, head.method), _MISS)
        if route is _MISS:
            route = self._cached_match(cache, head, host, path, {}, "")
        if route is None or route.rate_limit is not None:
            req.slow = True
            return False
        b = route.backend
        if b.load_balancing in ("consistent_hash", "ip_hash"):
            req.slow = True
            return False
        pool = self.pools[route.name]
        target = pool.pick(None)
        req.slow = True  # whatever happens next, this request is not tried again
        if target is None:
            return False
        conn = self.upstreams.take_idle(target, b.tls_server_name)
        if conn is None:
            req.first_target = target  # the task connects to the target picked here
            return False
        t0 = down.now()
        ex = Exchange(self, req, down, route, _request_id(head), t0, path)
        ex.pool = pool
        pool.retry_budget.deposit()
        ex.target = target
        pool.begin(target)
        ex.conn = conn
        down.on_lost = ex.client_lost
        deadline = t0 + b.timeout
        if b.header_timeout < b.timeout:
            deadline = min(deadline, t0 + b.header_timeout)
        # (no head future, and no body channel unless the response needs one)
        conn.begin_fast(deadline)
        fwd = down.forward_info
        fwd.request_id = ex.rid
        data = build_request_head(
            head,
            fwd,
            host_override=None if b.preserve_host and host is not None else target.authority,
        )
        transport = conn.transport  # (conn.write, inlined: a pooled connection has one)
        assert transport is not None
        transport.write(data)
        req.exchange = ex
        conn.on_event = ex.on_upstream_event
        conn.on_whole = ex.on_whole_response
        self.fast_requests += 1
        return True

    async def handle(self, req: PendingRequest, down: DownstreamProtocol) -> bool:
        """Serve one request; returns whether the client connection stays open."""
        resumed = req.exchange
        if resumed is not None:  # started on the fast path, handed over to the task
            req.exchange = None
            return await resumed.conclude(resumed.forward(None, resumed.conn))
        head = req.head
        assert head is not None and req.body is not None
        t0 = down.loop.time()
        rid = _request_id(head)
        raw_path, query = split_target(head.target)
        if "%" in raw_path or "/." in raw_path or "//" in raw_path:
            path = normalize_path(raw_path)
        else:
            path = raw_path
        host = head.host
        table = self.table
        hdrs: dict[str, str] = (
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            if self._needs_headers
            else {}
        )
        cache = self._route_cache
        if cache is not None and len(path) + len(host or b"") <= ROUTE_CACHE_MAX_KEY:
            route = self._cached_match(cache, head, host, path, hdrs, query)
        else:
            route = table.match(self._view(head, host, path, hdrs, query))
        ambiguous = (
            ("%" in path or "\\" in path)
            and ambiguous_separators(path)
            and table.match(self._view(head, host, decoded_separators(path), hdrs, query))
            is not route
        )
        if path != raw_path:
            # forward what was matched (RFC 3986 §6.2.2 normalization)
            head.target = (path + "?" + query if query else path).encode("latin-1")
        ex = Exchange(self, req, down, route, rid, t0, path)
        return await ex.conclude(ex.run(hdrs, ambiguous))

    def _cached_match(
        self,
        cache: dict[tuple[bytes | None, str, str], Route | None],
        head: RequestHead,
        host: bytes | None,
        path: str,
        hdrs: dict[str, str],
        query: str,
    ) -> Route | None:
        """The route for (host, path, method) from the route cache (it exists only while the
        table is ``cacheable``: no rule looks further), matched and remembered on a miss."""
        key = (host, path, head.method)
        route = cache.get(key, _MISS)
        if route is _MISS:
            route = self.table.match(self._view(head, host, path, hdrs, query))
            if len(cache) >= ROUTE_CACHE_SIZE:
                cache.clear()
            cache[key] = route
        return route

    @staticmethod
    def _view(
        head: RequestHead, host: bytes | None, path: str, hdrs: dict[str, str], query: str
    ) -> RequestView:
        return RequestView(host.decode("latin-1") if host else "", path, head.method, hdrs, query)


class Exchange:
    """State of one proxied request, so failure paths can clean up exactly what exists."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "conn",
        "down",
        "last_activity",
        "path",
        "plane",
        "pool",
        "pump",
        "pump_error",
        "ratelimit_headers",
        "req",
        "retries",
        "rid",
        "route",
        "started",
        "status",
        "t0",
        "target",
        "upstream_failed",
    )

    def __init__(
        self,
        plane: DataPlane,
        req: PendingRequest,
        down: DownstreamProtocol,
        route: Route | None,
        rid: bytes,
        t0: float,
        path: str,
    ) -> None:
        self.plane = plane
        self.req = req
        self.down = down
        self.route = route
        self.rid = rid
        self.t0 = t0
        self.path = path  # as matched (normalized), for the access log
        self.pool: BackendPool | None = None
        self.conn: UpstreamConnection | None = None
        self.target: Target | None = None
        self.pump: asyncio.Task[None] | None = None
        self.pump_error: BaseException | None = None
        self.started = False
        self.status = 0
        self.retries = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.ratelimit_headers: list[tuple[bytes, bytes]] = []
        self.last_activity = 0.0
        self.upstream_failed = ""  # why the target failed this exchange (outlier detection)

    @property
    def head(self) -> RequestHead:
        assert self.req.head is not None
        return self.req.head

    # ------------------------------------------------------------------ local answers

    def reply(self, r: _Reply) -> bool:
        if self.started:
            self.down.abort()  # the response head already went out: all we can do is cut it
            self.status = self.status or r.status
            return False
        body = self.req.body
        keep = (
            self.head.keep_alive
            and not self.head.upgrade
            and body is not None
            and body.complete
            and r.status < 500
        )
        self.status = r.status
        if not keep and body is not None and not body.complete:
            self.down.linger = True  # let the client finish sending so it sees our answer
        self.down.write(
            error_response(
                r.status,
                r.code,
                str(r),
                keep_alive=keep,
                extra=r.extra + self.ratelimit_headers,
                request_id=self.rid,
            )
        )
        return keep

    # ------------------------------------------------------------------ the exchange

    async def conclude(self, work: Coroutine[Any, Any, bool]) -> bool:
        """Await the exchange (``run`` or, after a fast-path hand-over, ``forward``), answer
        local errors, clean up and account; returns whether the client connection stays open."""
        try:
            keep = await work
        except _Reply as r:
            keep = self.reply(r)
        except ConnectionError:  # ClientGone, or a transport error on either side
            self.status = self.status or 499
            keep = False
        finally:
            self.cleanup()
        self.finish()
        return keep

    async def run(self, hdrs: dict[str, str], ambiguous: bool) -> bool:
        plane, route, head = self.plane, self.route, self.head
        if ambiguous:
            plane.refused("ambiguous_path")
            raise _Reply(400, "bad_path", "encoded slash or backslash in the path")
        if route is None:
            plane.refused("no_route")
            raise _Reply(404, "no_route", "no route matches this request")
        rl = route.rate_limit
        if rl is not None:
            if rl.scope == "cluster" and plane.cluster_limiter is not None:
                decision = await plane.cluster_limiter.allow(
                    route.name, rl.requests_per_second, rl.burst
                )
                self._apply_decision(rl.burst, decision)
            else:
                self._check_rate_limit(route)
        if head.content_length is not None and head.content_length > route.max_body_size:
            plane.refused("body_too_large")
            raise _Reply(413, "body_too_large", "request body exceeds the route's limit")
        pool = plane.pools[route.name]
        self.pool = pool
        pool.retry_budget.deposit()
        return await self.forward(self._hash_key(route, hdrs), None)

    async def forward(self, hash_key: bytes | None, sent: UpstreamConnection | None) -> bool:
        """Send the request upstream (or, with ``sent``, wait on the connection the fast path
        already sent it on) and relay the response."""
        plane, route, pool = self.plane, self.route, self.pool
        assert route is not None and pool is not None
        try:
            # the route's timeout bounds connect + send + wait for the head; then idle_timeout
            # bounds the body (or the tunnel's tunnel_idle_timeout), however long it streams
            resp = await self._send(route, pool, hash_key, self.t0 + route.backend.timeout, sent)
            if resp.status == 101:
                return await self._tunnel(resp)
            return await self._relay(resp)
        except TimeoutError:
            plane.refused("upstream_timeout")
            self.upstream_failed = "timeout"
            raise _Reply(504, "upstream_timeout", "upstream did not answer in time") from None
        except UpstreamError as exc:  # the upstream broke after its response head
            plane.refused("upstream_failed")
            self.upstream_failed = "reset"
            raise _Reply(502, "bad_gateway", f"upstream failed: {exc}") from None

    def _apply_decision(self, burst: float, d: Decision) -> None:
        limit = str(int(burst)).encode()
        if d.allowed:
            self.ratelimit_headers = [
                (b"X-RateLimit-Limit", limit),
                (b"X-RateLimit-Remaining", str(max(0, d.remaining)).encode()),
                (b"X-RateLimit-Reset", str(math.ceil(d.reset_after)).encode()),
            ]
            return
        wait = str(max(1, math.ceil(d.retry_after))).encode()
        self.plane.refused("rate_limited")
        raise _Reply(
            429,
            "rate_limited",
            "route rate limit exceeded",
            [
                (b"X-RateLimit-Limit", limit),
                (b"X-RateLimit-Remaining", b"0"),
                (b"X-RateLimit-Reset", wait),
                (b"Retry-After", wait),
            ],
        )

    def _check_rate_limit(self, route: Route) -> None:
        bucket = self.plane.limiters[route.name]
        rl = route.rate_limit
        assert rl is not None
        limit = str(int(rl.burst)).encode()
        if bucket.try_acquire(1):
            remaining = int(bucket.tokens)
            reset = math.ceil(max(0.0, rl.burst - remaining) / rl.requests_per_second)
            self.ratelimit_headers = [
                (b"X-RateLimit-Limit", limit),
                (b"X-RateLimit-Remaining", str(remaining).encode()),
                (b"X-RateLimit-Reset", str(reset).encode()),
            ]
            return
        wait = bucket.retry_after(1)
        self.plane.refused("rate_limited")
        raise _Reply(
            429,
            "rate_limited",
            "route rate limit exceeded",
            [
                (b"X-RateLimit-Limit", limit),
                (b"X-RateLimit-Remaining", b"0"),
                (b"X-RateLimit-Reset", str(max(1, math.ceil(wait))).encode()),
                (b"Retry-After", str(max(1, math.ceil(wait))).encode()),
            ],
        )

    def _hash_key(self, route: Route, hdrs: dict[str, str]) -> bytes | None:
        b = route.backend
        if b.load_balancing not in ("consistent_hash", "ip_hash"):
            return None
        if b.load_balancing == "consistent_hash":
            if b.hash_header:
                v = hdrs.get(b.hash_header)
                if v is not None:
                    return v.encode()
            if b.hash_cookie:
                c = _cookie(hdrs.get("cookie"), b.hash_cookie)
                if c is not None:
                    return c.encode()
        return self.down.client_ip.encode()

    def _target_failed(self, cause: str) -> None:
        pool, target = self.pool, self.target
        if pool is not None and target is not None and pool.record_failure(target):
            self.plane.metrics.ejections.labels(target.key, "outlier").inc()
            log.warning("alb_target_ejected", target=target.key, cause=cause)

    def _pick(self, pool: BackendPool, hash_key: bytes | None, tried: list[Target]) -> Target:
        target = pool.pick(hash_key, tried)
        if target is None and tried:
            target = pool.pick(hash_key)
        if target is None:
            if pool.saturated():
                self.plane.refused("upstream_overflow")
                raise _Reply(503, "upstream_overflow", "every target is at max_connections")
            self.plane.refused("no_healthy_backend")
            raise _Reply(503, "no_healthy_backend", "no healthy backend for this route")
        return target

    async def _send(
        self,
        route: Route,
        pool: BackendPool,
        hash_key: bytes | None,
        deadline: float,
        sent: UpstreamConnection | None = None,
    ) -> ResponseHead:
        """Pick a target, connect (or reuse), send the request and return the response head,
        retrying as the route allows; ``deadline`` (loop time) bounds it all → TimeoutError.
        ``sent``: the fast path already sent it on this pooled connection (to ``self.target``):
        the first attempt only waits for the head."""
        plane, head, b = self.plane, self.head, route.backend
        tried: list[Target] = []
        stale = 0
        expect_continue = head.expect is not None and head.expect.lower() == b"100-continue"
        fwd = ForwardInfo(self.down.client_ip, self.down.scheme, self.rid)
        while True:
            if sent is not None:
                first, sent = sent, None
                target, reused = first.target, True
                try:
                    return await self._head_waiter(first, b.header_timeout, b.timeout, deadline)
                except UpstreamError as exc:
                    stale = self._send_failed(exc, target, pool, reused, stale, tried)
                    continue
            target = self.req.first_target or self._pick(pool, hash_key, tried)
            self.req.first_target = None
            self.target = target
            pool.begin(target)
            try:
                left = deadline - self.down.loop.time()
                if left <= 0:
                    raise TimeoutError
                conn = plane.upstreams.take_idle(target, b.tls_server_name)
                reused = conn is not None
                if conn is None:
                    conn, reused = await plane.upstreams.acquire(
                        target, min(b.connect_timeout, left), b.tls_server_name
                    )
            except (OSError, TimeoutError) as connect_error:  # (not ``exc``: one type a name)
                pool.end(target)
                self._target_failed("connect")
                tried.append(target)
                self.target = None
                if self.retries < b.retries and pool.retry_budget.try_spend():
                    self.retries += 1
                    plane.metrics.retries.labels(route.name).inc()
                    continue
                if isinstance(connect_error, TimeoutError):
                    plane.refused("upstream_connect_timeout")
                    raise _Reply(504, "upstream_timeout", "upstream connect timed out") from None
                plane.refused("upstream_unreachable")
                raise _Reply(502, "bad_gateway", "upstream refused the connection") from None
            self.conn = conn
            if self.down.closed:
                raise ClientGone("client left while we connected")
            self.down.on_lost = self.client_lost
            body = self.req.body
            assert body is not None
            if expect_continue and not body.complete and not self.started:
                self.down.write(CONTINUE_100)
                expect_continue = False
            conn.begin(head.method, conn.pause_reading, conn.resume_reading)
            host_override = (
                None
                if b.preserve_host and head.host is not None
                else target.authority  # HTTP/1.1 needs a Host upstream
            )
            req_head = build_request_head(head, fwd, host_override=host_override)
            if head.has_body and body.complete and body.buffered <= COALESCE_LIMIT:
                req_head += self._take_buffered_body(route)  # small body already here: one write
            conn.write(req_head)
            if head.has_body and not body.at_eof:
                self.pump = spawn(
                    self._pump_body(conn, route), name=f"alb body {self.down.conn_id}"
                )
            try:
                return await self._head_waiter(conn, b.header_timeout, b.timeout, deadline)
            except UpstreamError as exc:
                stale = self._send_failed(exc, target, pool, reused, stale, tried)

    def _send_failed(
        self,
        exc: UpstreamError,
        target: Target,
        pool: BackendPool,
        reused: bool,
        stale: int,
        tried: list[Target],
    ) -> int:
        """An attempt failed before its head: returns the new stale count when ``_send`` may
        try again, raises the 502 when not."""
        plane, head, route = self.plane, self.head, self.route
        assert route is not None
        b = route.backend
        idempotent = head.method in IDEMPOTENT_METHODS and not head.has_body
        self._drop_upstream()
        pool.end(target)
        if exc.before_response and reused and idempotent and stale < MAX_STALE_RETRIES:
            self.target = None
            return stale + 1  # the pooled connection was closed under us: not a target failure
        self._target_failed("reset")
        tried.append(target)
        self.target = None
        if (
            exc.before_response
            and idempotent
            and self.retries < b.retries
            and pool.retry_budget.try_spend()
        ):
            self.retries += 1
            plane.metrics.retries.labels(route.name).inc()
            return stale
        plane.refused("upstream_failed")
        raise _Reply(502, "bad_gateway", f"upstream failed: {exc}") from None

    def _take_buffered_body(self, route: Route) -> bytes:
        body = self.req.body
        assert body is not None
        data = body.read_nowait() or b""
        self.bytes_in += len(data)
        if self.bytes_in > route.max_body_size:
            self.plane.refused("body_too_large")
            raise _Reply(413, "body_too_large", "request body exceeds the route's limit")
        if self.head.chunked:
            return encode_chunk(data) + LAST_CHUNK
        return data

    def _head_waiter(
        self, conn: UpstreamConnection, header_timeout: float, total: float, deadline: float
    ) -> Awaitable[ResponseHead]:
        """What to await for the response head: the head future itself when the request is
        already sent (the common case: no coroutine), else :meth:`_await_head`."""
        fut = conn.head_future
        assert fut is not None
        if self.pump is not None:
            return self._await_head(conn, header_timeout, total, deadline)
        if header_timeout < total:
            deadline = min(deadline, conn.loop.time() + header_timeout)
        conn.expect_head_by(deadline)
        return fut

    async def _await_head(
        self, conn: UpstreamConnection, header_timeout: float, total: float, deadline: float
    ) -> ResponseHead:
        """The response head, by ``deadline`` and within header_timeout of the request being
        sent (the connection's lazy timer fails the head future with TimeoutError: no timer
        per request). While the request body is still streaming, idle_timeout bounds it
        (both ways) and the deadline stands still."""
        fut = conn.head_future
        assert fut is not None
        loop = asyncio.get_running_loop()
        pump = self.pump
        if pump is not None and not pump.done():
            started = loop.time()
            await asyncio.wait((fut, pump), return_when=asyncio.FIRST_COMPLETED)
            deadline += loop.time() - started
            if not fut.done():
                self._raise_pump_error(pump)
        if not fut.done():
            if header_timeout < total:
                deadline = min(deadline, loop.time() + header_timeout)
            conn.expect_head_by(deadline)
        return await fut

    def _raise_pump_error(self, pump: asyncio.Task[None]) -> None:
        if pump.cancelled():
            raise ClientGone("request body cancelled")
        exc = self.pump_error
        if isinstance(exc, _BodyTooLarge):
            self.plane.refused("body_too_large")
            raise _Reply(413, "body_too_large", "request body exceeds the route's limit")
        if isinstance(exc, _ClientIdle):
            self.plane.refused("body_idle_timeout")
            raise _Reply(408, "request_timeout", "request body stalled")
        if isinstance(exc, ClientGone):
            raise exc
        if isinstance(exc, _UpstreamIdle):
            raise TimeoutError  # the upstream stopped reading the request body: 504
        if exc is not None:
            raise UpstreamError(f"writing request body: {exc}", before_response=False)

    async def _pump_body(self, conn: UpstreamConnection, route: Route) -> None:
        try:
            await self._pump_body_inner(conn, route)
        except (_BodyTooLarge, ClientGone, ConnectionError, _ClientIdle, _UpstreamIdle) as exc:
            self.pump_error = exc

    async def _pump_body_inner(self, conn: UpstreamConnection, route: Route) -> None:
        body = self.req.body
        assert body is not None
        chunked = self.head.chunked
        limit = route.max_body_size
        flow = conn.flow
        idle = route.backend.idle_timeout
        while True:
            data = body.read_nowait()
            if data is None:
                try:
                    async with asyncio.timeout(idle):
                        data = await body.read()
                except TimeoutError:
                    raise _ClientIdle from None
            if not data:
                break
            self.bytes_in += len(data)
            if self.bytes_in > limit:
                raise _BodyTooLarge
            conn.write(encode_chunk(data) if chunked else data)
            if flow.paused:
                try:
                    async with asyncio.timeout(idle):
                        await flow.drain()
                except TimeoutError:
                    raise _UpstreamIdle from None
        if chunked:
            conn.write(LAST_CHUNK)

    def on_upstream_event(self) -> None:
        """Fast path: the upstream connection has news (a response head, an error, or the
        client left). Write a complete response at once; hand anything else to the task."""
        conn, down = self.conn, self.down
        assert conn is not None
        conn.on_event = None
        fut = conn.head_future
        assert fut is not None and fut.done()
        if fut.cancelled() or fut.exception() is not None:
            down.hand_over(self.req)
            return
        resp = fut.result()
        conn.on_whole = None
        if not (
            conn.response_complete
            and resp.content_length is not None
            and not resp.chunked
            and resp.status != 101
            and not down.flow.paused
        ):
            down.hand_over(self.req)  # streamed, chunked or close-delimited: the task copies it
            return
        self._answer_fast(resp, None)

    def on_whole_response(self, resp: ResponseHead, body: bytes) -> bool:
        """Fast path: the upstream's whole response came in one read and passed
        ``scan_simple_response`` (a Content-Length response, nothing to stream): answer the
        client now, without the head future or the body channel. False when the client cannot
        take it now; the upstream then goes the usual way (on_upstream_event)."""
        if self.down.flow.paused:
            return False
        conn = self.conn
        assert conn is not None
        conn.on_event = None
        conn.on_whole = None
        self._answer_fast(resp, body)
        return True

    def _answer_fast(self, resp: ResponseHead, body: bytes | None) -> None:
        """Write the whole response (``body``, or what the body channel holds) and end the
        exchange from the upstream's callback."""
        down = self.down
        self.req.exchange = None
        try:
            if body is None:
                keep = self._relay_whole(resp)
            else:
                data, framing, keep = self._response_head(resp)
                if body:
                    self.bytes_out += len(body)
                    if framing != "none":
                        data += body
                transport = down.transport
                if transport is not None and not down.closed:  # (down.write, inlined)
                    transport.write(data)
                if framing != "length" and framing != "none":  # (never, from the scan)
                    keep = self._relay_done(keep, framing)
                # else _relay_done would return keep: a fast request has no request body
                # (EMPTY_BODY, complete) and no body pump
        except Exception:
            # a bug, not a network event: count it, log it, and drop both connections (the
            # task's own handler does the same for the slow path)
            self.plane.internal_error()
            log.exception("alb_fast_path_failed", conn=down.conn_id)
            self.status = self.status or 500
            keep = False
            down.abort()
        self.cleanup()
        self.finish()
        down.fast_done(keep)

    def _response_head(self, resp: ResponseHead) -> tuple[bytes, str, bool]:
        """The response head for the client, its framing, and whether to keep the client."""
        head = self.req.head
        assert head is not None
        self.status = resp.status
        if resp.status in (502, 503, 504):
            self.upstream_failed = "5xx"  # gateway errors from the target count as failures
        keep = head.keep_alive and not head.upgrade and self.plane.accepting
        data, framing = build_response_head(
            resp,
            method=head.method,
            client_version=head.version,
            keep_alive=keep,
            request_id=self.rid,
            extra=self.ratelimit_headers,
        )
        if framing == "close" or framing == "tunnel":
            keep = False
        self.started = True
        return data, framing, keep

    def _relay_whole(self, resp: ResponseHead) -> bool:
        """The fast path's relay: the response is complete with a Content-Length."""
        data, framing, keep = self._response_head(resp)
        self._write_whole(data, framing)
        return self._relay_done(keep, framing)

    def _write_whole(self, data: bytes, framing: str) -> None:
        """The whole response is already here (small responses): head and body, one write."""
        body = self.conn.body if self.conn is not None else None
        assert body is not None
        rest = body.read_nowait()
        if rest:
            self.bytes_out += len(rest)
            if framing != "none":
                data += rest
        self.down.write(data)

    async def _relay(self, resp: ResponseHead) -> bool:
        down, conn = self.down, self.conn
        assert conn is not None and conn.body is not None
        data, framing, keep = self._response_head(resp)
        if conn.response_complete and not down.flow.paused and framing != "chunked":
            self._write_whole(data, framing)
        else:
            await self._copy_body(conn, data, framing)
        return self._relay_done(keep, framing)

    def _relay_done(self, keep: bool, framing: str) -> bool:
        conn = self.conn
        assert conn is not None
        pump = self.pump
        if pump is not None:
            if not pump.done():
                # the upstream answered before reading the whole request body
                pump.cancel()
                keep = False
                conn.keep_alive = False
            elif pump.cancelled() or self.pump_error is not None:
                keep = False
                conn.keep_alive = False
        if not (self.req.body is not None and self.req.body.complete):
            keep = False
        if framing == "close":
            self.down.close()
        return keep

    async def _copy_body(self, conn: UpstreamConnection, data: bytes, framing: str) -> None:
        down = self.down
        assert self.route is not None
        idle = self.route.backend.idle_timeout
        assert conn.body is not None
        chunked = framing == "chunked"
        body = conn.body
        dflow = down.flow
        # coalesce the head and whatever body is already here into one write (one syscall)
        parts = [data]
        size = 0
        while True:
            chunk = body.read_nowait()
            if chunk is None:
                if parts:
                    down.write(b"".join(parts))
                    parts, size = [], 0
                if dflow.paused or down.closed:
                    await self._drain_client(idle)
                async with asyncio.timeout(idle):  # upstream idle between body bytes
                    chunk = await body.read()
            if not chunk:
                break
            self.bytes_out += len(chunk)
            if framing != "none":
                parts.append(encode_chunk(chunk) if chunked else chunk)
                size += len(chunk)
                if size >= COALESCE_LIMIT:
                    down.write(b"".join(parts))
                    parts, size = [], 0
                    if dflow.paused or down.closed:
                        await self._drain_client(idle)
        if chunked:
            parts.append(LAST_CHUNK)
        if parts:
            down.write(b"".join(parts))

    async def _drain_client(self, idle: float) -> None:
        """Wait until the client takes more of the response, for at most idle_timeout."""
        try:
            async with asyncio.timeout(idle):
                await self.down.drain()
        except TimeoutError:
            self.plane.refused("client_write_timeout")
            self.down.abort()  # close() would wait for a buffer the client never reads
            raise ClientGone("client stopped reading the response") from None

    async def _tunnel(self, resp: ResponseHead) -> bool:
        head, down, conn = self.head, self.down, self.conn
        assert conn is not None
        if not head.upgrade:
            raise _Reply(502, "bad_gateway", "upstream switched protocols without an Upgrade")
        self.status = 101
        data, _ = build_response_head(
            resp,
            method=head.method,
            client_version=head.version,
            keep_alive=False,
            request_id=self.rid,
        )
        down.write(data)
        self.started = True
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        loop = asyncio.get_running_loop()
        self.last_activity = loop.time()

        def to_upstream(chunk: bytes) -> None:
            self.bytes_in += len(chunk)
            self.last_activity = loop.time()
            conn.write(chunk)

        def to_client(chunk: bytes) -> None:
            self.bytes_out += len(chunk)
            self.last_activity = loop.time()
            down.write(chunk)

        early = (self.req.upgrade_rest or b"") + down.take_early_tunnel_bytes()
        up_rest = conn.upgrade_rest or b""
        down.tunnel_sink = to_upstream
        conn.tunnel_sink = to_client
        down.on_lost = finish
        conn.on_lost = finish
        eofs: set[str] = set()

        def half_close(side: str, other: asyncio.Transport | None) -> None:
            _write_eof(other)
            eofs.add(side)
            if len(eofs) == 2:
                finish()  # both directions ended: nothing more can flow

        down.on_eof = lambda: half_close("client", conn.transport)
        conn.on_eof = lambda: half_close("upstream", down.transport)
        down.on_write_paused = lambda p: conn.pause_reading() if p else conn.resume_reading()
        conn.on_write_paused = lambda p: down.pause_reading() if p else down.resume_reading()
        if early:
            to_upstream(early)
        if up_rest:
            to_client(up_rest)
        if down.closed or conn.closed:
            finish()
        down.resume_reading()  # paused when the Upgrade request was parsed
        assert self.route is not None
        idle = self.route.backend.tunnel_idle_timeout
        while not done.done():
            try:
                async with asyncio.timeout(idle):
                    await asyncio.shield(done)
            except TimeoutError:
                if loop.time() - self.last_activity >= idle:
                    self.plane.refused("tunnel_idle")
                    break
        down.close()
        conn.close()
        return False

    # ------------------------------------------------------------------ cleanup

    def _drop_upstream(self) -> None:
        pump = self.pump
        if pump is not None and not pump.done():
            pump.cancel()
        self.pump = None
        if self.conn is not None:
            self.plane.upstreams.release(self.conn, abort=True)
            self.conn = None

    def client_lost(self) -> None:
        """The client connection is gone: stop waiting for the upstream at once (cleanup then
        closes the upstream connection and frees the target's slot)."""
        conn = self.conn
        if conn is None:
            return
        gone = ClientGone("client left before the response was complete")
        hf = conn.head_future
        if conn.armed and (hf is None or not hf.done()):
            conn.head_waiter().set_exception(gone)
            if conn.on_event is not None:
                conn.on_event()  # a fast-path exchange: the task takes it over and ends it
        elif conn.body is not None:
            conn.body.fail(gone)

    def cleanup(self) -> None:
        if self.down.on_lost == self.client_lost:
            self.down.on_lost = None
        pump = self.pump
        aborted = False
        if pump is not None and not pump.done():
            pump.cancel()
            aborted = True
        conn = self.conn
        if conn is not None:
            if not conn.response_complete or conn.tunnel_sink is not None:
                aborted = True
            self.plane.upstreams.release(conn, abort=aborted)
            self.conn = None
        if self.pool is not None and self.target is not None:
            failed = self.upstream_failed
            status = self.status
            self.pool.end(self.target, succeeded=not failed and status != 0 and status != 499)
            if failed:
                self._target_failed(failed)

    def finish(self) -> None:
        plane = self.plane
        dur = self.down.now() - self.t0
        status = self.status or 499
        route = self.route.name if self.route is not None else ""
        plane.requests_total += 1
        if status >= 500 or status == 499:
            plane.errors_total += 1
        plane.bytes_in += self.bytes_in
        plane.bytes_out += self.bytes_out
        plane.latencies.append(dur)
        target = self.target.key if self.target is not None else None
        sc = _STATUS_CLASSES[status // 100] if status < 1000 else status_class(status)
        plane.metrics.stats.observe(route, sc, target, dur, self.bytes_in, self.bytes_out)
        if plane.access_log_enabled:
            access_log.info(
                "access",
                conn=self.down.conn_id,
                client=self.down.client_ip,
                method=self.head.method,
                path=self.path,
                status=status,
                route=route,
                target=target,
                duration_ms=round(dur * 1000, 3),
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                retries=self.retries,
                request_id=self.rid.decode("latin-1"),
            )
