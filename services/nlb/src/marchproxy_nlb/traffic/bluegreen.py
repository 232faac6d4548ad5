"""Blue/green and canary splits per module (pure): which version a new connection goes to.

Weights per (module, version) come from desired state (``deployments``) or RPC. New connections
choose a version by smooth weighted round robin over the versions that have a routable instance,
so a 90/10 split is exact over every 100 connections; open connections are never moved. When the
newest version's failure ratio crosses ``rollback_error_rate`` (after ``min_samples``
connections), the split rolls back to the other versions by itself.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .balancer import SmoothWeighted

DEFAULT_ROLLBACK_ERROR_RATE = 0.5
DEFAULT_MIN_SAMPLES = 20
HISTORY = 50
MAX_DEPLOYMENTS = 1_000


@dataclass(slots=True)
class VersionStats:
    connections: int = 0
    failures: int = 0

    @property
    def error_rate(self) -> float:
        return self.failures / self.connections if self.connections else 0.0


@dataclass(slots=True)
class Split:
    module: str
    weights: dict[str, int]  # version -> 0..100
    candidate: str = ""  # the version being rolled out (newest), watched for auto rollback
    status: str = "in_progress"
    stats: dict[str, VersionStats] = field(default_factory=dict)
    rr: SmoothWeighted = field(default_factory=SmoothWeighted)


class BlueGreen:
    def __init__(
        self,
        *,
        rollback_error_rate: float = DEFAULT_ROLLBACK_ERROR_RATE,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rollback_error_rate = rollback_error_rate
        self.min_samples = min_samples
        self._clock = clock
        self.splits: dict[str, Split] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=HISTORY)

    @staticmethod
    def validate(deployments: object, field: str = "deployments") -> list[str]:
        """``deployments`` of the nlb snapshot (UpdateNLBConfig's ``traffic_split`` too)."""
        if not isinstance(deployments, list):
            return [f"{field} must be a list of objects"]
        if len(deployments) > MAX_DEPLOYMENTS:
            return [f"at most {MAX_DEPLOYMENTS} {field}"]
        errors = []
        for i, d in enumerate(deployments):
            if not isinstance(d, Mapping):
                errors.append(f"{field}[{i}] must be an object")
                continue
            module, version = d.get("module"), d.get("version")
            if not (isinstance(module, str) and module and isinstance(version, str) and version):
                errors.append(f"{field}[{i}]: module and version are required (strings)")
            w = d.get("traffic_weight", 0)
            if (
                isinstance(w, bool)
                or not isinstance(w, int | float)
                or not math.isfinite(w)
                or not 0 <= w <= 100
            ):
                errors.append(f"{field}[{i}].traffic_weight must be a number 0-100")
        return errors

    def load(
        self, deployments: Iterable[Mapping[str, Any]], *, keep_rollbacks: bool = True
    ) -> None:
        """Replace every split; stats of unchanged versions carry over.

        A split that rolled back by itself stays rolled back while the candidate (newest)
        version is the one that failed: desired state that still lists it (every reload of an
        unchanged snapshot does) must not send traffic back to it. A new candidate version
        starts a new rollout. ``keep_rollbacks=False`` (an operator's explicit UpdateNLBConfig)
        takes the weights as given."""
        by_module: dict[str, dict[str, int]] = {}
        for d in deployments:
            by_module.setdefault(str(d["module"]), {})[str(d["version"])] = int(
                d.get("traffic_weight", 0)
            )
        new: dict[str, Split] = {}
        for module, weights in by_module.items():
            old = self.splits.get(module)
            split = Split(module=module, weights=weights, candidate=_newest(weights))
            if old is not None:
                split.stats = {v: s for v, s in old.stats.items() if v in weights}
                split.rr = old.rr
                if (
                    keep_rollbacks
                    and old.status == "rolled_back"
                    and old.candidate == split.candidate
                    and _roll_back(split)
                ):
                    split.status = "rolled_back"
            new[module] = split
        self.splits = new

    def set_weight(self, module: str, version: str, weight: int) -> Split:
        split = self.splits.setdefault(module, Split(module=module, weights={}))
        split.weights[version] = weight
        split.candidate = _newest(split.weights)
        split.status = "in_progress"
        return split

    def choose(self, module: str, available: Iterable[str]) -> str | None:
        """The version for a new connection, among versions with a routable instance.
        ``None`` means no split applies (any instance will do)."""
        split = self.splits.get(module)
        if split is None:
            return None
        avail = set(available)
        items = [(v, w) for v, w in split.weights.items() if v in avail]
        if not items or all(w == 0 for _, w in items):
            return None
        return split.rr.pick(items)

    def record(self, module: str, version: str, *, failed: bool) -> dict[str, Any] | None:
        """Count a connection outcome; returns the rollback event if one was triggered."""
        split = self.splits.get(module)
        if split is None or version not in split.weights:
            return None
        st = split.stats.setdefault(version, VersionStats())
        st.connections += 1
        st.failures += int(failed)
        if (
            version == split.candidate
            and split.status != "rolled_back"
            and st.connections >= self.min_samples
            and st.error_rate > self.rollback_error_rate
            and len(split.weights) > 1
        ):
            return self.rollback(module, reason=f"error rate {st.error_rate:.0%} on {version}")
        return None

    def rollback(self, module: str, reason: str) -> dict[str, Any] | None:
        split = self.splits.get(module)
        if split is None:
            return None
        bad = split.candidate
        if not _roll_back(split):
            return None
        others = [v for v in split.weights if v != bad]
        split.status = "rolled_back"
        event = {
            "timestamp": self._clock(),
            "module": module,
            "from_version": bad,
            "to_versions": others,
            "reason": reason,
        }
        self.events.append(event)
        return event

    def status(self) -> list[dict[str, Any]]:
        out = []
        for split in self.splits.values():
            versions = sorted(split.weights)
            blue = next((v for v in versions if v != split.candidate), split.candidate)
            out.append(
                {
                    "module": split.module,
                    "version": split.candidate,
                    "blue_version": blue,
                    "green_version": split.candidate,
                    "traffic_split_percent": split.weights.get(split.candidate, 0),
                    "weights": dict(split.weights),
                    "status": split.status,
                    "error_rates": {v: round(s.error_rate, 4) for v, s in split.stats.items()},
                }
            )
        return out


def _roll_back(split: Split) -> bool:
    """Weight 0 for the candidate, the rest shared evenly; False if there is no other version."""
    others = [v for v in split.weights if v != split.candidate]
    if not others:
        return False
    for v in split.weights:
        split.weights[v] = 0 if v == split.candidate else round(100 / len(others))
    return True


def _version_key(v: str) -> tuple[Any, ...]:
    parts: list[Any] = []
    for p in v.lstrip("v").replace("-", ".").split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return tuple(parts)


def _newest(weights: Mapping[str, int]) -> str:
    return max(weights, key=_version_key) if weights else ""
