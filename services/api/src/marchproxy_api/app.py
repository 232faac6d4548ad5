"""Wiring only: settings → engine, Redis publisher, gRPC clients, routes, middlewares."""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from marchproxy_api.config import ApiSettings
from marchproxy_api.db.session import make_engine, make_sessionmaker, migrate
from marchproxy_api.endpoints import Endpoint, add_routes
from marchproxy_api.grpc_clients import ModuleClientManager
from marchproxy_api.handlers import auth, deployments, modules, routes, scaling, services, state
from marchproxy_api.handlers import system as system_handlers
from marchproxy_api.keys import (
    compiled_cache_key,
    engine_key,
    grpc_clients_key,
    login_limiter_key,
    metrics_key,
    password_hashing_key,
    publisher_key,
    sessionmaker_key,
    settings_key,
)
from marchproxy_api.metrics import ApiMetrics
from marchproxy_api.middlewares import error_middleware
from marchproxy_api.openapi import build_openapi
from marchproxy_api.publisher import StatePublisher
from marchproxy_api.repos.entities import UserRepo
from marchproxy_api.security import LoginLimiter, PasswordHashing
from marchproxy_api.txn import CompiledCache, republish_all, watch_stored_versions, write_tx
from marchproxy_common.tasks import cancel_and_wait, spawn

_log = structlog.get_logger("marchproxy.api")
CLIENT_MAX_SIZE = 4 * 1024 * 1024


def all_endpoints() -> list[Endpoint]:
    return [
        *system_handlers.ENDPOINTS,
        *auth.ENDPOINTS,
        *modules.ENDPOINTS,
        *routes.ENDPOINTS,
        *scaling.ENDPOINTS,
        *deployments.ENDPOINTS,
        *services.ENDPOINTS,
        *state.ENDPOINTS,
    ]


async def ensure_admin(app: web.Application) -> None:
    """First start: create the admin user (password from MARCHPROXY_ADMIN_PASSWORD or printed)."""
    settings = app[settings_key]
    async with app[sessionmaker_key]() as session:
        if await UserRepo(session).count():
            return
    password = settings.marchproxy_admin_password
    generated = not password
    if generated:
        password = secrets.token_urlsafe(18)
    password_hash = await app[password_hashing_key].hash(password)
    async with write_tx(app, "system", config=False) as tx:
        user = await UserRepo(tx.session).add(
            {
                "username": settings.marchproxy_admin_username,
                "password_hash": password_hash,
                "role": "admin",
            }
        )
        tx.audit("create", "user", user.id, None, {"username": user.username, "role": "admin"})
    if generated:
        print(
            f"marchproxy-api: created user {settings.marchproxy_admin_username!r} "
            f"with password {password}  (shown once; set MARCHPROXY_ADMIN_PASSWORD to choose)",
            file=sys.stderr,
            flush=True,
        )


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    engine = make_engine(settings.sqlalchemy_url)
    app[engine_key] = engine
    app[sessionmaker_key] = make_sessionmaker(engine)
    publisher = StatePublisher(
        settings.redis_url,
        settings.state_prefix,
        app[metrics_key],
        check_interval=settings.state_check_interval,
    )
    app[publisher_key] = publisher
    clients = ModuleClientManager(settings.effective_cluster_api_key, settings.grpc_timeout)
    app[grpc_clients_key] = clients
    watcher: asyncio.Task[None] | None = None
    try:
        if settings.run_migrations:
            await migrate(engine)
        await ensure_admin(app)
        await publisher.start()
        version = await republish_all(app)
        watcher = spawn(watch_stored_versions(app), name="stored-version-watch")
        _log.info("api_started", config_version=version, database=engine.dialect.name)
        yield
    finally:
        await cancel_and_wait(watcher)
        await publisher.stop()
        await clients.close()
        await engine.dispose()
        app[password_hashing_key].close()


def create_app(settings: ApiSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=CLIENT_MAX_SIZE)
    app[settings_key] = settings
    app[metrics_key] = ApiMetrics()
    app[compiled_cache_key] = CompiledCache()
    app[password_hashing_key] = PasswordHashing(
        settings.password_hash_threads, settings.password_hash_queue
    )
    app[login_limiter_key] = LoginLimiter(
        max_failures=settings.login_max_failures, window=settings.login_window_seconds
    )
    endpoints = all_endpoints()
    app[system_handlers.openapi_key] = build_openapi(endpoints, system_handlers.API_VERSION)
    add_routes(app, endpoints)
    app.cleanup_ctx.append(_resources)
    return app
