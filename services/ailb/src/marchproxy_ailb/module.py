"""The AILB as a module: hooks the shared runtime calls (data plane, config, load, drain)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any

import structlog
from pydantic import ValidationError

from marchproxy.v1 import types_pb2
from marchproxy_common.http1 import HttpServer, Limits, Response
from marchproxy_common.module.hooks import BaseModuleHooks, BoundAddress, LoadReport
from marchproxy_common.net.listener import stop_serving
from marchproxy_common.net.proxied import wrap_proxy_protocol

from .config import AilbSettings
from .errors import GatewayError
from .gateway import Gateway, error_answer
from .schema import AilbConfig
from .usage import Metrics, UsageStore

_log = structlog.get_logger("marchproxy.ailb")

#: how long a keep-alive client connection may sit idle
CLIENT_KEEPALIVE_S = 75.0
LISTEN_BACKLOG = 1024
#: a Redis call that takes longer fails (and the request is served without it)
REDIS_TIMEOUT_S = 1.0


def extract_config(
    snapshot: Mapping[str, Any], module_id: str
) -> tuple[AilbConfig | None, list[str]]:
    """This module's ``config`` from a snapshot (the module entry named ``module_id``), or the
    snapshot itself when it is a bare AILB config (has ``model_list``)."""
    raw: Any = None
    if "model_list" in snapshot:
        raw = snapshot
    else:
        for mod in snapshot.get("modules") or []:
            if isinstance(mod, Mapping) and mod.get("name") == module_id:
                raw = mod.get("config") or {}
                break
        if raw is None:
            return None, []
    try:
        return AilbConfig.model_validate(raw), []
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            errors.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        return None, errors


class AilbHooks(BaseModuleHooks):
    module_type = types_pb2.MODULE_TYPE_AILB
    protocols = (types_pb2.PROTOCOL_HTTP,)
    default_module_id = "ailb"

    def __init__(self, settings: AilbSettings, *, redis: Any | None = None) -> None:
        self.settings = settings
        self.module_id = settings.module_id or self.default_module_id
        self._own_redis = False
        if redis is None and settings.redis_url:
            import redis.asyncio as aioredis

            redis = aioredis.from_url(
                settings.redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
            )
            self._own_redis = True
        self.redis = redis
        self.metrics = Metrics()
        #: the runtime adds this to the admin /metrics
        self.metrics_registry = self.metrics.registry
        self.usage = UsageStore(
            redis,
            settings.ailb_redis_prefix,
            settings.ailb_usage_log,
            log_max_bytes=settings.ailb_usage_log_max_bytes,
            log_backups=settings.ailb_usage_log_backups,
            on_log_error=lambda _exc: self.metrics.backend_errors.labels("usage_log").inc(),
        )
        self.gateway = Gateway(
            redis=redis,
            prefix=settings.ailb_redis_prefix,
            usage=self.usage,
            metrics=self.metrics,
            max_upstream_body=settings.ailb_max_upstream_body_bytes,
        )
        self.config_version: int | None = None
        self._server: HttpServer | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.address: BoundAddress | None = None

    async def start_data_plane(self) -> BoundAddress:
        loop = asyncio.get_running_loop()
        await self.usage.start()  # totals from the usage log before the first request
        # no access log: usage records and metrics say more, at no per-request log cost; a
        # client that goes away cancels its request (and with it the upstream request)
        self._server = HttpServer(
            self.gateway.handle,
            limits=Limits(
                max_body=self.settings.ailb_max_body_bytes,
                keepalive_timeout=CLIENT_KEEPALIVE_S,
            ),
            error=openai_error,
            on_refused=self.gateway.refused,
        )
        self._listener = await loop.create_server(
            # PROXY v1/v2 from the NLB is stripped before the HTTP server sees the bytes
            wrap_proxy_protocol(
                self._server,
                mode=self.settings.proxy_protocol,
                trusted_sources=self.settings.proxy_trusted_networks(),
            ),
            host=self.settings.data_host,
            port=self.settings.data_port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
        )
        sock = self._listener.sockets[0]
        with_nodelay(sock)
        host, port = sock.getsockname()[:2]
        self.address = BoundAddress(host, port)
        _log.info("ailb_listening", host=host, port=port)
        return self.address

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        config, errors = extract_config(snapshot, self.module_id)
        if errors:
            _log.warning("ailb_config_rejected", errors=errors)
            return errors
        if config is None:
            return []  # nothing for this module in the snapshot: keep what we have
        self.gateway.apply(config)
        self.config_version = (
            snapshot.get("version")
            if isinstance(snapshot.get("version"), int)
            else self.config_version
        )
        _log.info(
            "ailb_config_applied",
            deployments=len(config.model_list),
            keys=len(config.keys),
            version=self.config_version,
        )
        return []

    def load(self) -> LoadReport:
        g = self.gateway
        recent = sorted(g.recent_latency)

        def pct(q: float) -> float:
            return recent[min(len(recent) - 1, int(q * len(recent)))] * 1000 if recent else 0.0

        return LoadReport(
            active_connections=len(self._server.connections) if self._server else 0,
            requests_total=g.requests_total,
            errors_total=g.errors_total,
            latency_p50_ms=pct(0.5),
            latency_p95_ms=pct(0.95),
            latency_p99_ms=pct(0.99),
            custom={"in_flight_requests": float(g.active)},
        )

    def routes(self) -> list[dict[str, Any]]:
        out = []
        for name, group in self.gateway.routed.router.groups.items():
            out.append(
                {
                    "name": name,
                    "match_rules": {"model": name},
                    "backend_config": {
                        "targets": [st.deployment.base_url for st in group.members],
                        "load_balancing": self.gateway.routed.router.settings.strategy,
                    },
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        router = self.gateway.routed.router
        now = router._clock()
        return {
            "config_version": self.config_version,
            "groups": {
                name: [
                    {
                        "deployment": st.key,
                        "provider": st.deployment.provider,
                        "in_flight": st.in_flight,
                        "cooling_down": st.cooldown_until > now,
                        "cooldown_remaining_s": round(max(0.0, st.cooldown_until - now), 3),
                        "latency_ewma_ms": None
                        if st.latency_ewma is None
                        else round(st.latency_ewma * 1000, 3),
                    }
                    for st in group.members
                ]
                for name, group in router.groups.items()
            },
            "keys": len(self.gateway.routed.config.keys),
            "cache": self.gateway.routed.config.cache.enabled,
            "redis": self.redis is not None,
        }

    async def check_health(self, deep: bool) -> dict[str, str]:
        out = {"data_plane": "ok" if self._listener is not None else "not started"}
        if self.redis is not None:
            try:
                await self.redis.ping()
                out["redis"] = "ok"
            except Exception as exc:  # any failure is a health verdict, not a crash
                out["redis"] = f"failed: {exc}"
        return out

    async def stop_accepting(self) -> None:
        if self._listener is not None:
            await stop_serving(self._listener)

    async def drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if self._server is not None:
            await self._server.shutdown(max(0.0, deadline - loop.time()))
        await self.close()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        if self._server is not None:
            await self._server.shutdown(0.1)
            self._server = None
        await self.gateway.close()
        await self.usage.close()  # what is still queued for the usage log is written now
        if self._own_redis and self.redis is not None:
            await self.redis.aclose()
            self.redis = None


def openai_error(status: int, code: str, message: str) -> Response:
    """A request refused by the HTTP server itself (malformed, too large, too slow), in
    OpenAI's error shape like every other answer."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return error_answer(GatewayError(status, message, type=kind, code=code))


def with_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
