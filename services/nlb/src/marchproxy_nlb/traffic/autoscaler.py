"""The autoscaler: scaling policies evaluated against the load modules report (rules pure,
actions through an executor).

A policy (seed 000): ``module, min_instances, max_instances, scale_up_threshold,
scale_down_threshold, cooldown_seconds, metric (cpu | memory | connections | requests),
enabled``. The metric is averaged over the module's live (non-draining) instances: ``cpu`` in
percent, ``memory`` in MiB, ``connections`` the NLB's open connections, ``requests`` requests per
second. Below ``min`` or above ``max`` is corrected at once; otherwise one step up or down per
cooldown. Instances an executor started that have not registered yet count as instances, and
an executor that saw a module fail to start holds further starts back (``Executor.backoff``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from marchproxy.v1 import nlb_pb2
from marchproxy_common.tasks import cancel_and_wait, spawn
from marchproxy_nlb.metrics import NlbMetrics
from marchproxy_nlb.registry.table import Instance, InstanceRegistry

_log = structlog.get_logger("marchproxy.nlb.autoscaler")

METRICS = ("cpu", "memory", "connections", "requests")
MAX_REPLICAS = 1_000
HISTORY = 100


class Executor(Protocol):
    """Starts and stops module instances; the registry shows what actually runs."""

    name: str

    async def scale(self, module: str, current: int, target: int) -> str: ...
    def pending(self, module: str) -> int:
        """Instances started that have not registered yet: they count as instances."""

    def backoff(self, module: str) -> float:
        """Seconds before the module may be started again (after failed starts); 0: now."""

    async def close(self, *, keep_instances: bool = False) -> None:
        """Release the executor; ``keep_instances``: leave what it started running (a hitless
        restart hands the modules to the new NLB, which sees them register)."""


@dataclass(frozen=True, slots=True)
class Policy:
    module: str
    min_instances: int = 1
    max_instances: int = 1
    scale_up_threshold: float = 80.0
    scale_down_threshold: float = 20.0
    cooldown_seconds: float = 60.0
    metric: str = "cpu"
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    module: str
    current: int
    target: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.target > self.current else "down"


def metric_value(metric: str, instances: Sequence[Instance]) -> float:
    if not instances:
        return 0.0
    values: list[float]
    if metric == "cpu":
        values = [i.cpu_percent for i in instances]
    elif metric == "memory":
        values = [i.memory_bytes / (1024 * 1024) for i in instances]
    elif metric == "connections":
        values = [float(max(i.active_connections, i.reported_connections)) for i in instances]
    else:
        values = [i.requests_per_second for i in instances]
    return sum(values) / len(values)


def decide(
    policy: Policy,
    instances: Sequence[Instance],
    now: float,
    last_action: float | None,
    *,
    pending: int = 0,
) -> Decision | None:
    """The one rule: min/max first, then one step per cooldown on the averaged metric.
    ``pending`` instances (started, not registered yet) count towards the number of instances
    but carry no load."""
    current = len(instances) + pending
    if current < policy.min_instances:
        return Decision(policy.module, current, policy.min_instances, "below_min")
    if current > policy.max_instances:
        return Decision(policy.module, current, policy.max_instances, "above_max")
    if last_action is not None and now - last_action < policy.cooldown_seconds:
        return None
    value = metric_value(policy.metric, instances)
    if value > policy.scale_up_threshold and current < policy.max_instances:
        return Decision(policy.module, current, current + 1, f"high_{policy.metric}")
    if value < policy.scale_down_threshold and current > policy.min_instances:
        return Decision(policy.module, current, current - 1, f"low_{policy.metric}")
    return None


def parse_policies(raw: Sequence[Mapping[str, Any]]) -> tuple[list[Policy], list[str]]:
    policies, errors = [], []
    for i, p in enumerate(raw):
        try:
            pol = Policy(
                module=str(p["module"]),
                min_instances=int(p.get("min_instances", 1)),
                max_instances=int(p.get("max_instances", 1)),
                scale_up_threshold=float(p.get("scale_up_threshold", 80)),
                scale_down_threshold=float(p.get("scale_down_threshold", 20)),
                cooldown_seconds=float(p.get("cooldown_seconds", 60)),
                metric=str(p.get("metric", "cpu")),
                enabled=bool(p.get("enabled", True)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            errors.append(f"scaling_policies[{i}]: {exc!r}")
            continue
        if not 0 <= pol.min_instances <= pol.max_instances <= MAX_REPLICAS:
            errors.append(f"scaling_policies[{i}]: need 0 <= min <= max <= {MAX_REPLICAS}")
        elif pol.metric not in METRICS:
            errors.append(f"scaling_policies[{i}].metric must be one of {', '.join(METRICS)}")
        elif pol.scale_down_threshold >= pol.scale_up_threshold:
            errors.append(f"scaling_policies[{i}]: scale_down_threshold must be below scale_up")
        elif pol.cooldown_seconds < 0:
            errors.append(f"scaling_policies[{i}].cooldown_seconds must not be negative")
        else:
            policies.append(pol)
    return policies, errors


class Autoscaler:
    def __init__(
        self,
        registry: InstanceRegistry,
        metrics: NlbMetrics,
        executor: Executor,
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.executor = executor
        self.interval = interval
        self._clock = clock
        self.policies: dict[str, Policy] = {}
        self.last_action: dict[str, float] = {}
        self.last_evaluation: float | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return any(p.enabled for p in self.policies.values())

    def validate(self, raw: Sequence[Mapping[str, Any]]) -> list[str]:
        return parse_policies(raw)[1]

    def load(self, raw: Sequence[Mapping[str, Any]]) -> None:
        policies, _ = parse_policies(raw)
        self.policies = {p.module: p for p in policies}

    def live(self, module: str) -> list[Instance]:
        return [i for i in self.registry.by_module(module) if not i.draining]

    async def evaluate(self) -> list[Decision]:
        now = self._clock()
        self.last_evaluation = time.time()
        done = []
        for policy in list(self.policies.values()):
            instances = self.live(policy.module)
            self.metrics.current_replicas.labels(policy.module).set(len(instances))
            if not policy.enabled:
                continue
            decision = decide(
                policy,
                instances,
                now,
                self.last_action.get(policy.module),
                pending=self.executor.pending(policy.module),
            )
            if decision is None:
                continue
            if decision.direction == "up" and self.executor.backoff(policy.module) > 0:
                continue  # failed starts: the executor says when to try again
            await self._act(decision)
            done.append(decision)
        return done

    async def _act(self, d: Decision) -> str:
        self.last_action[d.module] = self._clock()
        try:
            detail = await self.executor.scale(d.module, d.current, d.target)
            ok = True
        except Exception as exc:  # an executor failure is recorded, never fatal
            detail, ok = f"failed: {exc!r}", False
            _log.warning("scale_failed", module=d.module, target=d.target, error=repr(exc))
        self.metrics.scale_operations.labels(d.module, d.direction).inc()
        self.history.append(
            {
                "timestamp": datetime.now(UTC).isoformat(),
                "module": d.module,
                "protocol": d.module,
                "direction": d.direction,
                "previous_replicas": d.current,
                "new_replicas": d.target,
                "reason": d.reason,
                "executor": self.executor.name,
                "ok": ok,
                "detail": detail,
            }
        )
        _log.info(
            "scaled",
            module=d.module,
            direction=d.direction,
            previous=d.current,
            target=d.target,
            reason=d.reason,
        )
        return detail

    async def trigger(
        self, module: str, target: int, reason: str, dry_run: bool
    ) -> nlb_pb2.TriggerScalingResponse:
        current = len(self.live(module)) + self.executor.pending(module)
        if target == 0:  # evaluate the module's policy now
            policy = self.policies.get(module)
            if policy is None:
                return nlb_pb2.TriggerScalingResponse(
                    success=False,
                    message=f"no scaling policy for {module!r}",
                    current_instances=current,
                    target_instances=current,
                )
            d = decide(
                policy,
                self.live(module),
                self._clock(),
                None,
                pending=self.executor.pending(module),
            )
            target = d.target if d is not None else current
        target = max(0, min(target, MAX_REPLICAS))
        if dry_run or target == current:
            return nlb_pb2.TriggerScalingResponse(
                success=True,
                message="dry run" if dry_run else "already at target",
                current_instances=current,
                target_instances=target,
            )
        detail = await self._act(Decision(module, current, target, reason))
        return nlb_pb2.TriggerScalingResponse(
            success=not detail.startswith("failed"),
            message=detail,
            current_instances=current,
            target_instances=target,
        )

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.evaluate()

    def start(self) -> None:
        self._task = spawn(self._loop(), name="nlb autoscaler")

    async def stop(self, *, keep_instances: bool = False) -> None:
        await cancel_and_wait(self._task)
        await self.executor.close(keep_instances=keep_instances)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "executor": self.executor.name,
            "last_evaluation": datetime.fromtimestamp(self.last_evaluation, UTC).isoformat()
            if self.last_evaluation
            else None,
            "policies": [
                {
                    "module": p.module,
                    "min_instances": p.min_instances,
                    "max_instances": p.max_instances,
                    "metric": p.metric,
                    "current_replicas": len(self.live(p.module)),
                    "pending_replicas": self.executor.pending(p.module),
                    "start_backoff_seconds": round(self.executor.backoff(p.module), 3),
                    "enabled": p.enabled,
                }
                for p in self.policies.values()
            ],
            "recent_scaling_history": list(self.history)[-20:],
        }
