"""The RTMP module's hooks for the shared module runtime."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marchproxy.v1 import types_pb2
from marchproxy_common.module.hooks import BaseModuleHooks, BoundAddress, LoadReport
from marchproxy_rtmp.config import RtmpSettings, config_from_snapshot
from marchproxy_rtmp.metrics import make_registry
from marchproxy_rtmp.server import RtmpServer


class RtmpHooks(BaseModuleHooks):
    module_type = types_pb2.MODULE_TYPE_RTMP
    protocols = (types_pb2.PROTOCOL_RTMP,)
    default_module_id = "rtmp"

    def __init__(self, settings: RtmpSettings) -> None:
        self.settings = settings
        self.server = RtmpServer(settings)
        self.metrics_registry = make_registry(self.server)
        self._routes: list[dict[str, Any]] = []

    @property
    def module_id(self) -> str:
        return self.settings.module_id or self.default_module_id

    async def start_data_plane(self) -> BoundAddress:
        if self.settings.rtmp_hls_port >= 0:
            await self.server.start_hls(self.settings.rtmp_hls_host, self.settings.rtmp_hls_port)
        addr: BoundAddress = await self.server.start(
            self.settings.data_host, self.settings.data_port
        )
        return addr

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        config, errors = config_from_snapshot(snapshot, self.module_id)
        if errors or config is None:
            return errors or ["invalid RTMP config"]
        self.server.apply(config)
        routes = snapshot.get("routes") or []
        self._routes = [
            dict(r) for r in routes if isinstance(r, Mapping) and r.get("module") == self.module_id
        ]
        return []

    def routes(self) -> list[dict[str, Any]]:
        return list(self._routes)

    def load(self) -> LoadReport:
        c = self.server.counters
        d = c.delivery
        streams = self.server.registry.publishing()
        return LoadReport(
            active_connections=len(self.server.connections),
            total_connections=c.connections_total,
            requests_total=c.publish_total + c.plays_total,
            errors_total=c.protocol_errors + c.publish_rejected,
            bytes_in=c.bytes_in,
            bytes_out=c.bytes_out + d.bytes_out,
            custom={
                "streams": float(len(streams)),
                "players": float(self.server.registry.player_count()),
                "ingest_bitrate_bps": float(sum(round(s.bitrate_bps) for s in streams)),
                "frames_sent": float(d.frames_sent),
                "frames_skipped": float(d.frames_skipped),
                "players_dropped": float(d.players_dropped),
                "publishes_rejected": float(c.publish_rejected),
                "relays_failed": float(c.relay_push_failed + c.relay_pull_failed),
            },
        )

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.server.status()
        return status

    async def check_health(self, deep: bool) -> dict[str, str]:
        return {"data_plane": "ok" if self.server._server is not None else "not started"}

    async def stop_accepting(self) -> None:
        await self.server.stop_accepting()

    async def drain(self, deadline: float) -> None:
        await self.server.drain(deadline)
