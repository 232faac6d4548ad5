"""Seed 000 blue/green deployments: CRUD, promote (optionally incremental with health checks
between steps and automatic rollback), rollback, health."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from marchproxy_api.db.models import Deployment, Module
from marchproxy_api.endpoints import Ctx, Endpoint
from marchproxy_api.errors import ApiError, conflict, not_found
from marchproxy_api.grpc_clients import HealthResult
from marchproxy_api.keys import (
    grpc_clients_key,
    module_locks_key,
    rollouts_key,
    sessionmaker_key,
    settings_key,
)
from marchproxy_api.repos.entities import DeploymentRepo
from marchproxy_api.rollouts import ModuleBusy, ModuleLock
from marchproxy_api.schemas import (
    DeploymentCreate,
    DeploymentOut,
    DeploymentPage,
    DeploymentQuery,
    DeploymentUpdate,
    HealthOut,
    PromoteIn,
    RollbackIn,
)
from marchproxy_api.txn import Tx, write_tx

from .common import changes, module_or_404, page, read_session, row

D = "/api/v1/modules/{module_id}/deployments"
FULL = 100.0
_log = structlog.get_logger("marchproxy.api.deployments")


def _now() -> datetime:
    return datetime.now(UTC)


def _history(dep: Deployment, weight: float, by: str, reason: str) -> None:
    entry = {"at": _now().isoformat(), "weight": weight, "by": by, "reason": reason}
    dep.weight_history = [*(dep.weight_history or []), entry]


async def _baseline(repo: DeploymentRepo, dep: Deployment) -> Deployment | None:
    """The deployment traffic returns to: the one ``dep`` replaced, else the live ACTIVE one."""
    if dep.previous_deployment_id:
        prev = await repo.of_module(dep.module_id, dep.previous_deployment_id)
        if prev is not None and prev.id != dep.id:
            return prev
    for other in reversed(await repo.live(dep.module_id)):
        if other.id != dep.id and other.status == "ACTIVE":
            return other
    return None


async def _set_weight(
    tx: Tx, mod: Module, dep: Deployment, weight: float, by: str, reason: str
) -> None:
    repo = DeploymentRepo(tx.session)
    base = await _baseline(repo, dep)
    live = [d for d in await repo.live(mod.id) if d.id != dep.id]
    if weight >= FULL:
        dep.status, dep.traffic_weight, dep.completed_at = "ACTIVE", FULL, _now()
        for other in live:
            other.status, other.traffic_weight = "INACTIVE", 0.0
            _history(other, 0.0, by, f"replaced by deployment {dep.id}")
        mod.version = dep.version
        if dep.image:
            mod.image = dep.image
    else:
        dep.status = "ROLLING_OUT" if weight > 0 else "PENDING"
        dep.traffic_weight = weight
        for other in live:
            if base is not None and other.id == base.id:
                continue
            other.status, other.traffic_weight = "INACTIVE", 0.0
        if base is not None:
            base.status, base.traffic_weight = "ACTIVE", FULL - weight
            _history(base, FULL - weight, by, f"deployment {dep.id} at {weight}")
    _history(dep, dep.traffic_weight, by, reason)
    await tx.session.flush()


async def _dep_or_404(tx_session: Any, module_id: int, dep_id: int) -> Deployment:
    dep = await DeploymentRepo(tx_session).of_module(module_id, dep_id)
    if dep is None:
        raise not_found("deployment", dep_id)
    return dep


async def list_deployments(ctx: Ctx) -> DeploymentPage:
    q: DeploymentQuery = ctx.query
    mid = ctx.params["module_id"]
    where: list[Any] = [Deployment.module_id == mid]
    if q.status:
        where.append(Deployment.status == q.status)
    async with read_session(ctx) as session:
        await module_or_404(session, mid)
        rows, total = await DeploymentRepo(session).page(where, limit=q.limit, offset=q.offset)
    return page(DeploymentPage, DeploymentOut, rows, total, q)


async def create_deployment(ctx: Ctx) -> DeploymentOut:
    body: DeploymentCreate = ctx.body
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        repo = DeploymentRepo(tx.session)
        active = await repo.active(mod.id)
        values = body.model_dump(mode="json")
        weight = values.pop("traffic_weight")
        dep = await repo.add(
            {
                "module_id": mod.id,
                **values,
                "traffic_weight": 0.0,
                "status": "PENDING",
                "previous_deployment_id": active.id if active else None,
                "deployed_by": ctx.actor,
                "weight_history": [],
            }
        )
        if weight > 0:
            await _set_weight(tx, mod, dep, weight, ctx.actor, "created")
        tx.audit("create", "deployment", dep.id, None, row(dep))
    return DeploymentOut.model_validate(dep)


async def get_deployment(ctx: Ctx) -> DeploymentOut:
    async with read_session(ctx) as session:
        await module_or_404(session, ctx.params["module_id"])
        dep = await _dep_or_404(session, ctx.params["module_id"], ctx.params["deployment_id"])
    return DeploymentOut.model_validate(dep)


async def update_deployment(ctx: Ctx) -> DeploymentOut:
    body: DeploymentUpdate = ctx.body
    async with write_tx(ctx.app, ctx.actor) as tx:
        mod = await module_or_404(tx.session, ctx.params["module_id"], lock=True)
        dep = await _dep_or_404(tx.session, mod.id, ctx.params["deployment_id"])
        before = row(dep)
        await DeploymentRepo(tx.session).update(dep, changes(body))
        tx.audit("update", "deployment", dep.id, before, row(dep))
    return DeploymentOut.model_validate(dep)


async def _health_of(
    app: web.Application, actor: str, module_id: int, dep_id: int
) -> tuple[HealthResult, Deployment]:
    async with app[sessionmaker_key]() as session:
        mod = await module_or_404(session, module_id)
        dep = await _dep_or_404(session, module_id, dep_id)
        host = str(dep.config.get("grpc_host") or mod.grpc_host)
        port = dep.config.get("grpc_port") or mod.grpc_port
    port = int(port) if isinstance(port, int | float | str) and str(port).isdigit() else 0
    result = await app[grpc_clients_key].health(host, port)
    async with write_tx(app, actor, config=False) as tx:
        dep = await _dep_or_404(tx.session, module_id, dep_id)
        dep.health_check_passed = result.healthy
        dep.health_check_message = f"{result.status}: {result.message}".strip(": ")
    return result, dep


async def deployment_health(ctx: Ctx) -> HealthOut:
    result, dep = await _health_of(
        ctx.app, ctx.actor, ctx.params["module_id"], ctx.params["deployment_id"]
    )
    return HealthOut(
        healthy=result.healthy,
        status=result.status,
        message=result.message,
        checks=result.checks,
        checked_at=result.checked_at,
        module_id=dep.module_id,
        deployment_id=dep.id,
    )


async def _apply_weight(
    app: web.Application, actor: str, module_id: int, dep_id: int, weight: float, reason: str
) -> Deployment:
    async with write_tx(app, actor) as tx:
        mod = await module_or_404(tx.session, module_id, lock=True)
        dep = await _dep_or_404(tx.session, mod.id, dep_id)
        before = row(dep)
        await _set_weight(tx, mod, dep, weight, actor, reason)
        tx.audit("promote", "deployment", dep.id, before, row(dep))
    return dep


async def _rollback(
    app: web.Application,
    actor: str,
    module_id: int,
    dep_id: int,
    reason: str,
    *,
    failed: bool = False,
) -> Deployment:
    async with write_tx(app, actor) as tx:
        mod = await module_or_404(tx.session, module_id, lock=True)
        dep = await _dep_or_404(tx.session, mod.id, dep_id)
        repo = DeploymentRepo(tx.session)
        base = await _baseline(repo, dep)
        if base is None:
            raise conflict(
                f"deployment {dep.id} has no previous deployment to roll back to", deployment=dep.id
            )
        before = row(dep)
        for other in await repo.live(mod.id):
            if other.id not in (dep.id, base.id):
                other.status, other.traffic_weight = "INACTIVE", 0.0
        # seed 000 statuses: FAILED = failed its health checks (the automatic rollback of an
        # incremental promote), ROLLED_BACK = rolled back by an operator
        dep.status = "FAILED" if failed else "ROLLED_BACK"
        dep.traffic_weight = 0.0
        dep.rollback_reason = reason
        dep.completed_at = _now()
        _history(dep, 0.0, actor, f"rollback: {reason}")
        base.status, base.traffic_weight = "ACTIVE", FULL
        _history(base, FULL, actor, f"restored by rollback of deployment {dep.id}")
        mod.version = base.version
        if base.image:
            mod.image = base.image
        tx.audit("rollback", "deployment", dep.id, before, row(dep))
    return dep


def _busy(module_id: int) -> ApiError:
    return ApiError(
        409,
        "rollout_in_progress",
        f"another promote or rollback of module {module_id} is in progress; retry when it ends",
        module=module_id,
    )


async def _lock(ctx: Ctx, module_id: int) -> ModuleLock:
    if module_id in ctx.app[rollouts_key].running:
        raise _busy(module_id)
    try:
        return await ctx.app[module_locks_key].acquire(
            module_id, ctx.app[settings_key].module_lock_wait
        )
    except ModuleBusy:
        raise _busy(module_id) from None


@dataclass
class Outcome:
    """How a rollout ended: the deployment as it stands, and the error to answer, if any."""

    deployment: Deployment
    error: ApiError | None = None


async def _aborted_within(abort: asyncio.Event, seconds: float) -> bool:
    if abort.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await abort.wait()
    except TimeoutError:
        return False
    return True


async def _rollout(
    app: web.Application,
    actor: str,
    dep: Deployment,
    target: float,
    lock: ModuleLock,
    abort: asyncio.Event,
) -> Outcome:
    """Seed 000 incremental promote: walk the weight up the configured steps, checking the
    deployment's health (gRPC) after each; on a failed check roll back to the previous
    deployment and mark this one FAILED. Holds the module lock until it ends."""
    settings = app[settings_key]
    mid, did = dep.module_id, dep.id
    try:
        steps = [w for w in settings.promote_steps if dep.traffic_weight < w < target]
        steps.append(target)
        health, dep = await _health_of(app, actor, mid, did)
        if not health.healthy:
            return Outcome(
                dep,
                ApiError(
                    409,
                    "promotion_failed",
                    f"deployment {did} is not healthy ({health.status}); nothing was shifted",
                    deployment=did,
                    health=health.status,
                    health_message=health.message,
                ),
            )
        for weight in steps:
            if abort.is_set():
                return Outcome(dep, _aborted(did, dep.traffic_weight))
            dep = await _apply_weight(app, actor, mid, did, weight, "incremental promote")
            if await _aborted_within(abort, settings.promote_step_seconds):
                return Outcome(dep, _aborted(did, weight))
            health, _ = await _health_of(app, actor, mid, did)
            if not health.healthy:
                reason = f"health check failed at weight {weight}: {health.status} {health.message}"
                _log.warning("promotion_rolled_back", deployment=did, reason=reason)
                dep = await _rollback(app, actor, mid, did, reason, failed=True)
                return Outcome(
                    dep,
                    ApiError(
                        409,
                        "promotion_failed",
                        f"deployment {did} failed its health check at {weight}%; rolled back",
                        deployment=did,
                        failed_at_weight=weight,
                        health=health.status,
                    ),
                )
        async with app[sessionmaker_key]() as session:
            dep = await _dep_or_404(session, mid, did)
        return Outcome(dep)
    finally:
        await lock.release()


def _aborted(dep_id: int, weight: float) -> ApiError:
    return ApiError(
        409,
        "promotion_aborted",
        f"the incremental promote of deployment {dep_id} was stopped at {weight}% "
        "by a rollback or shutdown",
        deployment=dep_id,
        stopped_at_weight=weight,
    )


async def promote(ctx: Ctx) -> DeploymentOut | web.Response:
    body: PromoteIn = ctx.body
    mid, did = ctx.params["module_id"], ctx.params["deployment_id"]
    async with read_session(ctx) as session:
        await module_or_404(session, mid)
        dep = await _dep_or_404(session, mid, did)
    lock = await _lock(ctx, mid)
    if not body.incremental:
        try:
            dep = await _apply_weight(ctx.app, ctx.actor, mid, did, body.traffic_weight, "promote")
        finally:
            await lock.release()
        return DeploymentOut.model_validate(dep)
    app, actor = ctx.app, ctx.actor
    rollout = app[rollouts_key].start(
        mid, did, lambda abort: _rollout(app, actor, dep, body.traffic_weight, lock, abort)
    )
    # The rollout is owned by the app, not by this request: a client that disconnects or a
    # rollout longer than promote_wait_seconds (answered 202) does not stop it.
    done, _ = await asyncio.wait({rollout.task}, timeout=app[settings_key].promote_wait_seconds)
    if done:
        outcome: Outcome = rollout.task.result()
        if outcome.error is not None:
            raise outcome.error
        return DeploymentOut.model_validate(outcome.deployment)
    async with read_session(ctx) as session:
        dep = await _dep_or_404(session, mid, did)
    data = DeploymentOut.model_validate(dep).model_dump(mode="json")
    resp = web.json_response(data, status=202)
    resp.headers["Location"] = f"/api/v1/modules/{mid}/deployments/{did}"
    return resp


async def rollback(ctx: Ctx) -> DeploymentOut:
    body: RollbackIn = ctx.body
    mid, did = ctx.params["module_id"], ctx.params["deployment_id"]
    async with read_session(ctx) as session:
        await module_or_404(session, mid)
        await _dep_or_404(session, mid, did)
    # a rollback stops this process's incremental promote of the module at its next step
    await ctx.app[rollouts_key].abort(mid, ctx.app[settings_key].module_lock_wait)
    lock = await _lock(ctx, mid)
    try:
        dep = await _rollback(ctx.app, ctx.actor, mid, did, body.reason or "manual rollback")
    finally:
        await lock.release()
    return DeploymentOut.model_validate(dep)


ENDPOINTS = [
    Endpoint(
        "GET",
        D,
        list_deployments,
        "List deployments",
        "deployments",
        query=DeploymentQuery,
        response=DeploymentPage,
    ),
    Endpoint(
        "POST",
        D,
        create_deployment,
        "Create deployment",
        "deployments",
        auth="admin",
        body=DeploymentCreate,
        response=DeploymentOut,
        status=201,
    ),
    Endpoint(
        "GET",
        D + "/{deployment_id}",
        get_deployment,
        "Get deployment",
        "deployments",
        response=DeploymentOut,
    ),
    Endpoint(
        "PATCH",
        D + "/{deployment_id}",
        update_deployment,
        "Update deployment",
        "deployments",
        auth="admin",
        body=DeploymentUpdate,
        response=DeploymentOut,
    ),
    Endpoint(
        "POST",
        D + "/{deployment_id}/promote",
        promote,
        "Promote (traffic_weight; incremental walks the configured steps; 202 while a long "
        "rollout goes on in the background)",
        "deployments",
        auth="operator",
        body=PromoteIn,
        response=DeploymentOut,
        extra_statuses=(202, 409),
    ),
    Endpoint(
        "POST",
        D + "/{deployment_id}/rollback",
        rollback,
        "Roll back",
        "deployments",
        auth="operator",
        body=RollbackIn,
        response=DeploymentOut,
        extra_statuses=(409,),
    ),
    Endpoint(
        "GET",
        D + "/{deployment_id}/health",
        deployment_health,
        "Check deployment health (gRPC HealthCheck)",
        "deployments",
        response=HealthOut,
        etag=False,
    ),
]
