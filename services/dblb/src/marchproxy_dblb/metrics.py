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
        pools = [
            ([p.database, p.user, p.mode, p.role], p.counts(), p.size, p.stats)
            for p in h.manager.all_pools()
        ]
        pools += [
            ([m["database"], m["user"], "session", "mysql"], m, h.mysql_pool_size, m["stats"])
            for m in h.mysql_pool_rows()
        ]
        for lv, c, size, s in pools:
            g_clients.add_metric([*lv, "active"], c["cl_active"])
            g_clients.add_metric([*lv, "waiting"], c["cl_waiting"])
            for state in ("active", "idle", "used", "login"):
                g_servers.add_metric([*lv, state], c[f"sv_{state}"])
            g_size.add_metric(lv, size)
            g_maxwait.add_metric(lv, c["cl_waiting"])
            counters["xact"].add_metric(lv, s.xact_count)
            counters["query"].add_metric(lv, s.query_count)
            counters["xact_time"].add_metric(lv, s.xact_time)
            counters["query_time"].add_metric(lv, s.query_time)
            counters["wait"].add_metric(lv, s.wait_count)
            counters["wait_time"].add_metric(lv, s.wait_time)
            counters["wait_timeouts"].add_metric(lv, s.wait_timeouts)
            counters["logins"].add_metric(lv, s.server_logins)
            counters["login_errors"].add_metric(lv, s.server_login_errors)
            counters["rx"].add_metric(lv, s.bytes_received)
            counters["tx"].add_metric(lv, s.bytes_sent)
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
        yield CounterMetricFamily(
            "marchproxy_dblb_cancels_forwarded",
            "Cancel requests forwarded",
            value=h.cancels_forwarded,
        )
