"""Wiring only: settings → engine, Redis publisher, gRPC clients, routes, middlewares."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import structlog
from aiohttp import web

from marchproxy_api import bootstrap
from marchproxy_common.tasks import cancel_and_wait, spawn

from .config import ApiSettings
from .db.session import make_engine, make_sessionmaker
from .endpoints import Endpoint, add_routes
from .grpc_clients import ModuleClientManager
from .handlers import auth, deployments, modules, routes, scaling, services, state
from .handlers import system as system_handlers
from .keys import (
    compiled_cache_key,
    engine_key,
    grpc_clients_key,
    login_limiter_key,
    metrics_key,
    module_locks_key,
    password_hashing_key,
    publisher_key,
    readiness_key,
    rollouts_key,
    sessionmaker_key,
    settings_key,
)
from .metrics import ApiMetrics
from .middlewares import error_middleware
from .openapi import build_openapi
from .publisher import StatePublisher
from .rollouts import ModuleLocks, Rollouts
from .security import LoginLimiter, PasswordHashing
from .txn import CompiledCache

CLIENT_MAX_SIZE = 4 * 1024 * 1024
#: at shutdown, running rollouts get this long to stop at their next step (seconds)
ROLLOUT_STOP_WAIT = 5.0
#: at shutdown, the most any one step (beyond its own waits) may take before the next runs
SHUTDOWN_STEP_TIMEOUT = 10.0

_log = structlog.get_logger("marchproxy.api")


async def _shutdown_step(step: str, work: Awaitable[None], seconds: float) -> None:
    """Run one step of the shutdown for at most ``seconds``: a step that hangs (a client
    library that never answers a close) is logged and left behind, so the steps after it
    still run and the process exits."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        _log.error("shutdown_step_timed_out", step=step, seconds=seconds)
    elif not task.cancelled() and task.exception() is not None:
        _log.error("shutdown_step_failed", step=step, exc_info=task.exception())


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
    clients = ModuleClientManager(
        settings.effective_cluster_api_key, settings.grpc_timeout, settings.grpc_max_channels
    )
    app[grpc_clients_key] = clients
    app[module_locks_key] = ModuleLocks(engine)
    rollouts = app[rollouts_key] = Rollouts()
    await publisher.start()
    # the first attempt runs before the server accepts requests; if the database is down the
    # process stays up, answers 503 and keeps trying in the background
    await bootstrap.try_start(app)
    background = spawn(bootstrap.run_background(app), name="api-start-and-watch")
    try:
        yield
    finally:
        step = SHUTDOWN_STEP_TIMEOUT
        await _shutdown_step("start_and_watch", cancel_and_wait(background), step)
        await _shutdown_step("rollouts", rollouts.stop(ROLLOUT_STOP_WAIT), ROLLOUT_STOP_WAIT + step)
        await _shutdown_step("publisher", publisher.stop(), step)
        await _shutdown_step("grpc_clients", clients.close(), step)
        await _shutdown_step("database", engine.dispose(), step)
        app[password_hashing_key].close()
        _log.info("api_stopped")


def create_app(settings: ApiSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=CLIENT_MAX_SIZE)
    app[settings_key] = settings
    app[metrics_key] = ApiMetrics()
    app[compiled_cache_key] = CompiledCache()
    app[readiness_key] = bootstrap.Readiness()
    app[password_hashing_key] = PasswordHashing(
        settings.password_hash_threads, settings.password_hash_queue
    )
    app[login_limiter_key] = LoginLimiter(
        max_failures=settings.login_max_failures,
        window=settings.login_window_seconds,
        max_failures_per_client=settings.login_max_failures_per_client,
        max_keys=settings.login_max_keys,
    )
    endpoints = all_endpoints()
    app[system_handlers.openapi_key] = build_openapi(endpoints, system_handlers.API_VERSION)
    add_routes(app, endpoints)
    app.cleanup_ctx.append(_resources)
    return app
