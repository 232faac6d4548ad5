"""Seed 000 auto-scaling policy of a module: GET/POST/PUT/DELETE + enable/disable."""

from __future__ import annotations

from marchproxy_api.endpoints import Ctx, Endpoint
from marchproxy_api.errors import conflict, not_found
from marchproxy_api.repos.entities import ScalingRepo
from marchproxy_api.schemas import ScalingIn, ScalingOut
from marchproxy_api.txn import write_tx

from .common import module_or_404, read_session, row

S = "/api/v1/modules/{module_id}/scaling"


async def get_policy(ctx: Ctx) -> ScalingOut:
    async with read_session(ctx) as session:
        await module_or_404(session, ctx.params["module_id"])
        p = await ScalingRepo(session).of_module(ctx.params["module_id"])
    if p is None:
        raise not_found("scaling policy of module", ctx.params["module_id"])
    return ScalingOut.model_validate(p)


async def create_policy(ctx: Ctx) -> ScalingOut:
    body: ScalingIn = ctx.body
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        repo = ScalingRepo(tx.session)
        if await repo.of_module(mod.id):
            raise conflict(f"module {mod.name!r} already has a scaling policy; use PUT")
        p = await repo.add({"module_id": mod.id, **body.model_dump(mode="json")})
        tx.audit("create", "scaling_policy", p.id, None, row(p))
    return ScalingOut.model_validate(p)


async def put_policy(ctx: Ctx) -> ScalingOut:
    body: ScalingIn = ctx.body
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        repo = ScalingRepo(tx.session)
        p = await repo.of_module(mod.id)
        if p is None:
            raise not_found("scaling policy of module", mod.id)
        before = row(p)
        await repo.update(p, body.model_dump(mode="json"))
        tx.audit("update", "scaling_policy", p.id, before, row(p))
    return ScalingOut.model_validate(p)


async def delete_policy(ctx: Ctx) -> None:
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        repo = ScalingRepo(tx.session)
        p = await repo.of_module(mod.id)
        if p is None:
            raise not_found("scaling policy of module", mod.id)
        tx.audit("delete", "scaling_policy", p.id, row(p), None)
        await repo.delete(p)


async def _toggle(ctx: Ctx, enabled: bool) -> ScalingOut:
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        repo = ScalingRepo(tx.session)
        p = await repo.of_module(mod.id)
        if p is None:
            raise not_found("scaling policy of module", mod.id)
        before = row(p)
        await repo.update(p, {"enabled": enabled})
        tx.audit("enable" if enabled else "disable", "scaling_policy", p.id, before, row(p))
    return ScalingOut.model_validate(p)


async def enable_policy(ctx: Ctx) -> ScalingOut:
    return await _toggle(ctx, True)


async def disable_policy(ctx: Ctx) -> ScalingOut:
    return await _toggle(ctx, False)


ENDPOINTS = [
    Endpoint("GET", S, get_policy, "Get scaling policy", "scaling", response=ScalingOut),
    Endpoint(
        "POST",
        S,
        create_policy,
        "Create scaling policy",
        "scaling",
        auth="operator",
        body=ScalingIn,
        response=ScalingOut,
        status=201,
        extra_statuses=(409,),
    ),
    Endpoint(
        "PUT",
        S,
        put_policy,
        "Update scaling policy",
        "scaling",
        auth="operator",
        body=ScalingIn,
        response=ScalingOut,
    ),
    Endpoint(
        "DELETE", S, delete_policy, "Delete scaling policy", "scaling", auth="operator", status=204
    ),
    Endpoint(
        "POST",
        S + "/enable",
        enable_policy,
        "Enable auto-scaling",
        "scaling",
        auth="operator",
        response=ScalingOut,
    ),
    Endpoint(
        "POST",
        S + "/disable",
        disable_policy,
        "Disable auto-scaling",
        "scaling",
        auth="operator",
        response=ScalingOut,
    ),
]
