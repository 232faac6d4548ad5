"""Pooled gRPC channels to modules (one per host:port) and the HealthCheck call."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import structlog

from marchproxy.v1 import module_pb2, module_pb2_grpc, types_pb2

_log = structlog.get_logger("marchproxy.api.grpc")
MAX_CHANNELS = 1024


@dataclass
class HealthResult:
    healthy: bool
    status: str
    message: str
    checks: dict[str, str] = field(default_factory=dict)
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class ModuleClientManager:
    def __init__(self, cluster_api_key: str, timeout: float) -> None:
        self._key = cluster_api_key
        self._timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, host: str, port: int) -> module_pb2_grpc.ModuleServiceStub:
        target = f"{host}:{port}"
        chan = self._channels.get(target)
        if chan is None:
            if len(self._channels) >= MAX_CHANNELS:
                raise RuntimeError("too many module channels")
            chan = grpc.aio.insecure_channel(target)
            self._channels[target] = chan
        return module_pb2_grpc.ModuleServiceStub(chan)

    async def health(self, host: str, port: int, *, deep: bool = False) -> HealthResult:
        if not host or not port:
            return HealthResult(False, "UNKNOWN", "module has no gRPC address")
        try:
            resp = await self.stub(host, port).HealthCheck(
                module_pb2.HealthCheckRequest(deep=deep),
                metadata=(("x-cluster-api-key", self._key),),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            return HealthResult(False, "UNREACHABLE", f"{exc.code().name}: {exc.details()}")
        except (RuntimeError, ValueError) as exc:
            return HealthResult(False, "UNREACHABLE", str(exc))
        name = types_pb2.HealthStatus.Name(resp.status).removeprefix("HEALTH_STATUS_")
        healthy = resp.status == types_pb2.HEALTH_STATUS_HEALTHY
        return HealthResult(healthy, name, resp.message, dict(resp.checks))

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        for chan in chans:
            await chan.close()
