"""Choosing one instance among candidates (pure): least connections, smooth weighted round
robin, or a consistent hash on the client IP."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal, Protocol, TypeGuard, TypeVar

Strategy = Literal["least_conn", "round_robin", "hash"]
STRATEGIES: tuple[Strategy, ...] = ("least_conn", "round_robin", "hash")


def is_strategy(name: str) -> TypeGuard[Strategy]:
    return name in STRATEGIES


class Candidate(Protocol):
    @property
    def instance_id(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def active_connections(self) -> int: ...


#: the caller's own candidate type (the registry's ``Instance``) comes back from ``pick``
C = TypeVar("C", bound=Candidate)


class SmoothWeighted:
    """nginx's smooth weighted round robin: exact shares over any window of sum(weights) picks,
    interleaved rather than bursty."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, items: Sequence[tuple[str, int]]) -> str | None:
        live = [(key, w) for key, w in items if w > 0]
        if not live:
            return None
        total = sum(w for _, w in live)
        best_key, best_val = "", None
        for key, w in live:
            val = self._current.get(key, 0) + w
            self._current[key] = val
            if best_val is None or val > best_val:
                best_key, best_val = key, val
        self._current[best_key] -= total
        if len(self._current) > 4 * len(live) + 16:  # forget keys that left
            keep = {k for k, _ in live}
            self._current = {k: v for k, v in self._current.items() if k in keep}
        return best_key


def _hrw(key: str, instance_id: str) -> int:
    digest = hashlib.blake2b(f"{key}|{instance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Balancer:
    def __init__(self, strategy: Strategy = "least_conn") -> None:
        self.strategy = strategy
        self._rr = SmoothWeighted()

    def pick(self, candidates: Sequence[C], client_ip: str = "") -> C | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if self.strategy == "round_robin":
            key = self._rr.pick([(c.instance_id, max(c.weight, 0)) for c in candidates])
            return next((c for c in candidates if c.instance_id == key), None)
        if self.strategy == "hash" and client_ip:
            # rendezvous hashing: a client keeps its instance while that instance lives, and
            # only the clients of a departed instance move
            return max(candidates, key=lambda c: _hrw(client_ip, c.instance_id) * max(c.weight, 1))
        # least connections relative to weight; ties broken round-robin so that a burst of new
        # connections at zero load still spreads
        best = min(c.active_connections / max(c.weight, 1) for c in candidates)
        tied = [c for c in candidates if c.active_connections / max(c.weight, 1) == best]
        if len(tied) == 1:
            return tied[0]
        key = self._rr.pick([(c.instance_id, max(c.weight, 1)) for c in tied])
        return next((c for c in tied if c.instance_id == key), tied[0])
