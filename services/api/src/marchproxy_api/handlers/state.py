"""Desired state for data planes without Redis (long poll), their ACK/NACK reports, the
per-instance config status, and per-route metrics they report (seed 004)."""

from __future__ import annotations

from aiohttp import web

from marchproxy_api.endpoints import Ctx, Endpoint
from marchproxy_api.keys import publisher_key, settings_key
from marchproxy_api.repos import state as state_repo
from marchproxy_api.schemas import (
    COMPONENTS,
    AcceptedOut,
    ComponentStatus,
    RouteMetricsIn,
    StateAckIn,
    StateAckOut,
    StatePollQuery,
    StateSnapshotOut,
    StateStatusOut,
)
from marchproxy_api.txn import write_tx

from .common import read_session

ENUMS = {"component": COMPONENTS}


async def poll_state(ctx: Ctx) -> web.StreamResponse:
    q: StatePollQuery = ctx.query
    component = ctx.request.match_info["component"]
    settings = ctx.app[settings_key]
    publisher = ctx.app[publisher_key]
    timeout = settings.state_poll_default if q.timeout is None else q.timeout
    timeout = min(timeout, settings.state_poll_max)
    # writes made through other API replicas reach the publisher via txn.watch_stored_versions
    snap = await publisher.wait_newer(component, q.after, timeout)
    if snap is None:
        return web.Response(
            status=304, headers={"X-Config-Version": str(publisher.version_of(component))}
        )
    return web.Response(
        text=snap[1], content_type="application/json", headers={"X-Config-Version": str(snap[0])}
    )


async def ack_state(ctx: Ctx) -> StateAckOut:
    body: StateAckIn = ctx.body
    component = ctx.request.match_info["component"]
    async with write_tx(ctx.app, ctx.actor, config=False) as tx:
        row, new = await state_repo.record_ack(
            tx.session,
            component,
            body.instance_id,
            body.applied_version,
            body.rejected_version,
            body.reason,
        )
        if new:
            tx.registration(component, "instance_seen", instance_id=body.instance_id)
        if body.rejected_version:
            tx.registration(
                component,
                "config_rejected",
                instance_id=body.instance_id,
                version=body.rejected_version,
                reason=body.reason[:500],
            )
    return StateAckOut.model_validate(row)


async def state_status(ctx: Ctx) -> StateStatusOut:
    publisher = ctx.app[publisher_key]
    async with read_session(ctx) as session:
        version = await state_repo.current_version(session)
        stored = await state_repo.snapshots(session)
        acks = await state_repo.acks(session)
    comps = []
    for comp in COMPONENTS:
        comps.append(
            ComponentStatus(
                component=comp,
                version=stored[comp].version if comp in stored else 0,
                published_version=publisher.published.get(comp, 0),
                instances=[StateAckOut.model_validate(a) for a in acks if a.component == comp],
            )
        )
    return StateStatusOut(config_version=version, redis=publisher.redis_state, components=comps)


async def report_route_metrics(ctx: Ctx) -> AcceptedOut:
    body: RouteMetricsIn = ctx.body
    async with write_tx(ctx.app, ctx.actor, config=False) as tx:
        await state_repo.record_route_metrics(
            tx.session,
            body.instance_id,
            body.module,
            {k: v.model_dump() for k, v in body.routes.items()},
        )
    return AcceptedOut(accepted=len(body.routes))


S = "/api/v1/state"
ENDPOINTS = [
    Endpoint(
        "GET",
        S + "/status",
        state_status,
        "Which config version each instance runs",
        "state",
        response=StateStatusOut,
    ),
    Endpoint(
        "POST",
        S + "/metrics",
        report_route_metrics,
        "Data plane reports route counters",
        "state",
        auth="cluster",
        body=RouteMetricsIn,
        response=AcceptedOut,
        extra_statuses=(409,),
    ),
    Endpoint(
        "GET",
        S + "/{component}",
        poll_state,
        "Long poll: 200 + snapshot when newer than ?after, 304 after ?timeout",
        "state",
        auth="cluster",
        query=StatePollQuery,
        response=StateSnapshotOut,
        enums=ENUMS,
        etag=False,
        extra_statuses=(304,),
    ),
    Endpoint(
        "POST",
        S + "/{component}/ack",
        ack_state,
        "Data plane ACK/NACK of a version",
        "state",
        auth="cluster",
        body=StateAckIn,
        response=StateAckOut,
        enums=ENUMS,
        extra_statuses=(409,),
    ),
]
