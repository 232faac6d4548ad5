"""Seed 000 module routes (CRUD, enable/disable) and seed 004 conflict detection."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from marchproxy_api.conflicts import RouteKey, find_conflicts, first_clash, route_key
from marchproxy_api.db.models import Module, ModuleRoute
from marchproxy_api.endpoints import Ctx, Endpoint
from marchproxy_api.errors import ApiError, conflict, not_found
from marchproxy_api.keys import compiled_cache_key
from marchproxy_api.repos.entities import RouteRepo
from marchproxy_api.schemas import (
    ConflictOut,
    ConflictsOut,
    RouteCreate,
    RouteOut,
    RoutePage,
    RouteQuery,
    RouteUpdate,
)
from marchproxy_api.snapshots import component_of
from marchproxy_api.txn import write_tx

from .common import changes, module_or_404, page, read_session, row

R = "/api/v1/modules/{module_id}/routes"


def _key(r: Any, m: Any) -> RouteKey:
    return route_key(
        ident=r.id,
        name=r.name,
        module=m.name,
        component=component_of(m.type),
        match_rules=r.match_rules,
        priority=r.priority,
    )


async def _routes_with_modules(ctx: Ctx, session: AsyncSession) -> list[tuple[Any, Any]]:
    src = await ctx.app[compiled_cache_key].sources.load(session, ("modules", "routes"))
    mods = {m.id: m for m in src["modules"]}
    return [(r, mods[r.module_id]) for r in src["routes"] if r.module_id in mods]


def _clash_error(other: RouteKey, reason: str) -> ApiError:
    return ApiError(
        409,
        "route_conflict",
        f"route conflicts with route {other.name!r} of module {other.module!r}: {reason}",
        conflicts_with=other.name,
        conflicts_with_id=other.id,
        module=other.module,
        reason=reason,
    )


def _row_key(r: ModuleRoute, module_name: str, module_type: str) -> RouteKey:
    return route_key(
        ident=r.id,
        name=r.name,
        module=module_name,
        component=component_of(module_type),
        match_rules=r.match_rules or {},
        priority=r.priority,
    )


async def _check_conflict(session: AsyncSession, candidate: ModuleRoute, mod: Module) -> None:
    """409 naming the clashing route when ``candidate`` (enabled) matches what another does.

    Runs inside the write transaction, after write_tx took the config_version lock, so two
    concurrent writes cannot both pass it. One query returns only the candidates (same host,
    path and priority), not every route.
    """
    if not candidate.enabled:
        return
    mine = _key(candidate, mod)
    rows = await RouteRepo(session).same_match(
        host=mine.host, path=mine.path, priority=mine.priority, exclude_id=candidate.id or 0
    )
    hit = first_clash(mine, [_row_key(r, name, type_) for r, name, type_ in rows])
    if hit is not None:
        raise _clash_error(*hit)


async def check_module_move(session: AsyncSession, mod: Module, new_type: str) -> None:
    """A module whose type moves it to another data plane takes its routes along: 409 when
    one of them clashes with a route already served there. Called inside write_tx."""
    component = component_of(new_type)
    if component == component_of(mod.type):
        return
    moving: list[RouteKey] = []
    there: list[RouteKey] = []
    for r, name, type_ in await RouteRepo(session).enabled_with_modules():
        if r.module_id == mod.id:
            moving.append(_row_key(r, name, new_type))
        elif component_of(type_) == component:
            there.append(_row_key(r, name, type_))
    for key in moving:
        hit = first_clash(key, there)
        if hit is not None:
            raise _clash_error(*hit)


async def _route_or_404(session: AsyncSession, module_id: int, route_id: int) -> ModuleRoute:
    r = await RouteRepo(session).of_module(module_id, route_id)
    if r is None:
        raise not_found("route", route_id)
    return r


async def list_routes(ctx: Ctx) -> RoutePage:
    q: RouteQuery = ctx.query
    mid = ctx.params["module_id"]
    where: list[Any] = [ModuleRoute.module_id == mid]
    if q.enabled is not None:
        where.append(ModuleRoute.enabled == q.enabled)
    if q.name:
        where.append(ModuleRoute.name == q.name)
    async with read_session(ctx) as session:
        await module_or_404(session, mid)
        rows, total = await RouteRepo(session).page(where, limit=q.limit, offset=q.offset)
    return page(RoutePage, RouteOut, rows, total, q)


async def create_route(ctx: Ctx) -> RouteOut:
    body: RouteCreate = ctx.body
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"])
        repo = RouteRepo(tx.session)
        if (await repo.page([ModuleRoute.module_id == mod.id, ModuleRoute.name == body.name]))[1]:
            raise conflict(f"route {body.name!r} already exists in module {mod.name!r}")
        values = body.model_dump(mode="json", exclude_none=False)
        values["match_rules"] = body.match_rules.model_dump(mode="json", exclude_none=True)
        candidate = ModuleRoute(module_id=mod.id, id=0, **values)
        await _check_conflict(tx.session, candidate, mod)
        r = await repo.add({"module_id": mod.id, **values})
        tx.audit("create", "route", r.id, None, row(r))
    return RouteOut.model_validate(r)


async def get_route(ctx: Ctx) -> RouteOut:
    async with read_session(ctx) as session:
        await module_or_404(session, ctx.params["module_id"])
        r = await _route_or_404(session, ctx.params["module_id"], ctx.params["route_id"])
    return RouteOut.model_validate(r)


async def _modify(ctx: Ctx, values: dict[str, Any], action: str) -> RouteOut:
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        r = await _route_or_404(tx.session, mod.id, ctx.params["route_id"])
        before = row(r)
        if "name" in values and values["name"] != r.name:
            repo = RouteRepo(tx.session)
            if (
                await repo.page(
                    [ModuleRoute.module_id == mod.id, ModuleRoute.name == values["name"]]
                )
            )[1]:
                raise conflict(f"route {values['name']!r} already exists in module {mod.name!r}")
        merged = {**before, **values}
        probe = ModuleRoute(
            id=r.id,
            name=merged["name"],
            match_rules=merged["match_rules"],
            priority=merged["priority"],
            enabled=merged["enabled"],
        )
        await _check_conflict(tx.session, probe, mod)
        await RouteRepo(tx.session).update(r, values)
        tx.audit(action, "route", r.id, before, row(r))
    return RouteOut.model_validate(r)


async def update_route(ctx: Ctx) -> RouteOut:
    body: RouteUpdate = ctx.body
    values = changes(body)
    if body.match_rules is not None:
        values["match_rules"] = body.match_rules.model_dump(mode="json", exclude_none=True)
    return await _modify(ctx, values, "update")


async def delete_route(ctx: Ctx) -> None:
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        r = await _route_or_404(tx.session, mod.id, ctx.params["route_id"])
        tx.audit("delete", "route", r.id, row(r), None)
        await RouteRepo(tx.session).delete(r)


async def enable_route(ctx: Ctx) -> RouteOut:
    return await _modify(ctx, {"enabled": True}, "enable")


async def disable_route(ctx: Ctx) -> RouteOut:
    return await _modify(ctx, {"enabled": False}, "disable")


async def list_conflicts(ctx: Ctx) -> ConflictsOut:
    async with read_session(ctx) as session:
        pairs = await _routes_with_modules(ctx, session)
    keys = [_key(r, m) for r, m in pairs if r.enabled]
    found = [
        ConflictOut(
            component=a.component,
            route=a.name,
            route_id=a.id,
            module=a.module,
            conflicts_with=b.name,
            conflicts_with_id=b.id,
            conflicts_with_module=b.module,
            reason=reason,
        )
        for a, b, reason in find_conflicts(keys)
    ]
    return ConflictsOut(conflicts=found, checked_routes=len(keys))


ENDPOINTS = [
    Endpoint(
        "GET", R, list_routes, "List module routes", "routes", query=RouteQuery, response=RoutePage
    ),
    Endpoint(
        "POST",
        R,
        create_route,
        "Create route",
        "routes",
        auth="admin",
        body=RouteCreate,
        response=RouteOut,
        status=201,
        extra_statuses=(409,),
    ),
    Endpoint("GET", R + "/{route_id}", get_route, "Get route", "routes", response=RouteOut),
    Endpoint(
        "PATCH",
        R + "/{route_id}",
        update_route,
        "Update route",
        "routes",
        auth="admin",
        body=RouteUpdate,
        response=RouteOut,
        extra_statuses=(409,),
    ),
    Endpoint(
        "DELETE",
        R + "/{route_id}",
        delete_route,
        "Delete route",
        "routes",
        auth="admin",
        status=204,
    ),
    Endpoint(
        "POST",
        R + "/{route_id}/enable",
        enable_route,
        "Enable route",
        "routes",
        auth="operator",
        response=RouteOut,
        extra_statuses=(409,),
    ),
    Endpoint(
        "POST",
        R + "/{route_id}/disable",
        disable_route,
        "Disable route",
        "routes",
        auth="operator",
        response=RouteOut,
    ),
    Endpoint(
        "GET",
        "/api/v1/routing/conflicts",
        list_conflicts,
        "Route conflicts (seed 004)",
        "routes",
        response=ConflictsOut,
    ),
]
