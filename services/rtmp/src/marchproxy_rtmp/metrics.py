"""Prometheus metrics of the RTMP module, read from the server's plain counters at scrape time
(the fan-out hot path only bumps ints)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from marchproxy_rtmp.server import RtmpServer


class RtmpCollector(Collector):
    def __init__(self, server: RtmpServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        s = self._server
        c = s.counters
        d = c.delivery

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"marchproxy_rtmp_{name}", doc, value=value)

        yield counter("connections", "RTMP connections accepted", c.connections_total)
        yield counter("received_bytes", "Bytes received from RTMP clients", c.bytes_in)
        yield counter("sent_bytes", "Bytes sent to RTMP clients", c.bytes_out + d.bytes_out)
        yield counter(
            "protocol_errors", "Connections closed for protocol errors", c.protocol_errors
        )
        yield counter("proxy_rejected", "Connections refused by PROXY protocol", c.proxy_rejected)
        yield counter("connects_rejected", "connect commands refused", c.rejected_connects)
        yield counter("publishes", "Streams published", c.publish_total)
        yield counter("publishes_rejected", "Publish attempts refused", c.publish_rejected)
        yield counter("plays", "Play requests accepted", c.plays_total)
        yield counter("frames_sent", "Media messages written to players", d.frames_sent)
        yield counter("frames_skipped", "Media messages skipped for slow players", d.frames_skipped)
        yield counter("players_dropped", "Players disconnected for being slow", d.players_dropped)
        yield counter(
            "idle_publishers_dropped",
            "Publishers dropped for sending no media",
            c.idle_publishers_dropped,
        )
        relay = CounterMetricFamily(
            "marchproxy_rtmp_relays", "Relay sessions started/failed", labels=["kind", "result"]
        )
        relay.add_metric(["push", "started"], c.relay_push_started)
        relay.add_metric(["push", "failed"], c.relay_push_failed)
        relay.add_metric(["pull", "started"], c.relay_pull_started)
        relay.add_metric(["pull", "failed"], c.relay_pull_failed)
        yield relay
        yield GaugeMetricFamily(
            "marchproxy_rtmp_active_connections", "Open RTMP connections", value=len(s.connections)
        )
        yield GaugeMetricFamily(
            "marchproxy_rtmp_streams",
            "Streams with a publisher",
            value=len(s.registry.publishing()),
        )
        yield GaugeMetricFamily(
            "marchproxy_rtmp_players",
            "Players attached to streams",
            value=s.registry.player_count(),
        )


def make_registry(server: RtmpServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RtmpCollector(server))
    return registry
