"""Wiring only: settings → registry, metrics, core → data plane, gRPC, admin HTTP, state → run."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping
from typing import Any

import structlog

from marchproxy.v1 import nlb_pb2_grpc
from marchproxy_common.admin_http import AdminServer
from marchproxy_common.grpc_server import GrpcServer, TlsFiles
from marchproxy_common.loop import freeze_startup_heap
from marchproxy_common.net.fdpass import ListenerHandoffServer
from marchproxy_common.tasks import cancel_and_wait, spawn

from .config import NlbSettings
from .core import NlbCore
from .grpc.servicer import NlbServicer
from .hotrestart import HandoverFailed, Takeover, take_over
from .metrics import NlbMetrics
from .registry.table import InstanceRegistry
from .traffic.autoscaler import Autoscaler, Executor
from .traffic.executors import DockerExecutor, KubernetesExecutor, ProcessExecutor
from .traffic.plane import DataPlane

_log = structlog.get_logger("marchproxy.nlb")

SERVICE_NAME = "marchproxy.v1.NLBService"
GRPC_STOP_GRACE = 1.0  # seconds in-flight RPCs get once the gRPC server stops


class NlbApp:
    """One NLB process: owns every server and background task, and their shutdown order."""

    def __init__(self, settings: NlbSettings, *, with_dataplane: bool = True) -> None:
        self.settings = settings
        self.metrics = NlbMetrics()
        self.registry = InstanceRegistry(
            settings.heartbeat_timeout, max_instances=settings.nlb_max_instances
        )
        self.core = NlbCore(settings, self.registry, self.metrics)
        self.grpc = GrpcServer(
            api_key=settings.effective_cluster_api_key,
            max_message_bytes=settings.nlb_max_message_bytes,
            reuse_port=bool(settings.nlb_handoff_path),
        )
        self.grpc.add(
            nlb_pb2_grpc.add_NLBServiceServicer_to_server, NlbServicer(self.core), SERVICE_NAME
        )
        self.admin = AdminServer(
            registries=[self.metrics.registry], status=self.core.status, ready=self._ready
        )
        self.dataplane: DataPlane | None = None
        if with_dataplane:
            self.dataplane = DataPlane(settings, self.registry, self.metrics)
            self.core.dataplane = self.dataplane
        self.handoff: ListenerHandoffServer | None = None
        self.autoscaler: Autoscaler | None = None
        self.state: Any = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._state_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._handed_over_to_new = False
        self._started = False

    def _ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if self._stopping.is_set():
            return False, "shutting down"
        return True, "ready"

    async def start(self) -> None:
        s = self.settings
        takeover = None
        if self.dataplane is not None:
            takeover = await take_over(s, self.registry)
            if takeover is not None:
                self.dataplane.inherited = takeover.sockets
                self._carry_over(takeover)
        try:
            await self._start_servers()
            await self._start_state_within(takeover)
            if takeover is not None:
                # from here on the old process lets go: everything we need is serving
                await takeover.acknowledge()
        except BaseException:
            if takeover is not None:
                takeover.abandon()  # the old process keeps serving
            raise
        if self._state_task is not None:
            await self._state_task  # desired state still loading after the acknowledgement
            self._state_task = None
        if takeover is not None:
            unclaimed = takeover.close_unclaimed()
            if unclaimed:
                _log.info("inherited_listeners_closed", listeners=unclaimed)
        if self.autoscaler is not None:
            self.autoscaler.start()
        if s.nlb_handoff_path and self.dataplane is not None:
            self.handoff = ListenerHandoffServer(
                s.nlb_handoff_path, self.dataplane.listening_sockets, self._handed_over
            )
            await self.handoff.start()
        self._started = True
        _log.info(
            "nlb_started",
            grpc_port=self.grpc.port,
            admin_port=self.admin.port,
            heartbeat_timeout=self.registry.heartbeat_timeout,
        )

    def _carry_over(self, takeover: Takeover) -> None:
        """Put the old process's UpdateRouting rules and UpdateNLBConfig values in force here,
        as if set by the RPCs on top of the desired state it had applied."""
        assert self.dataplane is not None
        if takeover.routes:
            errors = self.dataplane.carry_rpc_routes(takeover.routes)
            if errors:
                _log.warning("handoff_rpc_routes_dropped", errors=errors)
            else:
                _log.info("handoff_rpc_routes_applied", routes=len(takeover.routes))
        update = takeover.dynamic_config
        if not update:
            return
        errors = self.core.validate_dynamic(update)
        if errors:
            _log.warning("handoff_dynamic_config_dropped", errors=errors)
            return
        self.core.apply_dynamic(update)
        self.dataplane.keep_rpc_values_over(takeover.config_version)
        _log.info("handoff_dynamic_config_applied", keys=sorted(update))

    async def _start_servers(self) -> None:
        s = self.settings
        if self.dataplane is not None:
            await self.dataplane.start()
        tls = TlsFiles(s.grpc_tls_cert, s.grpc_tls_key, s.grpc_tls_ca) if s.grpc_tls_cert else None
        await self.grpc.start(s.nlb_grpc_host, s.nlb_grpc_port, tls)
        await self.admin.start(
            s.nlb_admin_host, s.nlb_admin_port, reuse_port=bool(s.nlb_handoff_path)
        )
        self._expiry_task = spawn(self._expire_loop(), name="nlb registry expiry")
        if self.dataplane is not None:
            self.dataplane.autoscaler = self.autoscaler = self._build_autoscaler()

    async def _start_state_within(self, takeover: Takeover | None) -> None:
        """Load desired state (it may open listeners on inherited sockets). In a hand-over the
        old process waits for us only so long: past ``takeover.remaining()`` the loading goes
        on in the background and start() awaits it after acknowledging."""
        self._state_task = spawn(self._start_state(), name="nlb desired state start")
        timeout = takeover.remaining() if takeover is not None else None
        done, _ = await asyncio.wait({self._state_task}, timeout=timeout)
        if done:
            task, self._state_task = self._state_task, None
            task.result()
        else:
            _log.warning("handoff_state_still_loading", waited=timeout)

    async def _start_state(self) -> None:
        s = self.settings
        if not (s.config_file or s.redis_url or s.api_url):
            return
        from marchproxy_common.state import StateClient

        self.state = StateClient(
            "nlb",
            self._apply_snapshot,
            redis_url=s.redis_url,
            api_url=s.api_url,
            cluster_api_key=s.effective_cluster_api_key,
            config_file=s.config_file,
            instance_id="nlb",
        )
        self.core.state_status = self.state.status
        await self.state.start()

    async def _apply_snapshot(self, snapshot: Mapping[str, Any]) -> list[str]:
        errors = await self.dataplane.apply_config(snapshot) if self.dataplane else []
        if not errors:
            version = int(snapshot.get("version", 0))
            self.core.applied_config_version = version
            self.metrics.config_version.set(version)
        return errors

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.nlb_expiry_interval)
            for inst in self.registry.expire():
                _log.warning(
                    "instance_expired",
                    instance_id=inst.instance_id,
                    module_id=inst.module_id,
                    draining=inst.draining,
                )

    def _build_autoscaler(self) -> Autoscaler | None:
        s = self.settings
        # what every started module needs to find and join us
        env = {
            "NLB_ADDR": s.nlb_scaler_nlb_addr or s.local_grpc_target(self.grpc.port),
            "CLUSTER_API_KEY": s.effective_cluster_api_key,
        }
        executor: Executor
        if s.nlb_scaler == "process":
            executor = ProcessExecutor(
                s.nlb_scaler_commands,
                env,
                is_registered=lambda instance_id: self.registry.get(instance_id) is not None,
            )
        elif s.nlb_scaler == "docker":
            executor = DockerExecutor(
                s.nlb_docker_url, s.nlb_docker_images, env=env, network=s.nlb_docker_network
            )
        elif s.nlb_scaler == "kubernetes":
            executor = KubernetesExecutor(
                s.nlb_k8s_api, s.nlb_k8s_namespace, deployments=s.nlb_k8s_deployments
            )
        else:
            return None
        return Autoscaler(self.registry, self.metrics, executor, interval=s.nlb_autoscale_interval)

    def _handed_over(self) -> None:
        """A new NLB accepts on our listening sockets now: release the path, drain, exit."""
        _log.info("listeners_handed_over")
        self._handed_over_to_new = True
        spawn(self._release_handoff(), name="nlb handoff release")
        self.request_stop()

    async def _release_handoff(self) -> None:
        if self.handoff is not None:
            await self.handoff.close()
            self.handoff = None

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Shutdown order: health NOT_SERVING → stop accepting → drain → gRPC → admin → tasks.

        After a hand-over the control plane goes first: modules keep their gRPC (HTTP/2)
        connection to whichever process they reached, so while we drained for up to
        DRAIN_TIMEOUT they would heartbeat us and the new process would expire the instances it
        copied. Stopping gRPC (GOAWAY) and admin before the drain moves them to the new one."""
        self._stopping.set()
        await self._release_handoff()
        await self.grpc.enter_graceful_shutdown()
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        if self.dataplane is not None:
            await self.dataplane.stop_accepting()
        handed_over = self._handed_over_to_new
        if handed_over:
            await self._stop_control_plane(keep_instances=True)
        if self.dataplane is not None:
            await self.dataplane.drain(deadline)
        if not handed_over:
            await self._stop_control_plane(keep_instances=False)
        await cancel_and_wait(self._state_task)
        _log.info("nlb_stopped")

    async def _stop_control_plane(self, *, keep_instances: bool) -> None:
        if self.state is not None:
            await self.state.stop()
        if self.autoscaler is not None:
            await self.autoscaler.stop(keep_instances=keep_instances)
        await self.grpc.stop(grace=GRPC_STOP_GRACE)
        await self.admin.stop()
        await cancel_and_wait(self._expiry_task)
        _log.info("control_plane_stopped", handed_over=keep_instances)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
        except HandoverFailed as exc:
            # the old process still serves; serve out what we accepted meanwhile, then leave
            _log.error("handoff_failed", error=str(exc))
            await self.stop()
            raise SystemExit(1) from None
        freeze_startup_heap()  # run() owns the process: keep full collections short
        try:
            await self.wait()
        finally:
            await self.stop()
