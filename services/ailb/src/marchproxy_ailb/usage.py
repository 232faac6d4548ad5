"""Usage accounting: tokens and cost per key, persisted; Prometheus metrics.

Cost is kept in integer nano-USD so per-key totals add up exactly (prices are USD per million
tokens, so one token costs ``price * 1000`` nano-USD). Cached prompt tokens are priced at the
deployment's ``cached_input`` price, prompt tokens written to its cache (Anthropic's
``cache_creation_input_tokens``) at ``cache_write_input``. Each record goes to Redis (HINCRBY on
``<prefix>usage:<key_id>``, shared by replicas) and to an append-only JSONL log when configured
(written by a background thread, see :mod:`marchproxy_ailb.usage_log`). At start the log is
replayed: without Redis it rebuilds the totals; with Redis it restores the totals of keys Redis
has none for. Nothing flushed to the log is lost on restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .schema import Price
from .usage_log import Totals, UsageLog, add_record, replay

_log = structlog.get_logger("marchproxy.ailb")

USAGE_FIELDS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "cost_nusd",
)
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


@dataclass(frozen=True, slots=True)
class Tokens:
    """Tokens of one answer. ``prompt`` counts all prompt tokens, including ``cached`` (read
    from the provider's prompt cache) and ``cache_write`` (written to it)."""

    prompt: int
    completion: int
    cached: int = 0
    cache_write: int = 0


def cost_nusd(price: Price, prompt: int, completion: int, cached: int, cache_write: int = 0) -> int:
    """Uncached prompt x input + cached x cached_input + cache writes x cache_write_input +
    completion x output, in nano-USD."""
    cached = min(cached, prompt)
    cache_write = min(cache_write, prompt - cached)
    cached_price = price.input if price.cached_input is None else price.cached_input
    plain = prompt - cached - cache_write
    usd_per_million = (
        plain * price.input
        + cached * cached_price
        + cache_write * price.cache_write
        + completion * price.output
    )
    return round(usd_per_million * 1000)


def worst_case_nusd(price: Price, prompt: int, completion: int) -> int:
    """The most ``prompt`` + ``completion`` tokens can cost at this price: every prompt token at
    the dearest prompt price (a cache write costs more than plain input)."""
    prompt_price = max(price.input, price.cached_input or 0.0, price.cache_write)
    return round((prompt * prompt_price + completion * price.output) * 1000)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    key_id: str
    team: str
    model: str
    deployment: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_nusd: int
    estimated: bool
    cache_hit: bool = False
    cache_write_tokens: int = 0


RECORD_FIELDS = tuple(UsageRecord.__dataclass_fields__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ailb_requests",
            "Client requests by model, provider and HTTP status",
            ["model", "provider", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "ailb_tokens",
            "Tokens by model, provider and kind (prompt/completion/cached/cache_write)",
            ["model", "provider", "kind"],
            registry=r,
        )
        self.cost = Counter("ailb_cost_usd", "Spend in USD by model", ["model"], registry=r)
        self.latency = Histogram(
            "ailb_request_duration_seconds",
            "Client request duration",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ailb_time_to_first_token_seconds",
            "Time until the first streamed chunk",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "ailb_upstream_errors",
            "Failed upstream attempts by provider and reason",
            ["provider", "deployment", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "ailb_fallbacks",
            "Requests served by a later deployment of the plan",
            ["model"],
            registry=r,
        )
        self.cache = Counter("ailb_cache", "Response cache lookups", ["result"], registry=r)
        self.overhead = Histogram(
            "ailb_overhead_seconds",
            "Gateway's own added time per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "ailb_backend_errors",
            "Redis/log failures the gateway served through (limits, budget, usage, cache)",
            ["what"],
            registry=r,
        )
        self.in_flight = Gauge("ailb_in_flight_requests", "Requests in progress", registry=r)


# KEYS: usage hash; ARGV: field, value, field, value, ... (only when the hash is missing)
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class UsageStore:
    """Per-key usage totals: in Redis (shared by replicas) or in process, plus the JSONL log.

    Call :meth:`start` before serving (it replays the log) and :meth:`close` at shutdown (it
    writes what is still queued for the log)."""

    def __init__(
        self,
        redis: Any | None,
        prefix: str,
        log_path: str = "",
        *,
        log_max_bytes: int = 0,
        log_backups: int = 4,
        on_log_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._local: Totals = {}
        self._log: UsageLog | None = None
        if log_path:
            self._log = UsageLog(
                log_path,
                USAGE_FIELDS,
                max_bytes=log_max_bytes,
                backups=log_backups,
                on_error=on_log_error,
            )
        self._started = False

    async def start(self) -> None:
        """Replay the log: the totals without Redis; with Redis, the totals of keys Redis has
        none for (e.g. after Redis lost its data), which are written back there."""
        if self._started:
            return
        self._started = True
        if self._log is None:
            return
        totals = replay(self._log.path, USAGE_FIELDS)
        if self._redis is None:
            self._local = {k: dict(v) for k, v in totals.items()}
        elif totals:
            await self._restore(totals)
        self._log.start(totals)

    async def _restore(self, totals: Totals) -> None:
        script = self._redis.register_script(_RESTORE)  # type: ignore[union-attr]
        restored = 0
        try:
            for key_id, tot in totals.items():
                args: list[Any] = []
                for f in USAGE_FIELDS:
                    args += [f, int(tot.get(f, 0))]
                restored += int(await script(keys=[self.redis_key(key_id)], args=args))
        except Exception as exc:  # Redis down at start: serve on, its totals stay as they are
            _log.warning("ailb_usage_restore_failed", error=str(exc))
            return
        if restored:
            _log.info("ailb_usage_restored_from_log", keys=restored)

    def redis_key(self, key_id: str) -> str:
        """The Redis hash of one key's totals (``cost_nusd`` is its spend)."""
        return f"{self._prefix}usage:{key_id}"

    def may_wait(self) -> bool:
        """Whether recording could suspend now (Redis aside): the usage log is full."""
        return self._log is not None and self._log.full

    def local_spend(self, key_id: str) -> int:
        return self._local.get(key_id, {}).get("cost_nusd", 0)

    async def record(self, rec: UsageRecord) -> None:
        data: dict[str, Any] = {f: getattr(rec, f) for f in RECORD_FIELDS}
        if self._redis is None:
            add_record(self._local, USAGE_FIELDS, data)  # before any await: spend is current
        if self._log is not None:
            data["ts"] = round(time.time(), 3)
            await self._log.append(data)
        if self._redis is not None:
            pipe = self._redis.pipeline(transaction=False)
            h = self.redis_key(rec.key_id)
            pipe.hincrby(h, "requests", 1)
            for f in USAGE_FIELDS[1:]:
                pipe.hincrby(h, f, int(data[f]))
            await pipe.execute()

    async def totals(self, key_id: str) -> dict[str, int]:
        if self._redis is not None:
            raw = await self._redis.hgetall(self.redis_key(key_id))
            return {f: int(raw.get(f.encode(), raw.get(f, 0)) or 0) for f in USAGE_FIELDS}
        return dict(self._local.get(key_id, dict.fromkeys(USAGE_FIELDS, 0)))

    async def spend_nusd(self, key_id: str) -> int:
        if self._redis is not None:
            raw = await self._redis.hget(self.redis_key(key_id), "cost_nusd")
            return int(raw or 0)
        return self._local.get(key_id, {}).get("cost_nusd", 0)

    async def close(self) -> None:
        if self._log is not None:
            await self._log.close()
