"""``AlbHooks``: the ALB behind the shared module runtime (the ModuleHooks protocol)."""

from __future__ import annotations

import asyncio
import gc
import ssl
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from marchproxy.v1 import types_pb2
from marchproxy_common.module.hooks import BaseModuleHooks, BoundAddress, LoadReport
from marchproxy_common.native import build_kind
from marchproxy_common.net.listener import stop_serving
from marchproxy_common.net.proxied import wrap_proxy_protocol
from marchproxy_common.net.sockets import (
    ClientListener,
    SocketPoller,
    new_poller,
    start_client_server,
)

from . import proxy
from .config import AlbSettings, Limits
from .http.downstream import DownstreamProtocol
from .http.tlsaccept import TlsAcceptor
from .http.upstream import UpstreamPool
from .metrics import AlbMetrics
from .proxy import DataPlane
from .routing import compile_table
from .tls import SniSelector, SniTable, TlsConfigError

log = structlog.get_logger("marchproxy.alb.module")


#: per-request garbage is mostly acyclic and freed by refcounting; collect young objects
#: less often than the default 700 allocations
GC_GEN0_THRESHOLD = 20_000


class AlbHooks(BaseModuleHooks):
    module_type = types_pb2.MODULE_TYPE_ALB
    protocols: tuple[int, ...] = (
        types_pb2.PROTOCOL_HTTP,
        types_pb2.PROTOCOL_HTTPS,
        types_pb2.PROTOCOL_WEBSOCKET,
    )
    default_module_id = "alb"

    def __init__(self, settings: AlbSettings, *, tune_gc: bool = False) -> None:
        self.settings = settings
        self.tune_gc = tune_gc
        self.module_id = settings.module_id or self.default_module_id
        self.metrics = AlbMetrics()
        self.base_limits = Limits.from_settings(settings)
        self.plane = DataPlane(
            self.base_limits,
            self.metrics,
            access_log_enabled=settings.alb_access_log,
            redis_url=settings.redis_url,
            ratelimit_prefix=settings.alb_ratelimit_prefix,
        )
        self.sni = SniSelector()
        self._servers: list[ClientListener | asyncio.Server] = []
        #: the epoll our client sockets wait on (None: asyncio's own transports, e.g. uvloop)
        self.poller: SocketPoller | None = None
        self._routes: list[dict[str, Any]] = []
        self.module_config: dict[str, Any] = {}
        self.data_address = BoundAddress("", 0)
        self.tls_address: BoundAddress | None = None
        if settings.alb_tls_port < 0:  # no TLS listener: the NLB must not send us TLS
            self.protocols = (types_pb2.PROTOCOL_HTTP, types_pb2.PROTOCOL_WEBSOCKET)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The runtime serves this registry on /metrics next to its own."""
        return self.metrics.registry

    # ------------------------------------------------------------------ lifecycle

    async def start_data_plane(self) -> BoundAddress:
        s = self.settings
        plane = self.plane
        trusted = s.proxy_trusted_networks()
        factory = wrap_proxy_protocol(
            lambda: DownstreamProtocol(plane, scheme="http"),
            mode=s.proxy_protocol,
            on_reject=lambda reason: plane.refused(f"proxy_protocol_{reason}"),
            trusted_sources=trusted,
        )
        # client sockets on our own epoll and transports (asyncio's create_server on uvloop):
        # asyncio's transports cost more per request than all of the ALB's HTTP work
        self.poller = poller = new_poller()
        plane.upstreams.poller = poller  # and upstream sockets on the same epoll
        server = await start_client_server(
            factory,
            s.data_host,
            s.data_port,
            backlog=1024,
            reuse_port=False,
            poller=poller,
            name="http",
        )
        self._servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        self.data_address = BoundAddress(host, port)
        if s.alb_tls_port >= 0:
            sni = self.sni
            tls_factory = wrap_proxy_protocol(
                lambda: TlsAcceptor(plane, lambda: sni.server_context),
                mode=s.proxy_protocol,
                on_reject=lambda reason: plane.refused(f"proxy_protocol_{reason}"),
                trusted_sources=trusted,
            )
            tls_server = await start_client_server(
                tls_factory,
                s.data_host,
                s.alb_tls_port,
                backlog=1024,
                reuse_port=False,
                poller=poller,
                name="https",
            )
            self._servers.append(tls_server)
            h, p = tls_server.sockets[0].getsockname()[:2]
            self.tls_address = BoundAddress(h, p)
        log.info(
            "alb_listening", data=f"{host}:{port}", tls=self.tls_address, build=build_kind(proxy)
        )
        # (the runtime freezes the start-up heap once started, see freeze_startup_heap)
        if self.tune_gc:  # process-wide, so only when we own the process (__main__)
            gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
        return self.data_address

    def extra_addresses(self) -> dict[int, BoundAddress]:
        """The TLS listener, so the NLB sends TLS connections there (not to the plain port)."""
        if self.tls_address is None:
            return {}
        return {
            types_pb2.PROTOCOL_HTTPS: self.tls_address,
            types_pb2.PROTOCOL_TLS: self.tls_address,
        }

    def handoff_factories(self) -> dict[int, Callable[[], asyncio.BaseProtocol]]:
        """The listeners' protocols for connections a co-located NLB hands over (HANDOFF_PATH):
        the client address comes with the hand-over, not in a PROXY header."""
        plane, sni = self.plane, self.sni
        found: dict[int, Callable[[], asyncio.BaseProtocol]] = {
            self.data_address.port: lambda: DownstreamProtocol(plane, scheme="http")
        }
        if self.tls_address is not None:
            found[self.tls_address.port] = lambda: TlsAcceptor(plane, lambda: sni.server_context)
        return found

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        module_cfg: Mapping[str, Any] = {}
        for m in snapshot.get("modules") or []:
            if isinstance(m, Mapping) and m.get("name") == self.module_id:
                module_cfg = m.get("config") or {}
        routes = [
            r
            for r in snapshot.get("routes") or []
            if isinstance(r, Mapping) and r.get("module") in (None, "", self.module_id)
        ]
        defaults = {
            "health_check": module_cfg.get("health_check") or {},
            "outlier_detection": module_cfg.get("outlier_detection") or {},
        }
        if module_cfg.get("max_body_size") is not None:
            defaults["max_body_size"] = module_cfg["max_body_size"]
        table, errors = compile_table(routes, defaults)
        try:
            limits = self.base_limits.merged(module_cfg.get("limits"))
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
            limits = self.base_limits
        tls = module_cfg.get("tls") or {}
        certs = tls.get("certificates") or [] if isinstance(tls, Mapping) else None
        sni_table: SniTable | None = None
        if certs is None or not isinstance(certs, list):
            errors.append("tls.certificates must be a list")
        else:
            try:  # loading reads files and parses keys: not on the event loop
                sni_table = await asyncio.to_thread(SniSelector.compile, certs)
            except TlsConfigError as exc:
                errors.append(str(exc))
        upstream = module_cfg.get("upstream") or {}
        if not isinstance(upstream, Mapping):
            errors.append("upstream must be an object")
            upstream = {}
        ca_file = str(upstream["ca_file"]) if upstream.get("ca_file") else None
        verify = bool(upstream.get("tls_verify", True))
        upstream_tls: ssl.SSLContext | None = None
        try:  # reads the CA store: not on the event loop either
            upstream_tls = await asyncio.to_thread(UpstreamPool.build_tls_context, verify, ca_file)
        except (OSError, ssl.SSLError) as exc:
            errors.append(f"upstream.ca_file {ca_file!r}: {exc}")
        if errors:
            self.metrics.config_rejected.inc()
            log.warning("alb_config_rejected", errors=errors[:10])
            return errors
        assert sni_table is not None and upstream_tls is not None
        self.sni.install(sni_table)  # an empty list clears the certificates
        self.plane.upstreams.install_tls(upstream_tls, verify=verify, ca_file=ca_file)
        self.plane.upstreams.max_idle_per_target = int(
            upstream.get("max_idle_per_target", self.plane.upstreams.max_idle_per_target)
        )
        self.plane.upstreams.idle_timeout = float(
            upstream.get("idle_timeout", self.plane.upstreams.idle_timeout)
        )
        self.plane.limits = limits
        self.plane.install(table)
        self._routes = [dict(r) for r in routes]
        self.module_config = dict(module_cfg)
        log.info("alb_config_applied", routes=len(table.routes), version=snapshot.get("version"))
        return []

    async def stop_accepting(self) -> None:
        for s in self._servers:
            if isinstance(s, ClientListener):
                s.close()  # nothing accepted is left without its protocol
            else:
                await stop_serving(s)
        self.plane.accepting = False

    async def drain(self, deadline: float) -> None:
        await self.plane.drain(deadline)
        await self.plane.close()
        for s in self._servers:
            s.close()
        self._servers.clear()
        if self.poller is not None:
            self.poller.close()  # (once its last socket has closed)
            self.poller = None
            self.plane.upstreams.poller = None

    async def close(self) -> None:
        """Stop everything now (tests and embedding programs)."""
        await self.stop_accepting()
        await self.drain(asyncio.get_running_loop().time())

    # ------------------------------------------------------------------ reporting

    def routes(self) -> list[dict[str, Any]]:
        return list(self._routes)

    def load(self) -> LoadReport:
        p = self.plane
        lat = sorted(p.latencies)
        pct = (0.0, 0.0, 0.0)
        if len(lat) >= 2:
            q = statistics.quantiles(lat, n=100, method="inclusive")
            pct = (q[49] * 1000, q[94] * 1000, q[98] * 1000)
        return LoadReport(
            active_connections=p.active_connections,
            total_connections=p.total_connections,
            requests_total=p.requests_total,
            errors_total=p.errors_total,
            bytes_in=p.bytes_in,
            bytes_out=p.bytes_out,
            latency_p50_ms=pct[0],
            latency_p95_ms=pct[1],
            latency_p99_ms=pct[2],
            custom={
                "upstream_connections": float(p.upstreams.open_connections),
                "upstream_idle_connections": float(p.upstreams.idle_connections),
            },
        )

    def status(self) -> dict[str, Any]:
        p = self.plane
        return {
            "build": build_kind(proxy),  # compiled by mypyc in the image
            "routes": [r.name for r in p.table.routes],
            "backends": {name: pool.snapshot() for name, pool in p.pools.items()},
            "upstream_connections": p.upstreams.open_connections,
            "upstream_idle_connections": p.upstreams.idle_connections,
            "upstream_connects_total": p.upstreams.opened,
            "refusals": dict(p.refusal_counts),
            "cluster_rate_limiter": p.cluster_limiter.stats() if p.cluster_limiter else None,
            "tls_server_names": self.sni.names,
            "tls_address": (
                f"{self.tls_address.host}:{self.tls_address.port}" if self.tls_address else None
            ),
        }

    async def check_health(self, deep: bool) -> dict[str, str]:
        out = {"data_plane": "ok" if self._servers else "not listening"}
        if deep:
            for name, pool in self.plane.pools.items():
                out[f"route:{name}"] = "ok" if pool.available() else "no healthy target"
        return out
