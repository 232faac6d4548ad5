"""Prometheus metrics, read from pool state at scrape time (no per-query metric calls)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .module import DblbHooks


class DblbCollector(Collector):
    def __init__(self, hooks: DblbHooks) -> None:
        self._hooks = hooks

    def collect(self) -> Iterator[Metric]:
        h = self._hooks
        labels = ["database", "user", "pool_mode", "role"]
        g_clients = GaugeMetricFamily(
            "marchproxy_dblb_pool_clients", "Clients of a pool, by state", labels=[*labels, "state"]
        )
        g_servers = GaugeMetricFamily(
            "marchproxy_dblb_pool_servers",
            "Server connections of a pool, by state",
            labels=[*labels, "state"],
        )
        g_size = GaugeMetricFamily(
            "marchproxy_dblb_pool_size", "Configured pool size", labels=labels
        )
        g_maxwait = GaugeMetricFamily(
            "marchproxy_dblb_pool_waiting_clients", "Clients waiting for a server", labels=labels
        )
        counters = {
            "xact": CounterMetricFamily(
                "marchproxy_dblb_transactions",
                "Transactions (server links) completed",
                labels=labels,
            ),
            "query": CounterMetricFamily(
                "marchproxy_dblb_queries", "Queries (Query/Sync) forwarded", labels=labels
            ),
            "xact_time": CounterMetricFamily(
                "marchproxy_dblb_transaction_duration_seconds",
                "Total time servers were linked to clients",
                labels=labels,
            ),
            "query_time": CounterMetricFamily(
                "marchproxy_dblb_query_duration_seconds",
                "Total time queries were in flight on servers",
                labels=labels,
            ),
            "wait": CounterMetricFamily(
                "marchproxy_dblb_client_waits",
                "Times a client had to wait for a server",
                labels=labels,
            ),
            "wait_time": CounterMetricFamily(
                "marchproxy_dblb_client_wait_seconds", "Total client wait time", labels=labels
            ),
            "wait_timeouts": CounterMetricFamily(
                "marchproxy_dblb_client_wait_timeouts",
                "Clients that gave up waiting (query_wait_timeout)",
                labels=labels,
            ),
            "logins": CounterMetricFamily(
                "marchproxy_dblb_server_logins", "Successful server logins", labels=labels
            ),
            "login_errors": CounterMetricFamily(
                "marchproxy_dblb_server_login_errors", "Failed server logins", labels=labels
            ),
            "rx": CounterMetricFamily(
                "marchproxy_dblb_server_bytes_received", "Bytes from servers", labels=labels
            ),
            "tx": CounterMetricFamily(
                "marchproxy_dblb_server_bytes_sent", "Bytes to servers", labels=labels
            ),
        }
        # every pool: ours, MySQL's and, with several workers, theirs (summed by labels)
        for row in h.pool_report():
            lv, c, size, st = row["labels"], row["counts"], row["size"], row["stats"]
            g_clients.add_metric([*lv, "active"], c["cl_active"])
            g_clients.add_metric([*lv, "waiting"], c["cl_waiting"])
            for state in ("active", "idle", "used", "login"):
                g_servers.add_metric([*lv, state], c[f"sv_{state}"])
            g_size.add_metric(lv, size)
            g_maxwait.add_metric(lv, c["cl_waiting"])
            counters["xact"].add_metric(lv, st.get("xact_count", 0))
            counters["query"].add_metric(lv, st.get("query_count", 0))
            counters["xact_time"].add_metric(lv, st.get("xact_time", 0))
            counters["query_time"].add_metric(lv, st.get("query_time", 0))
            counters["wait"].add_metric(lv, st.get("wait_count", 0))
            counters["wait_time"].add_metric(lv, st.get("wait_time", 0))
            counters["wait_timeouts"].add_metric(lv, st.get("wait_timeouts", 0))
            counters["logins"].add_metric(lv, st.get("server_logins", 0))
            counters["login_errors"].add_metric(lv, st.get("server_login_errors", 0))
            counters["rx"].add_metric(lv, st.get("bytes_received", 0))
            counters["tx"].add_metric(lv, st.get("bytes_sent", 0))
        yield g_clients
        yield g_servers
        yield g_size
        yield g_maxwait
        yield from counters.values()
        yield GaugeMetricFamily(
            "marchproxy_dblb_clients", "Connected clients (all pools)", value=h.manager.client_count
        )
        yield CounterMetricFamily(
            "marchproxy_dblb_protocol_errors",
            "Clients closed for protocol violations",
            value=h.protocol_errors,
        )
        yield CounterMetricFamily(
            "marchproxy_dblb_auth_failures", "Failed client authentications", value=h.auth_failures
        )
        supervisor = h.supervisor
        if supervisor is not None:
            yield GaugeMetricFamily(
                "marchproxy_dblb_workers",
                "Data-plane processes running (the main process included)",
                value=supervisor.running(),
            )
            yield CounterMetricFamily(
                "marchproxy_dblb_worker_restarts",
                "Worker processes started again after they died",
                value=supervisor.restarts,
            )
        yield CounterMetricFamily(
            "marchproxy_dblb_cancels_forwarded",
            "Cancel requests forwarded",
            value=h.cancels_forwarded,
        )
