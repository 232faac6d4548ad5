"""Usage accounting: tokens and cost per key, persisted; Prometheus metrics.

Cost is kept in integer nano-USD so per-key totals add up exactly (prices are USD per million
tokens, so one token costs ``price * 1000`` nano-USD). Cached prompt tokens are priced at the
deployment's ``cached_input`` price. Each record goes to Redis (HINCRBY on
``<prefix>usage:<key_id>``, shared by replicas) and to an append-only JSONL log when configured;
without Redis the totals are rebuilt from the log at start, so nothing is lost on restart.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from marchproxy_ailb.schema import Price

USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nusd")
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


def cost_nusd(price: Price, prompt: int, completion: int, cached: int) -> int:
    cached = min(cached, prompt)
    cached_price = price.input if price.cached_input is None else price.cached_input
    return round(
        ((prompt - cached) * price.input + cached * cached_price + completion * price.output) * 1000
    )


def worst_case_nusd(price: Price, prompt: int, completion: int) -> int:
    """The most ``prompt`` + ``completion`` tokens can cost at this price: every prompt token at
    the dearest prompt price (a cache write may cost more than plain input)."""
    prompt_price = max(price.input, price.cached_input or 0.0)
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
            "Tokens by model, provider and kind (prompt/completion/cached)",
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


class UsageStore:
    def __init__(self, redis: Any | None, prefix: str, log_path: str = "") -> None:
        self._redis = redis
        self._prefix = prefix
        self._log: IO[str] | None = None
        self._local: dict[str, dict[str, int]] = {}
        if log_path:
            if redis is None and os.path.exists(log_path):
                self._replay(log_path)
            self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - owned until close()

    def _replay(self, path: str) -> None:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a crash; the rest still counts
                self._add_local(rec["key_id"], rec)

    def _add_local(self, key_id: str, rec: dict[str, Any]) -> None:
        tot = self._local.setdefault(key_id, dict.fromkeys(USAGE_FIELDS, 0))
        tot["requests"] += 1
        for f in USAGE_FIELDS[1:]:
            tot[f] += int(rec.get(f, 0))

    def redis_key(self, key_id: str) -> str:
        """The Redis hash of one key's totals (``cost_nusd`` is its spend)."""
        return f"{self._prefix}usage:{key_id}"

    def local_spend(self, key_id: str) -> int:
        return self._local.get(key_id, {}).get("cost_nusd", 0)

    async def record(self, rec: UsageRecord) -> None:
        data = {f: getattr(rec, f) for f in RECORD_FIELDS}
        if self._log is not None:
            data["ts"] = round(time.time(), 3)
            self._log.write(json.dumps(data, separators=(",", ":")) + "\n")
            self._log.flush()
        if self._redis is not None:
            pipe = self._redis.pipeline(transaction=False)
            h = self.redis_key(rec.key_id)
            pipe.hincrby(h, "requests", 1)
            for f in USAGE_FIELDS[1:]:
                pipe.hincrby(h, f, int(data[f]))
            await pipe.execute()
        else:
            self._add_local(rec.key_id, data)

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

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
