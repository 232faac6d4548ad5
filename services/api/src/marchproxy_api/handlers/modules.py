"""Seed 000 modules: CRUD, enable/disable, health; seed 004 registration history and metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from marchproxy_api.db.models import Module, RegistrationEvent
from marchproxy_api.endpoints import Ctx, Endpoint
from marchproxy_api.errors import conflict
from marchproxy_api.keys import grpc_clients_key
from marchproxy_api.repos import state as state_repo
from marchproxy_api.repos.entities import DeploymentRepo, HistoryRepo, ModuleRepo
from marchproxy_api.schemas import (
    HealthOut,
    HistoryPage,
    HistoryQuery,
    ModuleCreate,
    ModuleOut,
    ModulePage,
    ModuleQuery,
    ModuleUpdate,
    RegistrationEventOut,
    RouteMetricOut,
    RouteMetricsOut,
)
from marchproxy_api.txn import write_tx

from .common import changes, module_or_404, page, read_session, row
from .routes import check_module_move

M = "/api/v1/modules"


async def list_modules(ctx: Ctx) -> ModulePage:
    q: ModuleQuery = ctx.query
    where = []
    if q.type:
        where.append(Module.type == q.type)
    if q.enabled is not None:
        where.append(Module.enabled == q.enabled)
    if q.status:
        where.append(Module.status == q.status)
    if q.name:
        where.append(Module.name == q.name)
    async with read_session(ctx) as session:
        rows, total = await ModuleRepo(session).page(where, limit=q.limit, offset=q.offset)
    return page(ModulePage, ModuleOut, rows, total, q)


async def create_module(ctx: Ctx) -> ModuleOut:
    body: ModuleCreate = ctx.body
    async with write_tx(ctx.app, ctx.actor) as tx:
        repo = ModuleRepo(tx.session)
        if await repo.by_name(body.name):
            raise conflict(f"module {body.name!r} already exists", name=body.name)
        values = body.model_dump(mode="json")
        values["status"] = "ENABLED" if body.enabled else "DISABLED"
        mod = await repo.add(values)
        # The version the module starts with is its first (active) deployment, so blue/green
        # always has a "previous" to return to.
        await DeploymentRepo(tx.session).add(
            {
                "module_id": mod.id,
                "version": body.version or "initial",
                "image": body.image,
                "config": {},
                "traffic_weight": 100.0,
                "status": "ACTIVE",
                "deployed_by": ctx.actor,
                "completed_at": datetime.now(UTC),
                "weight_history": [],
            }
        )
        tx.audit("create", "module", mod.id, None, row(mod))
        tx.registration(mod.name, "created", type=mod.type, by=ctx.actor)
    return ModuleOut.model_validate(mod)


async def get_module(ctx: Ctx) -> ModuleOut:
    async with read_session(ctx) as session:
        mod = await module_or_404(session, ctx.params["module_id"])
    return ModuleOut.model_validate(mod)


async def update_module(ctx: Ctx) -> ModuleOut:
    body: ModuleUpdate = ctx.body
    async with write_tx(ctx.app, ctx.actor) as tx:
        repo = ModuleRepo(tx.session)
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        values = changes(body)
        new_name = values.get("name", mod.name)
        if new_name != mod.name and await repo.by_name(new_name):
            raise conflict(f"module {values['name']!r} already exists", name=values["name"])
        if "enabled" in values:
            values["status"] = "ENABLED" if values["enabled"] else "DISABLED"
        if "type" in values:
            await check_module_move(tx.session, mod, values["type"])
        before = row(mod)
        await repo.update(mod, values)
        tx.audit("update", "module", mod.id, before, row(mod))
    return ModuleOut.model_validate(mod)


async def delete_module(ctx: Ctx) -> None:
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        tx.audit("delete", "module", mod.id, row(mod), None)
        tx.registration(mod.name, "deleted", by=ctx.actor)
        await ModuleRepo(tx.session).delete(mod)


async def _set_enabled(ctx: Ctx, enabled: bool) -> ModuleOut:
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        before = row(mod)
        await ModuleRepo(tx.session).update(
            mod, {"enabled": enabled, "status": "ENABLED" if enabled else "DISABLED"}
        )
        action = "enable" if enabled else "disable"
        tx.audit(action, "module", mod.id, before, row(mod))
        tx.registration(mod.name, "enabled" if enabled else "disabled", by=ctx.actor)
    return ModuleOut.model_validate(mod)


async def enable_module(ctx: Ctx) -> ModuleOut:
    return await _set_enabled(ctx, True)


async def disable_module(ctx: Ctx) -> ModuleOut:
    return await _set_enabled(ctx, False)


async def module_health(ctx: Ctx) -> HealthOut:
    async with read_session(ctx) as session:
        mod = await module_or_404(session, ctx.params["module_id"])
        host, port = mod.grpc_host, mod.grpc_port
    result = await ctx.app[grpc_clients_key].health(host, port)
    async with write_tx(ctx.app, ctx.actor, config=False) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"])
        values = {
            "health": result.status,
            "health_message": result.message,
            "last_health_check": result.checked_at,
        }
        if mod.enabled and not result.healthy and mod.status == "ENABLED":
            values["status"] = "ERROR"
        elif mod.enabled and result.healthy and mod.status in ("ERROR", "STARTING"):
            values["status"] = "ENABLED"
        await ModuleRepo(tx.session).update(mod, values)
    return HealthOut(
        healthy=result.healthy,
        status=result.status,
        message=result.message,
        checks=result.checks,
        checked_at=result.checked_at,
        module_id=mod.id,
    )


async def registration_history(ctx: Ctx) -> HistoryPage:
    q: HistoryQuery = ctx.query
    where = [RegistrationEvent.module_name == q.module] if q.module else []
    async with read_session(ctx) as session:
        rows, total = await HistoryRepo(session).page(
            where, limit=q.limit, offset=q.offset, order=RegistrationEvent.id.desc()
        )
    return page(HistoryPage, RegistrationEventOut, rows, total, q)


async def route_metrics(ctx: Ctx) -> RouteMetricsOut:
    """Seed 004 shape: ``"<module>:<route>" -> counters`` summed over reporting instances."""
    async with read_session(ctx) as session:
        rows = await state_repo.route_metrics(session)
    sums: dict[str, list[float]] = {}
    for r in rows:
        acc = sums.setdefault(f"{r.module}:{r.route}", [0, 0.0, 0])
        acc[0] += r.call_count
        acc[1] += r.total_duration_ms
        acc[2] += r.error_count
    out = {}
    for key, (calls, dur, errors) in sorted(sums.items()):
        out[key] = RouteMetricOut(
            call_count=int(calls),
            total_duration_ms=dur,
            error_count=int(errors),
            avg_duration_ms=dur / calls if calls else 0.0,
            success_rate=(calls - errors) / calls if calls else 1.0,
        )
    return RouteMetricsOut(out)


ENDPOINTS = [
    Endpoint(
        "GET",
        M + "/registration-history",
        registration_history,
        "Module registration history (seed 004)",
        "modules",
        query=HistoryQuery,
        response=HistoryPage,
    ),
    Endpoint(
        "GET",
        M + "/metrics",
        route_metrics,
        "Per-route metrics (seed 004)",
        "modules",
        response=RouteMetricsOut,
    ),
    Endpoint(
        "GET", M, list_modules, "List modules", "modules", query=ModuleQuery, response=ModulePage
    ),
    Endpoint(
        "POST",
        M,
        create_module,
        "Create module",
        "modules",
        auth="admin",
        body=ModuleCreate,
        response=ModuleOut,
        status=201,
        extra_statuses=(409,),
    ),
    Endpoint("GET", M + "/{module_id}", get_module, "Get module", "modules", response=ModuleOut),
    Endpoint(
        "PATCH",
        M + "/{module_id}",
        update_module,
        "Update module",
        "modules",
        auth="admin",
        body=ModuleUpdate,
        response=ModuleOut,
        extra_statuses=(409,),
    ),
    Endpoint(
        "DELETE",
        M + "/{module_id}",
        delete_module,
        "Delete module",
        "modules",
        auth="admin",
        status=204,
    ),
    Endpoint(
        "POST",
        M + "/{module_id}/health",
        module_health,
        "Check module health (gRPC)",
        "modules",
        response=HealthOut,
    ),
    Endpoint(
        "POST",
        M + "/{module_id}/enable",
        enable_module,
        "Enable module",
        "modules",
        auth="operator",
        response=ModuleOut,
    ),
    Endpoint(
        "POST",
        M + "/{module_id}/disable",
        disable_module,
        "Disable module",
        "modules",
        auth="operator",
        response=ModuleOut,
    ),
]
