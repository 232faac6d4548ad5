"""Every ALB metric, declared once on the module's own registry (the runtime serves it).

Per-request series (requests, latency, upstream requests, bytes) are plain dict counters in
:class:`RequestStats`, exported by a custom collector at scrape time: updating them costs a few
dict operations instead of prometheus_client's per-call label lookup and locking.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RequestStats:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.requests: dict[tuple[str, str], int] = {}
        self.upstream: dict[tuple[str, str], int] = {}
        # per route: [count per bucket ..., count in +Inf], sum
        self.hist: dict[str, tuple[list[int], list[float]]] = {}
        self.bytes_in = 0
        self.bytes_out = 0

    def observe(
        self,
        route: str,
        status_class: str,
        backend: str | None,
        duration: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        key = (route, status_class)
        self.requests[key] = self.requests.get(key, 0) + 1
        if backend is not None:
            bkey = (backend, status_class)
            self.upstream[bkey] = self.upstream.get(bkey, 0) + 1
        h = self.hist.get(route)
        if h is None:
            h = ([0] * (len(self.buckets) + 1), [0.0])
            self.hist[route] = h
        h[0][bisect.bisect_left(self.buckets, duration)] += 1
        h[1][0] += duration
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "marchproxy_alb_requests",
            "Requests answered, by route and status class",
            labels=["route", "status_class"],
        )
        for (route, sc), n in sorted(self.requests.items()):
            c.add_metric([route, sc], n)
        yield c
        u = CounterMetricFamily(
            "marchproxy_alb_upstream_requests",
            "Requests sent upstream, by backend target and status class",
            labels=["backend", "status_class"],
        )
        for (backend, sc), n in sorted(self.upstream.items()):
            u.add_metric([backend, sc], n)
        yield u
        hf = HistogramMetricFamily(
            "marchproxy_alb_request_duration_seconds",
            "Time from request head to the end of the response, by route",
            labels=["route"],
        )
        for route, (counts, total) in sorted(self.hist.items()):
            acc = 0
            out: list[tuple[str, float]] = []
            for bound, n in zip(self.buckets, counts, strict=False):
                acc += n
                out.append((repr(float(bound)), acc))
            acc += counts[-1]
            out.append(("+Inf", acc))
            hf.add_metric([route], out, total[0])
        yield hf
        b = CounterMetricFamily(
            "marchproxy_alb_bytes", "Body bytes proxied, by direction", labels=["direction"]
        )
        b.add_metric(["in"], self.bytes_in)
        b.add_metric(["out"], self.bytes_out)
        yield b


class AlbMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        self.stats = RequestStats()
        r.register(self.stats)
        self.upstream_connections = Gauge(
            "marchproxy_alb_upstream_connections",
            "Open upstream connections (active + idle in the pool)",
            registry=r,
        )
        self.upstream_connects = Counter(
            "marchproxy_alb_upstream_connects",
            "Upstream TCP connections opened, by backend target",
            ["backend"],
            registry=r,
        )
        self.downstream_connections = Gauge(
            "marchproxy_alb_connections", "Open client connections", registry=r
        )
        self.refusals = Counter(
            "marchproxy_alb_refusals",
            "Requests or connections refused by the ALB itself, by reason",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "marchproxy_alb_retries", "Upstream retries, by route", ["route"], registry=r
        )
        self.ejections = Counter(
            "marchproxy_alb_outlier_ejections",
            "Targets ejected by passive outlier detection or failed health checks",
            ["backend", "cause"],
            registry=r,
        )
        self.internal_errors = Counter(
            "marchproxy_alb_internal_errors", "Bugs caught at the top level", registry=r
        )
        self.config_rejected = Counter(
            "marchproxy_alb_config_rejected", "Snapshots rejected whole", registry=r
        )
