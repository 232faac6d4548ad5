"""Pooled gRPC channels to modules (one per host:port, least recently used evicted beyond
``max_channels``) and the HealthCheck call."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import structlog

from marchproxy.v1 import module_pb2, module_pb2_grpc, types_pb2
from marchproxy_common.tasks import spawn

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
    def __init__(
        self, cluster_api_key: str, timeout: float, max_channels: int = MAX_CHANNELS
    ) -> None:
        self._key = cluster_api_key
        self._timeout = timeout
        self.max_channels = max_channels
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def targets(self) -> list[str]:
        """Pooled targets, least recently used first."""
        return list(self._channels)

    def stub(self, host: str, port: int) -> module_pb2_grpc.ModuleServiceStub:
        target = f"{host}:{port}"
        chan = self._channels.get(target)
        if chan is None:
            while len(self._channels) >= self.max_channels:
                old_target, old = self._channels.popitem(last=False)
                self._close_later(old_target, old)
            chan = grpc.aio.insecure_channel(target)
            self._channels[target] = chan
        else:
            self._channels.move_to_end(target)
        return module_pb2_grpc.ModuleServiceStub(chan)

    def _close_later(self, target: str, chan: grpc.aio.Channel) -> None:
        """Close an evicted channel; calls in flight on it get ``timeout`` to finish."""
        _log.debug("grpc_channel_evicted", target=target)
        task = spawn(chan.close(grace=self._timeout), name=f"grpc-close {target}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

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
        chans, self._channels = list(self._channels.values()), OrderedDict()
        for chan in chans:
            await chan.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
