"""NLBService RPCs: validate, call the registry or the data plane, translate. No rules here."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from grpc.aio import ServicerContext as Ctx

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from marchproxy_nlb.core import (
    DYNAMIC_CONFIG_KEYS,
    MAX_REPORTED_METRICS,
    DataPlaneLike,
    NlbCore,
)
from marchproxy_nlb.registry.table import RegistryFull

from . import validate as v
from .convert import balance_score, instance_pb, load_info_pb, stats_pb

_log = structlog.get_logger("marchproxy.nlb.grpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

MAX_PAGE_SIZE = 1_000
MAX_STREAM_INTERVAL = 60.0
MIN_STREAM_INTERVAL = 0.1
MAX_CONFIG_JSON = 64 * 1024
#: seconds; below 1 s a module heartbeating every HEARTBEAT_INTERVAL (1 s at the least useful
#: setting) would be expired between two heartbeats (the foundation issue: "down to 1 s")
MIN_HEARTBEAT_TIMEOUT = 1.0
MAX_HEARTBEAT_TIMEOUT = 3600.0


class NotFound(LookupError):
    pass


#: domain errors → the gRPC code a client gets (with the exception's message)
_ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (v.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (RegistryFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def _failure(name: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in _ERROR_CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    _log.error("rpc_failed", method=name, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {name}"


def rpc(
    method: Callable[[Any, Req, Ctx[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, Ctx[Any, Any]], Awaitable[Resp]]:
    """Map domain errors to gRPC codes and count every call by method and code."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: NlbServicer, request: Req, context: Ctx[Any, Any]) -> Resp:
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = _failure(name, exc)
            await context.abort(code, message)
        finally:
            self.core.metrics.grpc_requests.labels(name, code.name).inc()
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def rpc_stream(
    method: Callable[[Any, Req, Ctx[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Ctx[Any, Any]], AsyncIterator[Resp]]:
    """:func:`rpc` for server-streaming methods: the same error mapping, whether the failure
    comes before the first message or between two, and one count per stream when it ends."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: NlbServicer, request: Req, context: Ctx[Any, Any]
    ) -> AsyncIterator[Resp]:
        code = grpc.StatusCode.OK
        try:
            async for message in method(self, request, context):
                yield message
        except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message_text = _failure(name, exc)
            await context.abort(code, message_text)
        finally:
            self.core.metrics.grpc_requests.labels(name, code.name).inc()

    return wrapper


class NlbServicer(nlb_pb2_grpc.NLBServiceServicer):
    def __init__(self, core: NlbCore) -> None:
        self.core = core
        self.registry = core.registry

    # -- registration and discovery ------------------------------------------------------------

    @rpc
    async def RegisterModule(
        self, request: nlb_pb2.RegisterModuleRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.RegisterModuleResponse:
        module_id = v.check_id("module_id", request.module_id)
        # Seed 002 registers one instance per module_id; our runtime sends an instance id.
        instance_id = v.check_id("instance_id", request.instance_id, required=False) or module_id
        module_type = v.check_module_type(request.module_type, required=not request.protocol)
        protocols = v.check_protocols(request.protocols, request.protocol)
        if request.HasField("data_address"):
            data_host = v.check_host("data_address", request.data_address.host)
            data_port = v.check_port("data_address", request.data_address.port)
        else:  # seed 002 form: address ("ip", "ip:port", "[v6]:port") and port
            data_host, data_port = v.split_seed_address(request.address, request.port)
        grpc_host, grpc_port = "", 0
        if request.HasField("grpc_address"):
            grpc_host = v.check_host("grpc_address", request.grpc_address.host)
            grpc_port = v.check_port("grpc_address", request.grpc_address.port)
        version = v.check_text("version", request.version, v.MAX_VERSION_LEN)
        weight = v.check_range("weight", request.weight or 100, 0, v.MAX_WEIGHT)
        capacity = v.check_range("capacity", request.capacity, 0, v.MAX_CAPACITY)
        labels = v.check_labels(request.labels)
        addresses = {}
        for i, pa in enumerate(request.protocol_addresses):
            v.check_protocols([pa.protocol])
            field = f"protocol_addresses[{i}].address"
            addresses[pa.protocol] = (
                v.check_host(field, pa.address.host),
                v.check_port(field, pa.address.port),
            )
        inst, created = self.registry.register(
            module_id=module_id,
            module_type=module_type,
            protocols=protocols,
            data_host=data_host,
            data_port=data_port,
            instance_id=instance_id,
            grpc_host=grpc_host,
            grpc_port=grpc_port,
            version=version,
            weight=weight,
            capacity=capacity,
            labels=labels,
            addresses=addresses,
        )
        self.core.metrics.registrations.labels(module_id).inc()
        _log.info(
            "module_registered" if created else "module_reregistered",
            instance_id=inst.instance_id,
            module_id=module_id,
            data=f"{data_host}:{data_port}",
            version=version,
        )
        s = self.core.settings
        return nlb_pb2.RegisterModuleResponse(
            success=True,
            message="registered" if created else "registration refreshed",
            module_id=module_id,
            registration_id=inst.instance_id,
            heartbeat_interval_seconds=max(1, int(s.heartbeat_interval)),
            heartbeat_timeout_seconds=max(1, int(self.registry.heartbeat_timeout)),
            config_version=self.core.applied_config_version,
        )

    @rpc
    async def UnregisterModule(
        self, request: nlb_pb2.UnregisterModuleRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.UnregisterModuleResponse:
        key = request.instance_id or request.module_id
        v.check_id("instance_id", key)
        timeout = float(request.drain_timeout_seconds or self.core.settings.drain_timeout)
        found = self.registry.find(key)
        if not found:
            raise NotFound(f"no instance or module {key!r} is registered")
        for inst in found:
            self.registry.unregister(
                inst.instance_id, graceful=request.graceful, drain_timeout=timeout
            )
            _log.info(
                "module_unregistered",
                instance_id=inst.instance_id,
                graceful=request.graceful,
            )
        verb = "draining" if request.graceful else "removed"
        return nlb_pb2.UnregisterModuleResponse(success=True, message=f"{len(found)} {verb}")

    @rpc
    async def Heartbeat(
        self, request: nlb_pb2.HeartbeatRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.HeartbeatResponse:
        v.check_id("instance_id", request.instance_id)
        v.check_text("rejected_reason", request.rejected_reason, 1024)
        stats = request.stats
        # Everything stored here is served again by /status, the metrics RPCs and the
        # autoscaler: an unknown health value, a negative count or a NaN must not get in.
        inst = self.registry.heartbeat(
            request.instance_id,
            health=v.check_health("health", request.health, allow_unspecified=True),
            reported_connections=v.check_count("active_connections", request.active_connections),
            requests_total=v.check_count("requests_total", request.requests_total),
            cpu_percent=v.check_number("cpu_percent", request.cpu_percent, 0, v.MAX_CPU_PERCENT),
            memory_bytes=v.check_count("memory_bytes", request.memory_bytes),
            requests_per_second=v.check_number(
                "requests_per_second", request.requests_per_second, 0, v.MAX_RATE
            ),
            errors_total=v.check_count("errors_total", request.errors_total),
            bytes_in=v.check_count("stats.bytes_in", stats.bytes_in),
            bytes_out=v.check_count("stats.bytes_out", stats.bytes_out),
            applied_config_version=v.check_count(
                "applied_config_version", request.applied_config_version
            ),
            rejected_config_version=v.check_count(
                "rejected_config_version", request.rejected_config_version
            ),
            rejected_reason=request.rejected_reason,
        )
        resp = nlb_pb2.HeartbeatResponse(config_version=self.core.applied_config_version)
        resp.server_time.GetCurrentTime()
        if inst is None:
            resp.success = False
            resp.message = "unknown instance: register again"
            resp.instruction = nlb_pb2.INSTRUCTION_REREGISTER
            return resp
        self.core.metrics.heartbeats.labels(inst.module_id).inc()
        resp.success = True
        resp.instruction = nlb_pb2.INSTRUCTION_DRAIN if inst.draining else nlb_pb2.INSTRUCTION_NONE
        return resp

    @rpc
    async def ListModules(
        self, request: nlb_pb2.ListModulesRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.ListModulesResponse:
        v.check_module_type(request.module_type, required=False)
        v.check_id("module_id", request.module_id, required=False)
        if request.protocol:
            v.check_protocols([request.protocol])
        if request.health not in types_pb2.HealthStatus.values():
            raise v.InvalidArgument(f"health {request.health} is not a known health status")
        page_size = request.pagination.page_size or MAX_PAGE_SIZE
        v.check_range("pagination.page_size", page_size, 1, MAX_PAGE_SIZE)
        matches = [
            i
            for i in sorted(self.registry.all(), key=lambda i: (i.module_id, i.instance_id))
            if (not request.module_type or i.module_type == request.module_type)
            and (not request.protocol or request.protocol in i.protocols)
            and (not request.health or i.health == request.health)
            and (not request.module_id or i.module_id == request.module_id)
            # draining instances only when asked for (by the flag, or by health=DRAINING)
            and (
                request.include_draining
                or request.health == types_pb2.HEALTH_STATUS_DRAINING
                or not i.draining
            )
        ]
        token = request.pagination.next_page_token
        if token and not (token.isascii() and token.isdigit() and len(token) <= 9):
            raise v.InvalidArgument("pagination.next_page_token is not a token this NLB issued")
        start = int(token) if token else 0
        page = matches[start : start + page_size]
        now = self.core.clock()
        nxt = str(start + page_size) if start + page_size < len(matches) else ""
        return nlb_pb2.ListModulesResponse(
            instances=[instance_pb(i, now) for i in page],
            pagination=types_pb2.Pagination(
                page_size=page_size, total=len(matches), next_page_token=nxt
            ),
        )

    @rpc
    async def GetModuleInfo(
        self, request: nlb_pb2.GetModuleInfoRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.GetModuleInfoResponse:
        key = request.instance_id or request.module_id
        v.check_id("instance_id or module_id", key)
        found = self.registry.find(key)
        if not found:
            raise NotFound(f"no instance or module {key!r} is registered")
        now = self.core.clock()
        first = found[0]
        return nlb_pb2.GetModuleInfoResponse(
            instance=instance_pb(first, now),
            stats=stats_pb(first, now),
            instances=[instance_pb(i, now) for i in found],
        )

    # -- routing (data plane) ------------------------------------------------------------------

    @rpc
    async def UpdateRouting(
        self, request: nlb_pb2.UpdateRoutingRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.UpdateRoutingResponse:
        resp: nlb_pb2.UpdateRoutingResponse = await self._dp().update_routing(request)
        return resp

    @rpc
    async def GetRoutingTable(
        self, request: nlb_pb2.GetRoutingTableRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.GetRoutingTableResponse:
        resp: nlb_pb2.GetRoutingTableResponse = await self._dp().get_routing_table(request)
        return resp

    @rpc
    async def RouteRequest(
        self, request: nlb_pb2.RouteRequestRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.RouteRequestResponse:
        v.check_protocols([request.protocol])
        resp: nlb_pb2.RouteRequestResponse = await self._dp().route_request(request)
        return resp

    @rpc
    async def ValidateRoute(
        self, request: nlb_pb2.ValidateRouteRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.ValidateRouteResponse:
        resp: nlb_pb2.ValidateRouteResponse = await self._dp().validate_route(request)
        return resp

    @rpc
    async def RebalanceLoad(
        self, request: nlb_pb2.RebalanceLoadRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.RebalanceLoadResponse:
        resp: nlb_pb2.RebalanceLoadResponse = await self._dp().rebalance_load(request)
        return resp

    @rpc
    async def GetLoadDistribution(
        self, request: nlb_pb2.GetLoadDistributionRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.GetLoadDistributionResponse:
        if self.core.dataplane is not None:
            resp: nlb_pb2.GetLoadDistributionResponse = (
                await self.core.dataplane.get_load_distribution(request)
            )
            return resp
        instances = [
            i
            for i in self.registry.all()
            if (not request.module_id or i.module_id == request.module_id)
            and (not request.module_type or i.module_type == request.module_type)
        ]
        total = sum(i.active_connections for i in instances)
        infos = [load_info_pb(i, total) for i in instances]
        return nlb_pb2.GetLoadDistributionResponse(
            instances=infos, balance_score=balance_score([i.active_connections for i in instances])
        )

    @rpc
    async def TriggerScaling(
        self, request: nlb_pb2.TriggerScalingRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.TriggerScalingResponse:
        v.check_id("module_id", request.module_id)
        resp: nlb_pb2.TriggerScalingResponse = await self._dp().trigger_scaling(request)
        return resp

    def _dp(self) -> DataPlaneLike:
        if self.core.dataplane is None:
            raise NotFound("the NLB data plane is not running on this instance")
        return self.core.dataplane

    # -- metrics -------------------------------------------------------------------------------

    @rpc
    async def ReportMetrics(
        self, request: nlb_pb2.ReportMetricsRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.ReportMetricsResponse:
        m = request.metrics
        v.check_id("metrics.instance_id", m.instance_id)
        if len(m.metrics) > MAX_REPORTED_METRICS:
            raise v.InvalidArgument(f"at most {MAX_REPORTED_METRICS} data points per report")
        if self.registry.get(m.instance_id) is None:
            raise NotFound(f"instance {m.instance_id!r} is not registered")
        self.core.reported[m.instance_id] = request
        return nlb_pb2.ReportMetricsResponse(success=True, message=f"{len(m.metrics)} stored")

    @rpc
    async def GetNLBMetrics(
        self, request: nlb_pb2.GetNLBMetricsRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.GetNLBMetricsResponse:
        return nlb_pb2.GetNLBMetricsResponse(metrics=self.core.nlb_metrics_pb())

    @rpc
    async def GetModuleMetrics(
        self, request: nlb_pb2.GetModuleMetricsRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.GetModuleMetricsResponse:
        key = request.instance_id or request.module_id
        v.check_id("instance_id or module_id", key)
        found = self.registry.find(key)
        if not found:
            raise NotFound(f"no instance or module {key!r} is registered")
        now = self.core.clock()
        return nlb_pb2.GetModuleMetricsResponse(
            metrics=[
                self.core.reported[i.instance_id].metrics
                for i in found
                if i.instance_id in self.core.reported
            ],
            stats=[stats_pb(i, now) for i in found],
        )

    @rpc_stream
    async def StreamNLBMetrics(
        self, request: nlb_pb2.StreamNLBMetricsRequest, context: Ctx[Any, Any]
    ) -> AsyncIterator[nlb_pb2.NLBMetrics]:
        interval = float(request.interval_seconds or 1)
        interval = min(max(interval, MIN_STREAM_INTERVAL), MAX_STREAM_INTERVAL)
        sent = 0
        while not request.max_messages or sent < request.max_messages:
            yield self.core.nlb_metrics_pb()
            sent += 1
            if request.max_messages and sent >= request.max_messages:
                break
            await asyncio.sleep(interval)

    # -- health and status ---------------------------------------------------------------------

    @rpc
    async def CheckHealth(
        self, request: nlb_pb2.CheckHealthRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.CheckHealthResponse:
        resp = nlb_pb2.CheckHealthResponse(
            status=self.core.health(),
            message=f"{sum(1 for i in self.registry.all() if i.routable)} routable instances",
        )
        if request.include_modules:
            for inst in self.registry.all():
                resp.module_health[inst.instance_id] = inst.health
        return resp

    @rpc
    async def GetNLBStatus(
        self, request: nlb_pb2.GetNLBStatusRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.GetNLBStatusResponse:
        now = self.core.clock()
        return nlb_pb2.GetNLBStatusResponse(
            version=self.core.settings.nlb_version,
            uptime_seconds=self.core.uptime(),
            total_connections=self.core.total_routed(),
            active_connections=self.core.total_active(),
            registered_instances=len(self.registry),
            instances=[instance_pb(i, now) for i in self.registry.all()],
            config_version=self.core.applied_config_version,
            status_json=json.dumps(self.core.status(), default=str),
        )

    # -- configuration -------------------------------------------------------------------------

    @rpc
    async def UpdateNLBConfig(
        self, request: nlb_pb2.UpdateNLBConfigRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.UpdateNLBConfigResponse:
        errors = validate_dynamic_config(request.config_json)
        update: dict[str, Any] = {} if errors else json.loads(request.config_json)
        errors += self.core.validate_dynamic(update)
        if errors:
            return nlb_pb2.UpdateNLBConfigResponse(
                success=False, message="rejected", validation_errors=errors
            )
        if request.validate_only:
            return nlb_pb2.UpdateNLBConfigResponse(success=True, message="valid")
        self.core.apply_dynamic(update)
        _log.info("nlb_config_updated", keys=sorted(update))
        return nlb_pb2.UpdateNLBConfigResponse(success=True, message="applied")

    @rpc
    async def GetNLBConfig(
        self, request: nlb_pb2.GetNLBConfigRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.GetNLBConfigResponse:
        static = self.core.settings.model_dump(
            exclude={"cluster_api_key", "secret_key", "database_url", "grpc_tls_key"}
        )
        if static.get("redis_url"):
            static["redis_url"] = "(set)"
        dynamic = dict(self.core.dynamic_config)
        if self.core.dataplane is not None:  # RPC-set values a snapshot has not replaced yet
            dynamic.update(self.core.dataplane.rpc_overrides())
        body = {"static": static, "dynamic": dynamic}
        return nlb_pb2.GetNLBConfigResponse(
            config_json=json.dumps(body, default=str),
            config_version=self.core.applied_config_version,
        )

    # -- seed 002 ------------------------------------------------------------------------------

    @rpc
    async def UpdateHealth(
        self, request: nlb_pb2.HealthUpdateRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.HealthUpdateResponse:
        v.check_id("module_id", request.module_id)
        if (
            request.status not in types_pb2.HealthStatus.values()
            or request.status == types_pb2.HEALTH_STATUS_UNSPECIFIED
        ):
            raise v.InvalidArgument(f"status {request.status} is not a settable health status")
        v.check_text("reason", request.reason, 1024)
        changed = self.registry.set_health(request.module_id, request.status, request.reason)
        if not changed:
            raise NotFound(f"no instance or module {request.module_id!r} is registered")
        return nlb_pb2.HealthUpdateResponse(
            success=True, message=f"{len(changed)} instance(s) now {v.health_name(request.status)}"
        )

    @rpc
    async def GetStats(
        self, request: nlb_pb2.StatsRequest, context: Ctx[Any, Any]
    ) -> nlb_pb2.StatsResponse:
        v.check_id("module_id", request.module_id)
        found = self.registry.find(request.module_id)
        if not found:
            raise NotFound(f"no instance or module {request.module_id!r} is registered")
        worst = max(found, key=lambda i: i.health).health
        return nlb_pb2.StatsResponse(
            module_id=request.module_id,
            active_connections=sum(i.active_connections for i in found),
            total_connections_processed=sum(i.routed_total for i in found),
            cpu_usage_percent=sum(i.cpu_percent for i in found) / len(found),
            memory_usage_bytes=float(sum(i.memory_bytes for i in found)),
            bytes_in=sum(i.bytes_in for i in found),
            bytes_out=sum(i.bytes_out for i in found),
            health_status=v.health_name(worst),
            custom_metrics={
                "instances": str(len(found)),
                "requests_total": str(sum(i.requests_total for i in found)),
                "reported_connections": str(sum(i.reported_connections for i in found)),
            },
        )


def validate_dynamic_config(text: str) -> list[str]:
    if len(text) > MAX_CONFIG_JSON:
        return [f"config_json is larger than {MAX_CONFIG_JSON} bytes"]
    try:
        update = json.loads(text)
    except ValueError as exc:
        return [f"config_json is not valid JSON: {exc}"]
    if not isinstance(update, dict):
        return ["config_json must be a JSON object"]
    errors = [f"unknown or read-only key {k!r}" for k in update if k not in DYNAMIC_CONFIG_KEYS]
    if "heartbeat_timeout" in update and not _is_seconds(
        update["heartbeat_timeout"], MIN_HEARTBEAT_TIMEOUT, MAX_HEARTBEAT_TIMEOUT
    ):
        errors.append(
            f"heartbeat_timeout must be a number of seconds between {MIN_HEARTBEAT_TIMEOUT:g} "
            f"and {MAX_HEARTBEAT_TIMEOUT:g}"
        )
    return errors


def _is_seconds(value: object, low: float, high: float) -> bool:
    # JSON true is a Python bool, which is an int: {"heartbeat_timeout": true} must not mean 1 s
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and low <= value <= high
