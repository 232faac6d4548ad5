"""``ModuleRuntime``: the one lifecycle every module shares (DESIGN.md section 2).

start → load desired state → bind data port + gRPC + admin HTTP → RegisterModule → Heartbeat
every HEARTBEAT_INTERVAL, or more often when the NLB's heartbeat timeout asks for it
(re-register when the NLB says it does not know us, e.g. after an NLB restart; keep serving
while the NLB is unreachable) → on SIGTERM, or a DRAIN/SHUTDOWN instruction in a heartbeat
answer: UnregisterModule(graceful)
so the NLB sends nothing new → health NOT_SERVING → stop accepting → drain in-flight work up to
DRAIN_TIMEOUT → stop gRPC → UnregisterModule(remove) → exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from marchproxy.v1 import module_pb2_grpc, nlb_pb2, types_pb2
from marchproxy_common.admin_http import AdminServer
from marchproxy_common.config import ModuleSettings, load_settings
from marchproxy_common.configfile import ConfigFileError, load_config_file
from marchproxy_common.grpc_server import GrpcServer, TlsFiles
from marchproxy_common.logs import configure_logging
from marchproxy_common.loop import freeze_startup_heap
from marchproxy_common.loop import run as run_on_loop
from marchproxy_common.module.hooks import BoundAddress, ModuleHooks
from marchproxy_common.module.routes import validate_routes
from marchproxy_common.module.servicer import BaseModuleServicer
from marchproxy_common.net.handoff import HANDOFF_LABEL, HandoffReceiver
from marchproxy_common.nlb_client import NlbClient
from marchproxy_common.tasks import cancel_and_wait, spawn

_log = structlog.get_logger("marchproxy.module")

SERVICE_NAME = "marchproxy.v1.ModuleService"
S = TypeVar("S", bound=ModuleSettings)

REGISTRATION_ERROR_BACKOFF_MAX = 30.0  # seconds between retries after an unexpected error
HEARTBEATS_PER_TIMEOUT = 3  # beats the NLB should see within one of its HEARTBEAT_TIMEOUTs


def heartbeat_pace(own_interval: float, nlb_timeout_seconds: int) -> float:
    """Our heartbeat interval, tightened so the NLB hears from us several times within its
    timeout: an NLB configured with HEARTBEAT_TIMEOUT=1 must not expire a module that was
    started with the default 5 s interval."""
    if nlb_timeout_seconds <= 0:
        return own_interval
    return min(own_interval, nlb_timeout_seconds / HEARTBEATS_PER_TIMEOUT)


_COMPONENT_BY_TYPE: dict[int, str] = {
    types_pb2.MODULE_TYPE_ALB: "alb",
    types_pb2.MODULE_TYPE_DBLB: "dblb",
    types_pb2.MODULE_TYPE_AILB: "ailb",
    types_pb2.MODULE_TYPE_RTMP: "rtmp",
}


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.heartbeats = Counter(
            "marchproxy_module_heartbeats_total",
            "Heartbeats sent, by result",
            ["result"],
            registry=r,
        )
        self.registrations = Counter(
            "marchproxy_module_registrations_total",
            "RegisterModule attempts, by result",
            ["result"],
            registry=r,
        )
        self.registered = Gauge(
            "marchproxy_module_registered", "1 while the NLB knows this instance", registry=r
        )
        self.config_version = Gauge(
            "marchproxy_module_config_version", "Desired-state version applied", registry=r
        )
        self.config_rejected = Counter(
            "marchproxy_module_config_rejected_total",
            "Snapshots rejected by validation",
            registry=r,
        )
        self.active_connections = Gauge(
            "marchproxy_module_active_connections", "Open data-plane connections", registry=r
        )


class ModuleRuntime:
    def __init__(self, settings: ModuleSettings, hooks: ModuleHooks) -> None:
        self.settings = settings
        self.hooks = hooks
        self.module_id = settings.module_id or hooks.default_module_id
        self.instance_id = settings.resolved_instance_id(self.module_id)
        # External module types have no snapshot of their own: the nlb snapshot lists every
        # module and route, so they read that one.
        self.component = _COMPONENT_BY_TYPE.get(hooks.module_type, "nlb")
        self.metrics = RuntimeMetrics()
        self.config: dict[str, Any] = {}
        self.config_version = 0
        self.config_source = "none"
        self.rejected_version = 0
        self.rejected_reason = ""
        self.weights: dict[str, int] = {}
        self._version_history: list[str] = []
        self.draining = False
        self.heartbeat_interval = settings.heartbeat_interval
        self.registered = False
        self.heartbeat_failures = 0
        self.last_heartbeat_ok: float | None = None
        self.data_address = BoundAddress("", 0)
        self.grpc_address = BoundAddress("", 0)
        self.admin_address = BoundAddress("", 0)
        self.nlb: NlbClient | None = None
        self.state: Any = None
        self._grpc: GrpcServer | None = None
        self._admin: AdminServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._drain_timeout = settings.drain_timeout
        self._started_at = time.monotonic()
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._cpu_percent = 0.0
        self._handoff: HandoffReceiver | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self._load_initial_config()
        self.data_address = await self.hooks.start_data_plane()
        await self._start_handoff()
        servicer_cls = getattr(self.hooks, "servicer_class", BaseModuleServicer)
        self._grpc = GrpcServer(api_key=s.effective_cluster_api_key)
        self._grpc.add(
            module_pb2_grpc.add_ModuleServiceServicer_to_server, servicer_cls(self), SERVICE_NAME
        )
        tls = TlsFiles(s.grpc_tls_cert, s.grpc_tls_key, s.grpc_tls_ca) if s.grpc_tls_cert else None
        port = await self._grpc.start(s.grpc_host, s.grpc_port, tls)
        self.grpc_address = BoundAddress(s.grpc_host, port)
        registries = [self.metrics.registry]
        hook_registry = getattr(self.hooks, "metrics_registry", None)
        if isinstance(hook_registry, CollectorRegistry):
            registries.append(hook_registry)
        self._admin = AdminServer(registries=registries, status=self.status, ready=self._ready)
        admin_port = await self._admin.start(s.admin_host, s.admin_port)
        self.admin_address = BoundAddress(s.admin_host, admin_port)
        await self._start_state_client()
        if s.register_with_nlb and s.nlb_addr:
            self.nlb = _nlb_client(s)
            self._tasks.append(
                spawn(self._registration_loop(), name=f"nlb registration {self.instance_id}")
            )
        _log.info(
            "module_started",
            module_id=self.module_id,
            instance_id=self.instance_id,
            data=f"{self.data_address.host}:{self.data_address.port}",
            grpc=f"{self.grpc_address.host}:{self.grpc_address.port}",
            admin=f"{self.admin_address.host}:{self.admin_address.port}",
        )

    async def _start_handoff(self) -> None:
        """Take connections a co-located NLB hands over on HANDOFF_PATH (see net.handoff)."""
        path = self.settings.handoff_path
        if not path:
            return
        factories = getattr(self.hooks, "handoff_factories", None)
        found = factories() if callable(factories) else {}
        if not found:
            _log.warning("handoff_unsupported", path=path, module_id=self.module_id)
            return
        # greets each NLB channel with our (registered) instance id, which the NLB checks
        receiver = HandoffReceiver(path, found, identity=lambda: self.instance_id)
        await receiver.start()
        self._handoff = receiver
        _log.info("handoff_listening", path=path, ports=sorted(found))

    async def _load_initial_config(self) -> None:
        if not self.settings.config_file:
            return
        try:
            snapshot = load_config_file(self.settings.config_file)
        except ConfigFileError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        errors = await self.apply_snapshot(snapshot, source="file")
        if errors:
            raise SystemExit(f"configuration error: {self.settings.config_file}: {errors[0]}")

    async def _start_state_client(self) -> None:
        s = self.settings
        if s.config_file or not (s.redis_url or s.api_url):
            return
        from marchproxy_common.state import StateClient

        self.state = StateClient(
            self.component,
            self._apply_from_state,
            redis_url=s.redis_url,
            api_url=s.api_url,
            cluster_api_key=s.effective_cluster_api_key,
            instance_id=self.instance_id,
        )
        await self.state.start()

    async def _apply_from_state(self, snapshot: Mapping[str, Any]) -> list[str]:
        return await self.apply_snapshot(dict(snapshot), source="state")

    def request_stop(self, reason: str = "signal", drain_timeout: float | None = None) -> None:
        if drain_timeout is not None:
            self._drain_timeout = drain_timeout
        if not self._stop_requested.is_set():
            _log.info("module_stopping", reason=reason, drain_timeout=self._drain_timeout)
        self._stop_requested.set()

    async def wait(self) -> None:
        await self._stop_requested.wait()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        self.draining = True
        # Stop registering and heartbeating first: a registration still in flight must not
        # land after we asked to drain (SIGTERM can come right after RegisterModule was sent).
        await cancel_and_wait(*self._tasks)
        await self._unregister(graceful=True)
        if self._grpc is not None:
            await self._grpc.enter_graceful_shutdown()
        if self._handoff is not None:  # the NLB relays (to nobody) instead: nothing new here
            await self._handoff.close()
        await self.hooks.stop_accepting()
        deadline = asyncio.get_running_loop().time() + self._drain_timeout
        await self.hooks.drain(deadline)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self._unregister(graceful=False)
        if self.state is not None:
            await self.state.stop()
        if self.nlb is not None:
            await self.nlb.close()
        if self._admin is not None:
            await self._admin.stop()
        _log.info("module_stopped", instance_id=self.instance_id)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        try:
            await self.start()
            freeze_startup_heap()  # we own the process: keep full collections short
            await self.wait()
        finally:
            await self.stop()

    def _ready(self) -> tuple[bool, str]:
        if self._stop_requested.is_set():
            return False, "draining"
        if self.data_address.port == 0:
            return False, "starting"
        return True, "ready"

    # -- NLB registration and heartbeats --------------------------------------------------------

    def _register_request(self) -> nlb_pb2.RegisterModuleRequest:
        s = self.settings
        advertise = s.advertise_host or self.data_address.host
        if advertise in ("0.0.0.0", "::", ""):
            advertise = "127.0.0.1"
        return nlb_pb2.RegisterModuleRequest(
            module_id=self.module_id,
            instance_id=self.instance_id,
            module_type=self.hooks.module_type,  # type: ignore[arg-type]
            protocols=list(self.hooks.protocols),  # type: ignore[arg-type]
            data_address=types_pb2.Address(host=advertise, port=self.data_address.port),
            grpc_address=types_pb2.Address(
                host=s.advertise_host or self.grpc_address.host, port=self.grpc_address.port
            ),
            version=s.module_version,
            weight=s.module_weight,
            capacity=s.module_capacity,
            labels={
                "component": self.component,
                **({HANDOFF_LABEL: self._handoff.path} if self._handoff is not None else {}),
            },
            protocol_addresses=[
                types_pb2.ProtocolAddress(
                    protocol=protocol,  # type: ignore[arg-type]
                    address=types_pb2.Address(host=advertise, port=bound.port),
                )
                for protocol, bound in self._extra_addresses().items()
            ],
        )

    def _extra_addresses(self) -> Mapping[int, BoundAddress]:
        extra = getattr(self.hooks, "extra_addresses", None)
        return extra() if callable(extra) else {}

    async def _register(self) -> None:
        assert self.nlb is not None
        # imported here: a module that never registers (no NLB_ADDR, REGISTER_WITH_NLB=false)
        # does not carry tenacity's 11 modules (~0.4 MiB resident)
        from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(initial=0.2, max=5.0),
            retry=retry_if_exception_type(grpc.aio.AioRpcError),
            before_sleep=self._log_register_retry,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    resp = await self.nlb.register(self._register_request())
                except grpc.aio.AioRpcError:
                    self.metrics.registrations.labels("error").inc()
                    raise
        self.metrics.registrations.labels("ok").inc()
        self.registered = True
        self.metrics.registered.set(1)
        self.instance_id = resp.registration_id or self.instance_id
        self.heartbeat_interval = heartbeat_pace(
            self.settings.heartbeat_interval, resp.heartbeat_timeout_seconds
        )
        _log.info(
            "registered_with_nlb",
            nlb=self.nlb.addr,
            instance_id=self.instance_id,
            heartbeat_interval=self.heartbeat_interval,
        )

    def _log_register_retry(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "?"
        _log.warning(
            "nlb_register_failed",
            nlb=self.settings.nlb_addr,
            code=code,
            attempt=state.attempt_number,
        )

    async def _registration_loop(self) -> None:
        failures = 0
        while not self._stop_requested.is_set():
            try:
                await self._register()
                await self._heartbeat_until_lost()
                failures = 0
            except Exception:
                # a hook (load(), stats) or our own bug must not end registration for good:
                # the module would keep serving but the NLB would never route to it again
                failures += 1
                _log.exception("registration_loop_error", failures=failures)
                await asyncio.sleep(min(REGISTRATION_ERROR_BACKOFF_MAX, 0.5 * 2**failures))

    async def _heartbeat_until_lost(self) -> None:
        """Heartbeat until the NLB says it no longer knows this instance."""
        assert self.nlb is not None
        while not self._stop_requested.is_set():
            await asyncio.sleep(self.heartbeat_interval)
            try:
                resp = await self.nlb.heartbeat(self._heartbeat_request())
            except grpc.aio.AioRpcError as exc:
                self.heartbeat_failures += 1
                self.metrics.heartbeats.labels("error").inc()
                _log.warning(
                    "heartbeat_failed", code=exc.code().name, failures=self.heartbeat_failures
                )
                continue
            self.metrics.heartbeats.labels("ok").inc()
            self.last_heartbeat_ok = time.time()
            if resp.instruction == nlb_pb2.INSTRUCTION_REREGISTER:
                self.registered = False
                self.metrics.registered.set(0)
                _log.info("nlb_asked_to_reregister")
                return
            self._follow_instruction(resp.instruction)
            if self._stop_requested.is_set():
                return
            if resp.config_version > self.config_version and self.state is not None:
                self.state.hint(resp.config_version)

    def _follow_instruction(self, instruction: int) -> None:
        """DRAIN (an operator or the autoscaler drained us: the NLB already sends us nothing
        new) and SHUTDOWN both end this instance the way SIGTERM does: finish in-flight work
        up to DRAIN_TIMEOUT, unregister, exit 0. Staying up would re-register us once the NLB
        drops the drained instance, undoing the drain."""
        if instruction == nlb_pb2.INSTRUCTION_DRAIN:
            self.request_stop("nlb drain instruction")
        elif instruction == nlb_pb2.INSTRUCTION_SHUTDOWN:
            self.request_stop("nlb shutdown instruction")

    def _heartbeat_request(self) -> nlb_pb2.HeartbeatRequest:
        load = self.hooks.load()
        self.metrics.active_connections.set(load.active_connections)
        return nlb_pb2.HeartbeatRequest(
            module_id=self.module_id,
            instance_id=self.instance_id,
            health=self.health(),  # type: ignore[arg-type]
            active_connections=load.active_connections,
            requests_total=load.requests_total,
            cpu_percent=self._sample_cpu(),
            memory_bytes=_rss_bytes(),
            stats=self.stats_pb(),
            applied_config_version=self.config_version,
            rejected_config_version=self.rejected_version,
            rejected_reason=self.rejected_reason,
            errors_total=load.errors_total,
        )

    async def _unregister(self, *, graceful: bool) -> None:
        """Tell the NLB, whether or not our registration was confirmed yet (its answer may still
        have been on the way); NOT_FOUND just means it never arrived."""
        if self.nlb is None:
            return
        try:
            await self.nlb.unregister(
                self.module_id,
                self.instance_id,
                graceful=graceful,
                drain_timeout=self._drain_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                _log.warning("unregister_failed", code=exc.code().name, graceful=graceful)
            return
        if not graceful:
            self.registered = False
            self.metrics.registered.set(0)

    # -- desired state -------------------------------------------------------------------------

    async def apply_snapshot(
        self, snapshot: dict[str, Any], *, validate_only: bool = False, source: str = "state"
    ) -> list[str]:
        version = int(snapshot.get("version") or 0)
        routes = [r for r in snapshot.get("routes") or [] if self._is_own(r)]
        errors = validate_routes(routes)
        if not isinstance(snapshot.get("routes", []), list):
            errors.append("routes must be a list")
        if validate_only or errors:
            if errors and not validate_only:
                self._rejected(version, errors)
            return errors
        errors = await self.hooks.apply_config(snapshot)
        if errors:
            self._rejected(version, errors)
            return errors
        self.config = snapshot
        self.config_version = version
        self.config_source = source
        self.metrics.config_version.set(version)
        self._apply_deployments(snapshot)
        _log.info("config_applied", version=version, source=source, routes=len(routes))
        return []

    def _rejected(self, version: int, errors: Sequence[str]) -> None:
        self.rejected_version = version
        self.rejected_reason = "; ".join(errors)[:1024]
        self.metrics.config_rejected.inc()
        _log.warning("config_rejected", version=version, errors=list(errors)[:10])

    def _is_own(self, route: Mapping[str, Any]) -> bool:
        return route.get("module") in (None, "", self.module_id)

    def own_routes(self) -> list[dict[str, Any]]:
        return [r for r in self.config.get("routes") or [] if self._is_own(r)]

    def all_routes(self) -> list[dict[str, Any]]:
        """Routes set for this module in desired state or by RPC, then the ones the module
        derives from its own config (databases, model groups, ...) under other names."""
        explicit = self.own_routes()
        names = {r.get("name") for r in explicit}
        return explicit + [r for r in self.hooks.routes() if r.get("name") not in names]

    async def apply_routes(
        self, routes: list[dict[str, Any]], *, validate_only: bool = False
    ) -> list[str]:
        """Replace this module's routes (an RPC change; the next desired state wins over it)."""
        snapshot = copy.deepcopy(self.config)
        others = [r for r in snapshot.get("routes") or [] if not self._is_own(r)]
        snapshot["routes"] = others + [{**r, "module": self.module_id} for r in routes]
        snapshot["version"] = self.config_version
        return await self.apply_snapshot(snapshot, validate_only=validate_only, source="rpc")

    async def reload(self) -> tuple[bool, str]:
        if self.settings.config_file:
            try:
                snapshot = load_config_file(self.settings.config_file)
            except ConfigFileError as exc:
                return False, str(exc)
            errors = await self.apply_snapshot(snapshot, source="file")
            return (not errors), "; ".join(errors) or "reloaded from file"
        if self.state is not None:
            self.state.hint(self.config_version + 1)
            return True, "re-fetch of desired state requested"
        return True, "no desired-state source configured; nothing to reload"

    def _apply_deployments(self, snapshot: Mapping[str, Any]) -> None:
        mine = [d for d in snapshot.get("deployments") or [] if d.get("module") == self.module_id]
        if mine:
            self.weights = {str(d["version"]): int(d.get("traffic_weight", 0)) for d in mine}
        elif not self.weights:
            self.weights = {self.settings.module_version: 100}

    def active_version(self) -> str:
        if not self.weights:
            return self.settings.module_version
        return max(self.weights.items(), key=lambda kv: kv[1])[0]

    def previous_version(self) -> str:
        others = [v for v in self.weights if v != self.active_version()]
        return others[0] if others else ""

    # -- views ---------------------------------------------------------------------------------

    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    def health(self) -> int:
        if self.draining or self._stop_requested.is_set():
            return types_pb2.HEALTH_STATUS_DRAINING
        if self.data_address.port == 0:
            return types_pb2.HEALTH_STATUS_STARTING
        return types_pb2.HEALTH_STATUS_HEALTHY

    def _sample_cpu(self) -> float:
        wall, cpu = time.monotonic(), time.process_time()
        dw, dc = wall - self._cpu_mark[0], cpu - self._cpu_mark[1]
        if dw > 0.05:
            self._cpu_percent = 100.0 * dc / dw
            self._cpu_mark = (wall, cpu)
        return self._cpu_percent

    def instance_pb(self) -> types_pb2.ModuleInstance:
        load = self.hooks.load()
        return types_pb2.ModuleInstance(
            instance_id=self.instance_id,
            module_id=self.module_id,
            module_type=self.hooks.module_type,  # type: ignore[arg-type]
            data_address=types_pb2.Address(
                host=self.data_address.host, port=self.data_address.port
            ),
            grpc_address=types_pb2.Address(
                host=self.grpc_address.host, port=self.grpc_address.port
            ),
            health=self.health(),  # type: ignore[arg-type]
            active_connections=load.active_connections,
            version=self.settings.module_version,
            protocols=list(self.hooks.protocols),  # type: ignore[arg-type]
            weight=self.settings.module_weight,
            capacity=self.settings.module_capacity,
            draining=self.draining,
            cpu_percent=self._sample_cpu(),
            memory_bytes=_rss_bytes(),
            requests_total=load.requests_total,
            applied_config_version=self.config_version,
        )

    def stats_pb(self) -> types_pb2.ModuleStats:
        load = self.hooks.load()
        up = self.uptime()
        return types_pb2.ModuleStats(
            module_id=self.module_id,
            instance_id=self.instance_id,
            total_requests=load.requests_total,
            active_connections=load.active_connections,
            total_connections=load.total_connections,
            errors_total=load.errors_total,
            requests_per_second=load.requests_total / up if up > 0 else 0.0,
            p50_latency_ms=load.latency_p50_ms,
            p95_latency_ms=load.latency_p95_ms,
            p99_latency_ms=load.latency_p99_ms,
            cpu_percent=self._sample_cpu(),
            memory_bytes=_rss_bytes(),
            bytes_in=load.bytes_in,
            bytes_out=load.bytes_out,
            uptime_seconds=up,
            custom=load.custom,
        )

    def metrics_pb(self, names: Sequence[str] = ()) -> types_pb2.ModuleMetrics:
        load = asdict(self.hooks.load())
        custom = load.pop("custom", {})
        values: dict[str, float] = {**{k: float(v) for k, v in load.items()}, **custom}
        values["cpu_percent"] = self._sample_cpu()
        values["memory_bytes"] = float(_rss_bytes())
        out = types_pb2.ModuleMetrics(module_id=self.module_id, instance_id=self.instance_id)
        out.collected_at.GetCurrentTime()
        for name, value in sorted(values.items()):
            if names and name not in names:
                continue
            point = out.metrics.add(name=name, value=value)
            point.timestamp.CopyFrom(out.collected_at)
        return out

    async def forward_scaling(self, target: int, reason: str) -> nlb_pb2.TriggerScalingResponse:
        if self.nlb is None:
            return nlb_pb2.TriggerScalingResponse(
                success=False, message="no NLB configured: scaling is the NLB's job"
            )
        try:
            return await self.nlb.trigger_scaling(self.module_id, target, reason)
        except grpc.aio.AioRpcError as exc:
            return nlb_pb2.TriggerScalingResponse(
                success=False, message=f"NLB refused or unreachable: {exc.code().name}"
            )

    async def sibling_instances(self) -> list[types_pb2.ModuleInstance]:
        if self.nlb is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                return list((await self.nlb.list_modules(self.module_id)).instances)
        return [self.instance_pb()]

    def status(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "applied_version": self.config_version,
            "source": self.config_source,
            "rejected_version": self.rejected_version,
            "rejected_reason": self.rejected_reason,
        }
        if self.state is not None:
            config.update(self.state.status())
        return {
            "module": {
                "module_id": self.module_id,
                "instance_id": self.instance_id,
                "component": self.component,
                "version": self.settings.module_version,
                "uptime": round(self.uptime(), 3),
                "health": types_pb2.HealthStatus.Name(self.health())  # type: ignore[arg-type]
                .removeprefix("HEALTH_STATUS_")
                .lower(),
                "draining": self.draining,
                "data_address": f"{self.data_address.host}:{self.data_address.port}",
                "grpc_address": f"{self.grpc_address.host}:{self.grpc_address.port}",
            },
            "nlb": {
                "address": self.settings.nlb_addr if self.nlb else "",
                "registered": self.registered,
                "heartbeat_failures": self.heartbeat_failures,
                "last_heartbeat_ok": self.last_heartbeat_ok,
                "heartbeat_interval": self.heartbeat_interval,
            },
            "config": config,
            "handoff": (
                {"path": h.path, "adopted": h.adopted, "errors": h.errors}
                if (h := self._handoff) is not None
                else None
            ),
            "load": asdict(self.hooks.load()),
            "weights": self.weights,
            **self.hooks.status(),
        }


