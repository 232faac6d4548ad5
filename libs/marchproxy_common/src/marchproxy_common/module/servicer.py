"""``BaseModuleServicer``: every ModuleService RPC, answered from the module's hooks.

No RPC of the base set answers UNIMPLEMENTED. A module that knows better subclasses this and
overrides single RPCs; the runtime takes the class through ``hooks.servicer_class`` if present.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
import structlog
from grpc.aio import ServicerContext

from marchproxy.v1 import module_pb2, module_pb2_grpc, types_pb2
from marchproxy_common.module.routes import best_route, route_from_pb, route_to_pb

if TYPE_CHECKING:
    from marchproxy_common.module.runtime import ModuleRuntime

_log = structlog.get_logger("marchproxy.module.grpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx: TypeAlias = "ServicerContext[Any, Any]"
MAX_PAGE_SIZE = 1_000
MAX_CONFIG_JSON = 4 * 1024 * 1024
MIN_STREAM_INTERVAL = 0.1
MAX_STREAM_INTERVAL = 60.0


class InvalidArgument(ValueError):
    pass


class NotFound(LookupError):
    pass


def rpc(
    method: Callable[[Any, Req, Ctx], Awaitable[Resp]],
) -> Callable[[Any, Req, Ctx], Awaitable[Resp]]:
    """Domain errors → gRPC codes; anything unexpected → INTERNAL without a stack trace."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Ctx) -> Resp:
        try:
            return await method(self, request, context)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            _log.exception("module_rpc_failed", method=method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def rpc_stream(
    method: Callable[[Any, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Ctx], AsyncIterator[Resp]]:
    """``rpc`` for server-streaming methods (async generators)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            _log.exception("module_rpc_failed", method=method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")

    return wrapper


def _weights_pb(weights: dict[str, int]) -> list[types_pb2.VersionWeight]:
    return [types_pb2.VersionWeight(version=k, weight=v) for k, v in sorted(weights.items())]


class BaseModuleServicer(module_pb2_grpc.ModuleServiceServicer):
    def __init__(self, runtime: ModuleRuntime) -> None:
        self.rt = runtime
        self.hooks = runtime.hooks

    # -- lifecycle -----------------------------------------------------------------------------

    @rpc
    async def GetStatus(
        self, request: module_pb2.GetStatusRequest, context: Ctx
    ) -> module_pb2.GetStatusResponse:
        return module_pb2.GetStatusResponse(
            instance=self.rt.instance_pb(),
            health=self.rt.health(),  # type: ignore[arg-type]
            version=self.rt.settings.module_version,
            uptime_seconds=self.rt.uptime(),
            config_version=self.rt.config_version,
            draining=self.rt.draining,
            message="draining" if self.rt.draining else "serving",
        )

    @rpc
    async def Reload(
        self, request: module_pb2.ReloadRequest, context: Ctx
    ) -> module_pb2.ReloadResponse:
        ok, message = await self.rt.reload()
        return module_pb2.ReloadResponse(
            success=ok, message=message, config_version=self.rt.config_version
        )

    @rpc
    async def Shutdown(
        self, request: module_pb2.ShutdownRequest, context: Ctx
    ) -> module_pb2.ShutdownResponse:
        if len(request.reason) > 1024:
            raise InvalidArgument("reason is longer than 1024 characters")
        timeout = float(request.drain_timeout_seconds) if request.drain_timeout_seconds else None
        self.rt.request_stop(reason=request.reason or "Shutdown RPC", drain_timeout=timeout)
        return module_pb2.ShutdownResponse(success=True, message="draining, then exiting")

    # -- routing -------------------------------------------------------------------------------

    @rpc
    async def CanHandle(
        self, request: module_pb2.CanHandleRequest, context: Ctx
    ) -> module_pb2.CanHandleResponse:
        if request.protocol and request.protocol not in self.hooks.protocols:
            return module_pb2.CanHandleResponse(can_handle=False, reason="protocol not served")
        if self.rt.draining:
            return module_pb2.CanHandleResponse(can_handle=False, reason="draining")
        routes = self.rt.all_routes()
        if not routes:
            return module_pb2.CanHandleResponse(can_handle=True, reason="no routes: accepts all")
        route = best_route(routes, host=request.host, path=request.path)
        if route is None:
            return module_pb2.CanHandleResponse(can_handle=False, reason="no matching route")
        return module_pb2.CanHandleResponse(
            can_handle=True,
            priority=int(route.get("priority", 0)),
            route_id=str(route.get("id", route.get("name", ""))),
        )

    @rpc
    async def GetRoutes(
        self, request: module_pb2.GetRoutesRequest, context: Ctx
    ) -> module_pb2.GetRoutesResponse:
        routes = self.rt.all_routes()
        size = request.pagination.page_size or MAX_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"pagination.page_size must be 1-{MAX_PAGE_SIZE}")
        token = request.pagination.next_page_token
        start = int(token) if token.isdigit() else 0
        proto = self.hooks.protocols[0] if self.hooks.protocols else 0
        page = [route_to_pb(r, proto) for r in routes[start : start + size]]
        nxt = str(start + size) if start + size < len(routes) else ""
        return module_pb2.GetRoutesResponse(
            routes=page,
            pagination=types_pb2.Pagination(page_size=size, total=len(routes), next_page_token=nxt),
        )

    @rpc
    async def UpdateRoutes(
        self, request: module_pb2.UpdateRoutesRequest, context: Ctx
    ) -> module_pb2.UpdateRoutesResponse:
        try:
            incoming = [route_from_pb(r, self.rt.module_id) for r in request.routes]
        except ValueError as exc:
            raise InvalidArgument(f"route metadata is not valid JSON: {exc}") from None
        current = [] if request.replace else list(self.rt.own_routes())
        by_name = {r["name"]: r for r in current}
        for r in incoming:
            by_name[r["name"]] = r
        errors = await self.rt.apply_routes(
            list(by_name.values()), validate_only=request.validate_only
        )
        return module_pb2.UpdateRoutesResponse(
            success=not errors,
            message="rejected" if errors else ("valid" if request.validate_only else "applied"),
            validation_errors=errors,
            routes_applied=0 if errors or request.validate_only else len(incoming),
        )

    @rpc
    async def DeleteRoute(
        self, request: module_pb2.DeleteRouteRequest, context: Ctx
    ) -> module_pb2.DeleteRouteResponse:
        current = list(self.rt.own_routes())
        kept = [r for r in current if request.route_id not in (str(r.get("id")), r.get("name"))]
        if len(kept) == len(current):
            raise NotFound(f"route {request.route_id!r} does not exist")
        errors = await self.rt.apply_routes(kept)
        return module_pb2.DeleteRouteResponse(
            success=not errors, message="; ".join(errors) or "deleted"
        )

    # -- rate limits: a route's rate_limit; target names the route ------------------------------

    @rpc
    async def GetRateLimits(
        self, request: module_pb2.GetRateLimitsRequest, context: Ctx
    ) -> module_pb2.GetRateLimitsResponse:
        out = []
        for r in self.rt.own_routes():
            rl = r.get("rate_limit") or {}
            if isinstance(rl, int | float):  # seed 000's short form: requests per second
                rl = {"requests_per_second": rl, "burst": max(rl, 1)}
            if rl:
                out.append(
                    types_pb2.RateLimit(
                        target=str(r["name"]),
                        requests_per_second=int(rl.get("requests_per_second", 0)),
                        burst_size=int(rl.get("burst", 0)),
                        enabled=True,
                        scope=str(rl.get("scope", "local")),
                    )
                )
        return module_pb2.GetRateLimitsResponse(rate_limits=out)

    @rpc
    async def SetRateLimit(
        self, request: module_pb2.SetRateLimitRequest, context: Ctx
    ) -> module_pb2.SetRateLimitResponse:
        rl = request.rate_limit
        rps = rl.requests_per_second or rl.requests_per_minute / 60 or rl.requests_per_hour / 3600
        if rps <= 0:
            raise InvalidArgument("a rate limit needs requests_per_second, _minute or _hour > 0")
        if rl.burst_size < 0:
            raise InvalidArgument("burst_size must not be negative")
        routes = copy.deepcopy(list(self.rt.own_routes()))
        target = [r for r in routes if rl.target in (r.get("name"), str(r.get("id")))]
        if not target:
            raise NotFound(f"no route named {rl.target!r}; rate limits attach to routes")
        for r in target:
            r["rate_limit"] = {
                "requests_per_second": rps,
                "burst": rl.burst_size or max(1, int(rps)),
                "scope": rl.scope or "local",
            }
        errors = await self.rt.apply_routes(routes)
        return module_pb2.SetRateLimitResponse(
            success=not errors, message="; ".join(errors) or "applied"
        )

    @rpc
    async def RemoveRateLimit(
        self, request: module_pb2.RemoveRateLimitRequest, context: Ctx
    ) -> module_pb2.RemoveRateLimitResponse:
        routes = copy.deepcopy(list(self.rt.own_routes()))
        hit = False
        for r in routes:
            if request.target in (r.get("name"), str(r.get("id"))) and r.pop("rate_limit", None):
                hit = True
        if not hit:
            raise NotFound(f"no rate limit on {request.target!r}")
        errors = await self.rt.apply_routes(routes)
        return module_pb2.RemoveRateLimitResponse(
            success=not errors, message="; ".join(errors) or "removed"
        )

    # -- metrics, scaling, instances -----------------------------------------------------------

    @rpc
    async def GetMetrics(
        self, request: module_pb2.GetMetricsRequest, context: Ctx
    ) -> module_pb2.GetMetricsResponse:
        return module_pb2.GetMetricsResponse(metrics=self.rt.metrics_pb(request.metric_names))

    @rpc
    async def Scale(
        self, request: module_pb2.ScaleRequest, context: Ctx
    ) -> module_pb2.ScaleResponse:
        cfg = request.config
        if cfg.max_instances and cfg.min_instances > cfg.max_instances:
            raise InvalidArgument("min_instances must not exceed max_instances")
        target = cfg.desired_instances or cfg.min_instances
        if not target:
            raise InvalidArgument("config.desired_instances or config.min_instances is required")
        resp = await self.rt.forward_scaling(target, "Scale RPC")
        return module_pb2.ScaleResponse(
            success=resp.success,
            message=resp.message,
            current_instances=resp.current_instances,
            target_instances=resp.target_instances,
        )

    @rpc
    async def GetInstances(
        self, request: module_pb2.GetInstancesRequest, context: Ctx
    ) -> module_pb2.GetInstancesResponse:
        return module_pb2.GetInstancesResponse(instances=await self.rt.sibling_instances())

    # -- blue/green: this instance's view of its module's version weights ---------------------

    @rpc
    async def SetTrafficWeight(
        self, request: module_pb2.SetTrafficWeightRequest, context: Ctx
    ) -> module_pb2.SetTrafficWeightResponse:
        if not request.version or len(request.version) > 64:
            raise InvalidArgument("version is required (at most 64 characters)")
        if request.weight > 100:
            raise InvalidArgument("weight must be between 0 and 100")
        self.rt.weights[request.version] = request.weight
        return module_pb2.SetTrafficWeightResponse(
            success=True, message="recorded", weights=_weights_pb(self.rt.weights)
        )

    @rpc
    async def GetActiveVersion(
        self, request: module_pb2.GetActiveVersionRequest, context: Ctx
    ) -> module_pb2.GetActiveVersionResponse:
        return module_pb2.GetActiveVersionResponse(
            active_version=self.rt.active_version(), weights=_weights_pb(self.rt.weights)
        )

    @rpc
    async def Rollback(
        self, request: module_pb2.RollbackRequest, context: Ctx
    ) -> module_pb2.RollbackResponse:
        target = request.target_version or self.rt.previous_version()
        if not target:
            raise NotFound("no previous version to roll back to")
        self.rt.weights.clear()
        self.rt.weights[target] = 100
        _log.warning("rollback", to=target, reason=request.reason)
        return module_pb2.RollbackResponse(
            success=True, message="rolled back", active_version=target
        )

    @rpc
    async def PromoteVersion(
        self, request: module_pb2.PromoteVersionRequest, context: Ctx
    ) -> module_pb2.PromoteVersionResponse:
        if not request.version:
            raise InvalidArgument("version is required")
        if request.step_percent > 100:
            raise InvalidArgument("step_percent must be between 0 and 100")
        weights = self.rt.weights
        if request.gradual and request.step_percent:
            new = min(100, weights.get(request.version, 0) + request.step_percent)
        else:
            new = 100
        rest = 100 - new
        others = [v for v in weights if v != request.version]
        total_other = sum(weights[v] for v in others) or 1
        for v in others:
            weights[v] = round(rest * weights[v] / total_other)
        weights[request.version] = new
        return module_pb2.PromoteVersionResponse(
            success=True, message=f"{request.version} at {new}%", weights=_weights_pb(weights)
        )

    # -- health and monitoring -----------------------------------------------------------------

    @rpc
    async def HealthCheck(
        self, request: module_pb2.HealthCheckRequest, context: Ctx
    ) -> module_pb2.HealthCheckResponse:
        checks = await self.hooks.check_health(request.deep)
        failing = {k: v for k, v in checks.items() if v != "ok"}
        status = self.rt.health() if not failing else types_pb2.HEALTH_STATUS_UNHEALTHY
        resp = module_pb2.HealthCheckResponse(
            status=status,  # type: ignore[arg-type]
            message="; ".join(f"{k}: {v}" for k, v in failing.items()) or "ok",
            checks=checks,
        )
        resp.checked_at.GetCurrentTime()
        return resp

    @rpc
    async def GetStats(
        self, request: module_pb2.GetStatsRequest, context: Ctx
    ) -> module_pb2.GetStatsResponse:
        return module_pb2.GetStatsResponse(stats=self.rt.stats_pb())

    @rpc_stream
    async def StreamMetrics(
        self, request: module_pb2.StreamMetricsRequest, context: Ctx
    ) -> AsyncIterator[types_pb2.ModuleMetrics]:
        interval = float(request.interval_seconds or 1)
        interval = min(max(interval, MIN_STREAM_INTERVAL), MAX_STREAM_INTERVAL)
        sent = 0
        while not request.max_messages or sent < request.max_messages:
            yield self.rt.metrics_pb(request.metric_names)
            sent += 1
            if request.max_messages and sent >= request.max_messages:
                return
            await asyncio.sleep(interval)

    # -- configuration -------------------------------------------------------------------------

    @rpc
    async def GetConfig(
        self, request: module_pb2.GetConfigRequest, context: Ctx
    ) -> module_pb2.GetConfigResponse:
        config = dict(self.rt.config)
        if request.keys:
            config = {k: config[k] for k in request.keys if k in config}
        return module_pb2.GetConfigResponse(
            config_json=json.dumps(config, default=str), config_version=self.rt.config_version
        )

    @rpc
    async def UpdateConfig(
        self, request: module_pb2.UpdateConfigRequest, context: Ctx
    ) -> module_pb2.UpdateConfigResponse:
        if len(request.config_json) > MAX_CONFIG_JSON:
            raise InvalidArgument(f"config_json is larger than {MAX_CONFIG_JSON} bytes")
        try:
            snapshot = json.loads(request.config_json)
        except ValueError as exc:
            raise InvalidArgument(f"config_json is not valid JSON: {exc}") from None
        if not isinstance(snapshot, dict):
            raise InvalidArgument("config_json must be a JSON object (a desired-state snapshot)")
        snapshot.setdefault("version", request.config_version or self.rt.config_version)
        errors = await self.rt.apply_snapshot(
            snapshot, validate_only=request.validate_only, source="rpc"
        )
        return module_pb2.UpdateConfigResponse(
            success=not errors,
            message="rejected" if errors else ("valid" if request.validate_only else "applied"),
            validation_errors=errors,
            config_version=self.rt.config_version,
        )
