"""Prometheus metrics of the API, declared once and injected (app key)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class ApiMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        object.__setattr__(
            self,
            "requests",
            Counter(
                "marchproxy_api_requests_total",
                "HTTP requests",
                ["method", "route", "status"],
                registry=r,
            ),
        )
        object.__setattr__(
            self,
            "latency",
            Histogram(
                "marchproxy_api_request_duration_seconds",
                "HTTP request latency",
                ["method", "route"],
                registry=r,
            ),
        )
        object.__setattr__(
            self,
            "config_version",
            Gauge("marchproxy_api_config_version", "Last committed config_version", registry=r),
        )
        object.__setattr__(
            self,
            "publishes",
            Counter(
                "marchproxy_api_state_publishes_total",
                "Snapshots written to Redis",
                ["component", "result"],
                registry=r,
            ),
        )
        object.__setattr__(
            self,
            "publish_pending",
            Gauge(
                "marchproxy_api_state_publish_pending",
                "Snapshots committed but not yet in Redis",
                registry=r,
            ),
        )
        object.__setattr__(
            self,
            "republishes",
            Counter(
                "marchproxy_api_state_republishes_total",
                "Times every snapshot was queued again for Redis (keys missing, reconnect)",
                ["reason"],
                registry=r,
            ),
        )
        object.__setattr__(
            self,
            "login_failures",
            Counter("marchproxy_api_login_failures_total", "Failed logins", registry=r),
        )

    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)
    config_version: Gauge = field(init=False)
    publishes: Counter = field(init=False)
    publish_pending: Gauge = field(init=False)
    republishes: Counter = field(init=False)
    login_failures: Counter = field(init=False)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
