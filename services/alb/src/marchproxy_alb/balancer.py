"""Backend pools: target selection, passive outlier ejection, health state. Pure: the clock and
the random source are injected; nothing here does I/O.

Policies: round robin, least connections, smooth weighted round robin (nginx's algorithm),
random, random-two-choices (power of two choices), consistent hash on a header, a cookie or the
client IP (a ring of virtual nodes, so a target leaving moves only its own keys).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .routing import HealthCheckConfig, OutlierConfig, Target

VNODES_PER_WEIGHT = 64
MAX_VNODES = 100_000
RETRY_BUDGET_RATIO = 0.2  # retries may add at most 20% load (Envoy/Finagle style budget)
RETRY_BUDGET_MAX = 10.0


@dataclass(slots=True)
class TargetState:
    target: Target
    active: int = 0
    healthy: bool = True  # set by active health checks
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    hc_successes: int = 0
    hc_failures: int = 0
    current_weight: int = 0  # smooth weighted round robin state
    requests: int = 0
    failures: int = 0

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now and self.target.weight > 0


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(slots=True)
class RetryBudget:
    """Each request deposits ``ratio`` tokens; a retry spends one."""

    ratio: float = RETRY_BUDGET_RATIO
    cap: float = RETRY_BUDGET_MAX
    tokens: float = RETRY_BUDGET_MAX

    def deposit(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.cap else self.cap

    def try_spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class BackendPool:
    targets: tuple[Target, ...]
    policy: str = "round_robin"
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    clock: Callable[[], float] = lambda: 0.0
    rng: random.Random = field(default_factory=random.Random)
    states: dict[Target, TargetState] = field(init=False)
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    #: concurrent requests per target (0 = unlimited): a simple circuit breaker
    max_active: int = 0
    _rr: int = 0
    _ring: list[tuple[int, Target]] = field(init=False)
    _ring_keys: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.states = {t: TargetState(t) for t in self.targets}
        ring: list[tuple[int, Target]] = []
        if self.policy in ("consistent_hash", "ip_hash"):
            per = max(1, min(VNODES_PER_WEIGHT, MAX_VNODES // max(1, len(self.targets))))
            for t in self.targets:
                for i in range(per * max(1, min(t.weight, 16))):
                    ring.append((_hash64(f"{t.key}#{i}".encode()), t))
            ring.sort(key=lambda x: x[0])
        self._ring = ring
        self._ring_keys = [h for h, _ in ring]

    # ------------------------------------------------------------------ selection

    def available(self, exclude: Iterable[Target] = ()) -> list[TargetState]:
        """Healthy, non-ejected targets. When passive ejection has removed every healthy target,
        the ejected ones are used anyway (Envoy's "panic" routing): guessing beats a sure 503.
        Targets failing *active* health checks are never used."""
        now = self.clock()
        ex = set(exclude)
        cap = self.max_active or 1 << 62
        out = [
            s
            for s in self.states.values()
            if s.target not in ex and s.active < cap and s.available(now)
        ]
        if not out:
            out = [
                s
                for s in self.states.values()
                if s.target not in ex and s.active < cap and s.healthy and s.target.weight > 0
            ]
        return out

    def saturated(self) -> bool:
        """Whether some healthy target exists but every one is at ``max_active``."""
        healthy = [s for s in self.states.values() if s.healthy and s.target.weight > 0]
        return (
            bool(healthy)
            and bool(self.max_active)
            and all(s.active >= self.max_active for s in healthy)
        )

    def pick(self, hash_key: bytes | None = None, exclude: Iterable[Target] = ()) -> Target | None:
        if len(self.states) == 1 and not exclude:
            (only,) = self.states.values()
            if not (only.healthy and only.target.weight > 0):
                return None
            if self.max_active and only.active >= self.max_active:
                return None
            return only.target
        cands = self.available(exclude)
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0].target
        p = self.policy
        if p in ("consistent_hash", "ip_hash") and hash_key is not None:
            return self._pick_hash(hash_key, {c.target for c in cands})
        if p in ("least_connections", "least_conn"):
            low = min(c.active for c in cands)
            best = [c for c in cands if c.active == low]
            self._rr += 1
            return best[self._rr % len(best)].target
        if p in ("weighted", "weighted_round_robin"):
            return self._pick_swrr(cands)
        if p == "random":
            return self.rng.choice(cands).target
        if p in ("random_two_choices", "p2c"):
            a, b = self.rng.sample(cands, 2)
            return (a if a.active <= b.active else b).target
        self._rr += 1
        return cands[self._rr % len(cands)].target

    def _pick_swrr(self, cands: list[TargetState]) -> Target:
        total = 0
        best: TargetState | None = None
        for c in cands:
            c.current_weight += c.target.weight
            total += c.target.weight
            if best is None or c.current_weight > best.current_weight:
                best = c
        assert best is not None
        best.current_weight -= total
        return best.target

    def _pick_hash(self, key: bytes, allowed: set[Target]) -> Target | None:
        if not self._ring:
            return None
        h = _hash64(key)
        i = bisect.bisect_left(self._ring_keys, h)
        n = len(self._ring)
        for step in range(n):
            t = self._ring[(i + step) % n][1]
            if t in allowed:
                return t
        return None

    # ------------------------------------------------------------------ accounting

    def begin(self, target: Target) -> None:
        st = self.states.get(target)
        if st is not None:
            st.active += 1
            st.requests += 1

    def end(self, target: Target, *, succeeded: bool = False) -> None:
        """A request to ``target`` is over; ``succeeded`` is ``record_success`` as well."""
        st = self.states.get(target)
        if st is not None:
            if st.active > 0:
                st.active -= 1
            if succeeded:
                st.consecutive_failures = 0

    def record_success(self, target: Target) -> None:
        st = self.states.get(target)
        if st is not None:
            st.consecutive_failures = 0

    def record_failure(self, target: Target) -> bool:
        """Passive outlier detection; returns True when this failure ejected the target."""
        st = self.states.get(target)
        if st is None:
            return False
        st.failures += 1
        st.consecutive_failures += 1
        if st.consecutive_failures < self.outlier.consecutive_failures:
            return False
        now = self.clock()
        if st.ejected_until > now:
            return False
        ejected = sum(1 for s in self.states.values() if s.ejected_until > now)
        if (ejected + 1) * 100.0 > self.outlier.max_ejection_percent * len(self.states):
            return False
        st.ejections += 1
        st.ejected_until = now + self.outlier.base_ejection_time * min(st.ejections, 10)
        st.consecutive_failures = 0
        return True

    def record_health(self, target: Target, ok: bool) -> bool | None:
        """Active health check result; returns the new health when it flipped, else None."""
        st = self.states.get(target)
        if st is None:
            return None
        if ok:
            st.hc_failures = 0
            st.hc_successes += 1
            if not st.healthy and st.hc_successes >= self.health.healthy_threshold:
                st.healthy = True
                st.ejected_until = 0.0
                return True
        else:
            st.hc_successes = 0
            st.hc_failures += 1
            if st.healthy and st.hc_failures >= self.health.unhealthy_threshold:
                st.healthy = False
                return False
        return None

    def snapshot(self) -> list[dict[str, object]]:
        now = self.clock()
        return [
            {
                "target": s.target.key,
                "weight": s.target.weight,
                "healthy": s.healthy,
                "ejected": s.ejected_until > now,
                "active": s.active,
                "requests": s.requests,
                "failures": s.failures,
            }
            for s in self.states.values()
        ]
