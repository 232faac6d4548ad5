"""The NLB's shared state and the read models built from it (/status, metrics gauges).

``NlbCore`` ties the registry, metrics, settings and (when present) the data plane together; the
gRPC servicer and the REST admin endpoint both read through it, so they never disagree.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from marchproxy.v1 import nlb_pb2, types_pb2

from .config import NlbSettings
from .grpc.validate import (
    format_address,
    health_name,
    module_type_name,
    protocol_name,
)
from .metrics import NlbMetrics
from .registry.table import Instance, InstanceRegistry

MAX_REPORTED_METRICS = 1_000  # data points kept per instance from ReportMetrics
MAX_HISTORY = 200  # registration events kept for /status


class DataPlaneLike(Protocol):
    """What the control plane needs from ``marchproxy_nlb.dataplane.DataPlane``."""

    async def start(self) -> None: ...
    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]: ...
    def validate_dynamic(self, update: Mapping[str, Any]) -> list[str]: ...
    def apply_dynamic(self, update: Mapping[str, Any]) -> None: ...
    def rpc_overrides(self) -> dict[str, Any]: ...
    async def stop_accepting(self) -> None: ...
    async def drain(self, deadline: float) -> None: ...
    def status(self) -> dict[str, Any]: ...
    async def route_request(
        self, req: nlb_pb2.RouteRequestRequest
    ) -> nlb_pb2.RouteRequestResponse: ...
    async def validate_route(
        self, req: nlb_pb2.ValidateRouteRequest
    ) -> nlb_pb2.ValidateRouteResponse: ...
    async def update_routing(
        self, req: nlb_pb2.UpdateRoutingRequest
    ) -> nlb_pb2.UpdateRoutingResponse: ...
    async def get_routing_table(
        self, req: nlb_pb2.GetRoutingTableRequest
    ) -> nlb_pb2.GetRoutingTableResponse: ...
    async def rebalance_load(
        self, req: nlb_pb2.RebalanceLoadRequest
    ) -> nlb_pb2.RebalanceLoadResponse: ...
    async def get_load_distribution(
        self, req: nlb_pb2.GetLoadDistributionRequest
    ) -> nlb_pb2.GetLoadDistributionResponse: ...
    async def trigger_scaling(
        self, req: nlb_pb2.TriggerScalingRequest
    ) -> nlb_pb2.TriggerScalingResponse: ...


#: keys UpdateNLBConfig may change at run time; the data plane validates and applies these
DATAPLANE_CONFIG_KEYS = frozenset({"rate_limits", "traffic_split"})
DYNAMIC_CONFIG_KEYS = frozenset({"heartbeat_timeout", *DATAPLANE_CONFIG_KEYS})


class NlbCore:
    def __init__(
        self,
        settings: NlbSettings,
        registry: InstanceRegistry,
        metrics: NlbMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.started_at = clock()
        self.dataplane: DataPlaneLike | None = None
        self.state_status: Callable[[], dict[str, Any]] = dict
        self.applied_config_version = 0
        self.reported: dict[str, nlb_pb2.ReportMetricsRequest] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=MAX_HISTORY)
        self.dynamic_config: dict[str, Any] = {"heartbeat_timeout": registry.heartbeat_timeout}
        self.on_config: Callable[[], Awaitable[None]] | None = None
        registry.subscribe(self._on_registry_event)

    # -- UpdateNLBConfig values ----------------------------------------------------------------

    def validate_dynamic(self, update: Mapping[str, Any]) -> list[str]:
        """The data plane's checks of an update's ``rate_limits`` / ``traffic_split`` (the
        keys and the heartbeat timeout are checked by ``validate_dynamic_config``)."""
        keys = sorted(DATAPLANE_CONFIG_KEYS & update.keys())
        if not keys:
            return []
        if self.dataplane is None:
            return [f"{', '.join(keys)}: the data plane is not running here"]
        return self.dataplane.validate_dynamic(update)

    def apply_dynamic(self, update: Mapping[str, Any]) -> None:
        """Put a validated update in force (from the RPC, or carried over a hand-over)."""
        if "heartbeat_timeout" in update:
            self.registry.heartbeat_timeout = float(update["heartbeat_timeout"])
        if DATAPLANE_CONFIG_KEYS & update.keys() and self.dataplane is not None:
            self.dataplane.apply_dynamic(update)
        self.dynamic_config.update(
            {k: v for k, v in update.items() if k not in DATAPLANE_CONFIG_KEYS}
        )

    # -- registry events -----------------------------------------------------------------------

    def _on_registry_event(self, event: str, inst: Instance) -> None:
        if event == "expired":
            self.metrics.expirations.labels(inst.module_id).inc()
        if event in ("expired", "unregistered"):
            self.reported.pop(inst.instance_id, None)
        self.history.append(
            {
                "time": time.time(),
                "event": event,
                "instance_id": inst.instance_id,
                "module_id": inst.module_id,
                "version": inst.version,
                "health": health_name(inst.health),
            }
        )
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        gauge = self.metrics.registered_instances
        gauge.clear()
        for (module, health), n in Tally(
            (i.module_id, health_name(i.health)) for i in self.registry.all()
        ).items():
            gauge.labels(module, health).set(n)

    # -- read models ---------------------------------------------------------------------------

    def uptime(self) -> float:
        return self.clock() - self.started_at

    def total_active(self) -> int:
        return sum(i.active_connections for i in self.registry.all())

    def total_routed(self) -> int:
        return sum(i.routed_total for i in self.registry.all())

    def router_stats(self) -> dict[str, Any]:
        protocols: dict[str, dict[str, int]] = {}
        for inst in self.registry.all():
            for p in inst.protocols:
                entry = protocols.setdefault(
                    protocol_name(p),
                    {"active_modules": 0, "active_connections": 0, "total_routed": 0},
                )
                if inst.routable:
                    entry["active_modules"] += 1
                entry["active_connections"] += inst.active_connections
                entry["total_routed"] += inst.routed_total
        errors = []
        for metric in self.metrics.routing_errors.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    errors.append(
                        {
                            "protocol": sample.labels["protocol"],
                            "error_type": sample.labels["error_type"],
                            "count": int(sample.value),
                        }
                    )
        return {"protocols": protocols, "errors": errors}

    def module_view(self, inst: Instance) -> dict[str, Any]:
        now = self.clock()
        return {
            "instance_id": inst.instance_id,
            "module_id": inst.module_id,
            "module_type": module_type_name(inst.module_type),
            "protocols": sorted(protocol_name(p) for p in inst.protocols),
            "data_address": format_address(inst.data_host, inst.data_port),
            "grpc_address": format_address(inst.grpc_host, inst.grpc_port)
            if inst.grpc_port
            else "",
            "version": inst.version,
            "weight": inst.weight,
            "capacity": inst.capacity,
            "health": health_name(inst.health),
            "draining": inst.draining,
            "active_connections": inst.active_connections,
            "routed_total": inst.routed_total,
            "reported_connections": inst.reported_connections,
            "cpu_percent": inst.cpu_percent,
            "memory_bytes": inst.memory_bytes,
            "requests_total": inst.requests_total,
            "seconds_since_heartbeat": round(now - inst.last_heartbeat, 3),
            "applied_config_version": inst.applied_config_version,
            "rejected_config_version": inst.rejected_config_version,
            "rejected_reason": inst.rejected_reason,
            "labels": inst.labels,
        }

    def status(self) -> dict[str, Any]:
        """Seed 002's /status document, with real values."""
        dp = self.dataplane.status() if self.dataplane is not None else {}
        body: dict[str, Any] = {
            "version": self.settings.nlb_version,
            "uptime": round(self.uptime(), 3),
            "rate_limiting": bool(dp.get("rate_limiting", False)),
            "autoscaling": bool(dp.get("autoscaling", False)),
            "bluegreen": bool(dp.get("bluegreen", False)),
            "connection_pooling": bool(dp.get("connection_pooling", False)),
            "router_stats": dp.get("router_stats") or self.router_stats(),
            "ratelimit_stats": dp.get("ratelimit_stats", {"buckets": {}}),
            "autoscaler_stats": dp.get(
                "autoscaler_stats",
                {"enabled": False, "last_evaluation": None, "recent_scaling_history": []},
            ),
            "bluegreen_stats": dp.get("bluegreen_stats", {"active_deployments": []}),
            "client_pool_stats": dp.get(
                "client_pool_stats",
                {
                    "total_connections": self.total_routed(),
                    "active_connections": self.total_active(),
                    "failed_connections": 0,
                    "reconnect_attempts": 0,
                },
            ),
            "modules": [self.module_view(i) for i in self.registry.all()],
            "registration_history": list(self.history)[-50:],
            "config": {"applied_version": self.applied_config_version, **self.state_status()},
        }
        for key, value in dp.items():
            body.setdefault(key, value)
        return {"status": body}

    def nlb_metrics_pb(self) -> nlb_pb2.NLBMetrics:
        instances = self.registry.all()
        by_protocol: dict[str, int] = {}
        for inst in instances:
            for p in inst.protocols:
                by_protocol[protocol_name(p)] = by_protocol.get(protocol_name(p), 0) + (
                    inst.active_connections
                )
        denied = sum(
            s.value
            for m in self.metrics.ratelimit_denied.collect()
            for s in m.samples
            if s.name.endswith("_total")
        )
        errors = sum(
            s.value
            for m in self.metrics.routing_errors.collect()
            for s in m.samples
            if s.name.endswith("_total")
        )
        out = nlb_pb2.NLBMetrics(
            total_connections=self.total_routed(),
            active_connections=self.total_active(),
            routing_errors=int(errors),
            ratelimit_denied=int(denied),
            registered_instances=len(instances),
            healthy_instances=sum(1 for i in instances if i.routable),
            connections_by_protocol=by_protocol,
        )
        out.collected_at.GetCurrentTime()
        return out

    def health(self) -> types_pb2.HealthStatus.ValueType:
        if any(i.routable for i in self.registry.all()) or not len(self.registry):
            return types_pb2.HEALTH_STATUS_HEALTHY
        return types_pb2.HEALTH_STATUS_DEGRADED