def _nlb_client(s: ModuleSettings) -> NlbClient:
    """With GRPC_TLS_CA set the NLB is reached over TLS, presenting our cert (mTLS)."""
    if not s.grpc_tls_ca:
        return NlbClient(s.nlb_addr, s.effective_cluster_api_key)
    root = Path(s.grpc_tls_ca).read_bytes()
    client_cert = None
    if s.grpc_tls_cert and s.grpc_tls_key:
        client_cert = (Path(s.grpc_tls_key).read_bytes(), Path(s.grpc_tls_cert).read_bytes())
    return NlbClient(
        s.nlb_addr, s.effective_cluster_api_key, root_certificates=root, client_cert=client_cert
    )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.asynccontextmanager
async def run_module(settings: ModuleSettings, hooks: ModuleHooks) -> AsyncIterator[ModuleRuntime]:
    """Start a module runtime for a test or an embedding program; always shuts it down."""
    rt = ModuleRuntime(settings, hooks)
    try:
        await rt.start()
        yield rt
    finally:
        await rt.stop()


def run_module_main(
    settings_cls: type[S],
    hooks_factory: Callable[[S], ModuleHooks],
    argv: Sequence[str] | None = None,
) -> None:
    """Entry point body for ``marchproxy-<module>``: parse ``--config``, settings, logging, run."""
    parser = argparse.ArgumentParser(description="MarchProxy module")
    parser.add_argument("--config", help="static desired-state file (YAML or JSON)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"config_file": args.config} if args.config else {}
    settings = load_settings(settings_cls, **overrides)
    configure_logging(settings.log_level, settings.log_format)

    async def serve() -> None:
        # grpc.aio binds to the running loop, so everything is built inside it
        await ModuleRuntime(settings, hooks_factory(settings)).run()

    run_on_loop(serve())
