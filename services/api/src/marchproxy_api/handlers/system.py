"""/, /healthz, /readyz, /metrics, system health, OpenAPI and Swagger UI."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from marchproxy_api.db.models import Module
from marchproxy_api.endpoints import Ctx, Endpoint, not_ready
from marchproxy_api.errors import ApiError
from marchproxy_api.keys import metrics_key, publisher_key, readiness_key
from marchproxy_api.openapi import SWAGGER_HTML
from marchproxy_api.repos import state as state_repo
from marchproxy_api.schemas import HealthzOut, ReadyOut, RootOut, SystemHealthOut

from .common import read_session

API_VERSION = "0.1.0"
openapi_key = web.AppKey("openapi", dict)


async def root(ctx: Ctx) -> RootOut:
    return RootOut(
        name="MarchProxy API",
        version=API_VERSION,
        docs="/api/docs",
        openapi="/api/openapi.json",
        health="/healthz",
    )


async def healthz(ctx: Ctx) -> HealthzOut:
    return HealthzOut(status="ok")


async def _db_ok(ctx: Ctx) -> tuple[bool, int]:
    try:
        async with read_session(ctx) as session:
            await session.execute(text("SELECT 1"))
            return True, await state_repo.current_version(session)
    except Exception:
        return False, 0


async def readyz(ctx: Ctx) -> ReadyOut:
    readiness = ctx.app[readiness_key]
    if not readiness.ready:
        raise not_ready(readiness.reason)
    ok, version = await _db_ok(ctx)
    if not ok:
        raise ApiError(503, "not_ready", "database unavailable")
    return ReadyOut(status="ready", config_version=version)


async def metrics(ctx: Ctx) -> web.StreamResponse:
    body = generate_latest(ctx.app[metrics_key].registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def system_health(ctx: Ctx) -> SystemHealthOut:
    publisher = ctx.app[publisher_key]
    db_ok, version = await _db_ok(ctx)
    modules: dict[str, int] = {}
    if db_ok:
        async with read_session(ctx) as session:
            rows = await session.execute(
                select(Module.status, func.count()).group_by(Module.status)
            )
            modules = {status: int(n) for status, n in rows.tuples()}
    redis_ok = await publisher.ping()
    ready = ctx.app[readiness_key].ready
    healthy = ready and db_ok and (redis_ok or publisher.redis_state == "disabled")
    return SystemHealthOut(
        status="healthy" if healthy else "degraded",
        ready=ready,
        version=API_VERSION,
        database="up" if db_ok else "down",
        redis="up" if redis_ok else publisher.redis_state,
        config_version=version,
        publish_pending=publisher.pending,
        modules_by_status=modules,
    )


async def openapi_json(ctx: Ctx) -> dict[str, Any]:
    spec: dict[str, Any] = ctx.app[openapi_key]
    return spec


async def docs(ctx: Ctx) -> web.StreamResponse:
    return web.Response(text=SWAGGER_HTML, content_type="text/html")


ENDPOINTS = [
    Endpoint(
        "GET",
        "/",
        root,
        "API information",
        "system",
        auth="public",
        needs_db=False,
        response=RootOut,
    ),
    Endpoint(
        "GET",
        "/healthz",
        healthz,
        "Liveness",
        "system",
        auth="public",
        needs_db=False,
        etag=False,
        response=HealthzOut,
    ),
    Endpoint(
        "GET",
        "/readyz",
        readyz,
        "Readiness (database reachable)",
        "system",
        auth="public",
        needs_db=False,
        etag=False,
        response=ReadyOut,
        extra_statuses=(503,),
    ),
    Endpoint(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        "system",
        auth="public",
        needs_db=False,
        raw_response="text/plain",
        etag=False,
    ),
    Endpoint(
        "GET",
        "/api/v1/system/health",
        system_health,
        "System health (seed 004)",
        "system",
        auth="public",
        needs_db=False,
        etag=False,
        response=SystemHealthOut,
    ),
    Endpoint(
        "GET",
        "/api/openapi.json",
        openapi_json,
        "This document",
        "system",
        auth="public",
        needs_db=False,
    ),
    Endpoint(
        "GET",
        "/api/docs",
        docs,
        "Swagger UI",
        "system",
        auth="public",
        needs_db=False,
        raw_response="text/html",
        etag=False,
    ),
]
