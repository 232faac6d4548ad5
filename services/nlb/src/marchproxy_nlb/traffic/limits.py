"""Connection rate limits: which buckets a new connection draws from (rules pure, decisions
through ``marchproxy_common.ratelimit``).

Targets: ``listener:<port>``, ``protocol:<name>`` (or a bare protocol name), ``client_ip`` (one
bucket per client address), ``route:<name>`` and ``global``. Scope ``local`` keeps buckets in
this process; ``cluster`` (the API calls it ``global``) shares them through Redis (GCRA) with
every NLB replica, falling back to local buckets while Redis is unreachable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from marchproxy_common.ratelimit import MAX_LOCAL_BUCKETS, ClusterLimiter, Decision

from .routing import ConnInfo

MAX_RULES = 1_000
MAX_RATE = 1e9
MAX_TARGET = 300
MAX_CLIENT_BUCKETS = MAX_LOCAL_BUCKETS  # per-client-IP buckets kept per limiter


@dataclass(frozen=True, slots=True)
class LimitRule:
    target: str
    rate: float
    burst: float
    scope: str = "local"

    @property
    def per_client(self) -> bool:
        return self.target == "client_ip"

    @property
    def shared_key(self) -> str | None:
        """The bucket key of a rule with one bucket (None for client_ip)."""
        if self.per_client:
            return None
        kind, _, _ = self.target.partition(":")
        if self.target == "global" or kind in ("listener", "protocol", "route"):
            return self.target
        return f"protocol:{self.target}"

    def key(self, c: ConnInfo, protocol_name: str, route: str | None) -> str | None:
        kind, _, arg = self.target.partition(":")
        if self.target == "global":
            return "global"
        if kind == "listener":
            return self.target if arg == str(c.listener_port) else None
        if kind == "protocol":
            return self.target if arg == protocol_name else None
        if self.target == "client_ip":
            return f"client_ip:{c.client_ip}"
        if kind == "route":
            return self.target if route is not None and arg == route else None
        return f"protocol:{protocol_name}" if self.target == protocol_name else None


def _number(value: object) -> TypeGuard[float]:
    # JSON true is a Python int: a boolean is never a rate
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_rules(raw: object) -> tuple[list[LimitRule], list[str]]:
    """``rate_limits`` of the nlb snapshot (also what UpdateNLBConfig accepts)."""
    rules: list[LimitRule] = []
    errors: list[str] = []
    if not isinstance(raw, list):
        return [], ["rate_limits must be a list of objects"]
    if len(raw) > MAX_RULES:
        return [], [f"at most {MAX_RULES} rate limits"]
    for i, r in enumerate(raw):
        if not isinstance(r, Mapping):
            errors.append(f"rate_limits[{i}] must be an object")
            continue
        target = r.get("target")
        rate = r.get("requests_per_second")
        burst = r.get("burst", r.get("burst_size")) or rate
        scope = r.get("scope") or "local"
        if not isinstance(target, str) or not target or len(target) > MAX_TARGET:
            errors.append(f"rate_limits[{i}].target is required (a string)")
            continue
        if not _number(rate) or not 0 < rate <= MAX_RATE:
            errors.append(f"rate_limits[{i}].requests_per_second must be a number > 0")
            continue
        if not _number(burst) or not 1 <= burst <= MAX_RATE:
            errors.append(f"rate_limits[{i}].burst must be a number >= 1")
            continue
        if scope == "global":  # the API's name for it (RateLimitIn.scope)
            scope = "cluster"
        if scope not in ("local", "cluster"):
            errors.append(f"rate_limits[{i}].scope must be local or cluster (or global)")
            continue
        rules.append(LimitRule(target, float(rate), float(burst), scope))
    return rules, errors


class ConnectionLimits:
    """Two kinds of buckets in two bounded limiters, so that they cannot evict each other.

    Listener, protocol, route and global buckets are few (one per rule) and must never be
    forgotten: a forgotten bucket comes back full. Per-client-IP buckets are one per address
    and can churn without end; they live in their own limiter, capped at
    ``max_client_buckets`` (the oldest is dropped first). Each kind has a local limiter and,
    with Redis, a cluster one (whose local fallback buckets are kept apart the same way)."""

    def __init__(
        self,
        redis_url: str = "",
        prefix: str = "marchproxy:nlb:rl:",
        *,
        max_client_buckets: int = MAX_CLIENT_BUCKETS,
    ) -> None:
        self.local = ClusterLimiter(None)
        self.clients = ClusterLimiter(None, max_local_buckets=max_client_buckets)
        self.cluster = self.local
        self.cluster_clients = self.clients
        if redis_url:
            self.cluster = ClusterLimiter(redis_url, prefix=prefix)
            self.cluster_clients = ClusterLimiter(
                redis_url, prefix=prefix, max_local_buckets=max_client_buckets
            )
        self.rules: tuple[LimitRule, ...] = ()
        self.totals: dict[str, list[int]] = {}  # bucket -> [allowed, denied]
        #: bucket (rule target) -> whole tokens left after its last decision (for a client_ip
        #: or cluster bucket the only value we have: the last client's, or Redis's)
        self.remaining: dict[str, int] = {}
        #: called with (bucket, decision) after every decision, e.g. to set a gauge
        self.on_decision: Callable[[str, Decision], None] | None = None

    async def admit(
        self, c: ConnInfo, protocol_name: str, route: str | None
    ) -> tuple[str | None, list[str]]:
        """Draw one token from every bucket that applies. Returns (denied bucket or None,
        buckets allowed)."""
        allowed: list[str] = []
        for rule in self.rules:
            key = rule.key(c, protocol_name, route)
            if key is None:
                continue
            limiter = self._limiter(rule)
            decision = await limiter.allow(key, rule.rate, rule.burst)
            bucket = rule.target
            tally = self.totals.setdefault(bucket, [0, 0])
            self.remaining[bucket] = decision.remaining
            if self.on_decision is not None:
                self.on_decision(bucket, decision)
            if not decision.allowed:
                tally[1] += 1
                return bucket, allowed
            tally[0] += 1
            allowed.append(bucket)
        return None, allowed

    def tokens_available(self, rule: LimitRule) -> float:
        """Tokens in a rule's bucket now: read from a local shared bucket (by its key, which
        for a bare protocol target is ``protocol:<name>``), else as of its last decision; a
        bucket nobody drew from yet is full."""
        key = rule.shared_key
        if key is not None and (rule.scope == "local" or self._limiter(rule).backend == "local"):
            bucket = self._limiter(rule).local_buckets.get(key)
            if bucket is not None:
                return bucket.tokens
        return float(self.remaining.get(rule.target, rule.burst))

    def _limiter(self, rule: LimitRule) -> ClusterLimiter:
        cluster = rule.scope == "cluster"
        if rule.per_client:
            return self.cluster_clients if cluster else self.clients
        return self.cluster if cluster else self.local

    def status(self) -> dict[str, Any]:
        buckets: dict[str, Any] = {}
        for rule in self.rules:
            tally = self.totals.get(rule.target, [0, 0])
            entry: dict[str, Any] = {
                "capacity": rule.burst,
                "refill_rate": rule.rate,
                "scope": rule.scope,
                "allowed_total": tally[0],
                "denied_total": tally[1],
            }
            entry["tokens_available"] = round(self.tokens_available(rule), 3)
            buckets[rule.target] = entry
        backend: dict[str, Any] = dict(self.cluster.stats())
        backend["client_buckets"] = len(self.clients.local_buckets) + (
            len(self.cluster_clients.local_buckets)
            if self.cluster_clients is not self.clients
            else 0
        )
        backend["shared_buckets"] = len(self.local.local_buckets) + (
            len(self.cluster.local_buckets) if self.cluster is not self.local else 0
        )
        return {"buckets": buckets, "backend": backend}

    async def close(self) -> None:
        for limiter in {id(x): x for x in (self.local, self.clients, self.cluster,
                                            self.cluster_clients)}.values():  # fmt: skip
            await limiter.close()
