"""Every NLB metric, declared once (seed 002 names) and injected where it is used."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class NlbMetrics:
    """The NLB's Prometheus metrics on their own registry (one per NLB instance, so tests can run
    several in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # seed 002
        self.routed_connections = Counter(
            "nlb_routed_connections_total",
            "Connections routed, by protocol and module",
            ["protocol", "module"],
            registry=r,
        )
        self.routing_errors = Counter(
            "nlb_routing_errors_total",
            "Routing errors by protocol and error type",
            ["protocol", "error_type"],
            registry=r,
        )
        self.handoffs = Counter(
            "nlb_handoffs_total",
            "Connections handed to a co-located module over its hand-over socket instead of "
            "relayed, by module and result (ok, failed: relayed instead)",
            ["module", "result"],
            registry=r,
        )
        self.active_connections = Gauge(
            "nlb_active_connections",
            "Connections currently relayed, per module",
            ["module"],
            registry=r,
        )
        self.ratelimit_allowed = Counter(
            "nlb_ratelimit_allowed_total",
            "Connections allowed by the rate limiter",
            ["bucket"],
            registry=r,
        )
        self.ratelimit_denied = Counter(
            "nlb_ratelimit_denied_total",
            "Connections denied by the rate limiter",
            ["bucket"],
            registry=r,
        )
        self.ratelimit_tokens = Gauge(
            "nlb_ratelimit_tokens_available",
            "Tokens available per rate-limit bucket",
            ["bucket"],
            registry=r,
        )
        self.scale_operations = Counter(
            "nlb_scale_operations_total",
            "Scaling operations by module and direction",
            ["module", "direction"],
            registry=r,
        )
        self.current_replicas = Gauge(
            "nlb_current_replicas", "Current replica count per module", ["module"], registry=r
        )
        self.bluegreen_split = Gauge(
            "nlb_bluegreen_traffic_split",
            "Traffic weight percent per module version",
            ["module", "version"],
            registry=r,
        )
        # registry and control plane
        self.registered_instances = Gauge(
            "nlb_registered_instances",
            "Registered module instances by module and health",
            ["module", "health"],
            registry=r,
        )
        self.registrations = Counter(
            "nlb_registrations_total", "RegisterModule calls accepted", ["module"], registry=r
        )
        self.heartbeats = Counter(
            "nlb_heartbeats_total", "Heartbeats received", ["module"], registry=r
        )
        self.expirations = Counter(
            "nlb_instance_expirations_total",
            "Instances removed after missing heartbeats",
            ["module"],
            registry=r,
        )
        self.grpc_requests = Counter(
            "nlb_grpc_requests_total",
            "NLBService RPCs by method and gRPC code",
            ["method", "code"],
            registry=r,
        )
        self.config_version = Gauge(
            "nlb_config_version", "Desired-state version the NLB has applied", registry=r
        )
        # data plane
        self.connections_total = Counter(
            "nlb_connections_total",
            "Client connections accepted, by listener",
            ["listener"],
            registry=r,
        )
        self.bytes = Counter(
            "nlb_bytes_total", "Bytes relayed by direction", ["direction"], registry=r
        )
        self.sniff_seconds = Histogram(
            "nlb_sniff_duration_seconds",
            "Time to classify a new connection",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.connect_seconds = Histogram(
            "nlb_upstream_connect_duration_seconds",
            "Time to connect to a module instance",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=r,
        )

    def child(self, metric: Counter | Gauge, *values: str) -> Any:
        """``metric.labels(*values)``, cached: the data path asks for the same few per connection
        and ``labels()`` costs a lock and a tuple build each time. Label values are bounded
        (listeners, modules, directions), so the cache is too."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def forget(self, metric: Counter | Gauge, *values: str) -> None:
        """Drop one labelled child (e.g. the gauge of a rate limit that no longer exists)."""
        if self._children.pop((id(metric), values), None) is not None:
            metric.remove(*values)
