"""Start-up work that needs the database: migrations, the first admin, republishing every
snapshot. With Postgres down at start the process stays up: this runs again in the background
with back-off, and until it has succeeded the API answers 503 (``/readyz`` included)."""

from __future__ import annotations

import asyncio
import secrets
import sys
from dataclasses import dataclass

import structlog
from aiohttp import web

from .db.session import migrate
from .keys import (
    engine_key,
    password_hashing_key,
    readiness_key,
    sessionmaker_key,
    settings_key,
)
from .repos.entities import UserRepo
from .txn import republish_all, watch_stored_versions, write_tx

_log = structlog.get_logger("marchproxy.api")
#: back-off between start-up attempts (seconds); the maximum comes from the settings
RETRY_FIRST = 0.2
#: one start-up attempt may take this long before it counts as failed (seconds)
ATTEMPT_TIMEOUT = 30.0


@dataclass
class Readiness:
    ready: bool = False
    reason: str = "starting"
    attempts: int = 0


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


async def start_once(app: web.Application) -> int:
    """One attempt: migrate, create the admin, republish; the config_version on success."""
    if app[settings_key].run_migrations:
        await migrate(app[engine_key])
    await ensure_admin(app)
    return await republish_all(app)


async def try_start(app: web.Application) -> bool:
    readiness = app[readiness_key]
    readiness.attempts += 1
    try:
        async with asyncio.timeout(ATTEMPT_TIMEOUT):
            version = await start_once(app)
    except Exception as exc:  # any failure here is retried; the process must stay up
        readiness.reason = f"{type(exc).__name__}: {exc}"[:300]
        _log.warning("api_start_failed", attempt=readiness.attempts, error=readiness.reason)
        return False
    readiness.ready, readiness.reason = True, ""
    _log.info("api_started", config_version=version, database=app[engine_key].dialect.name)
    return True


async def run_background(app: web.Application) -> None:
    """Retry start-up with back-off until it succeeds, then watch other replicas' snapshots."""
    delay = RETRY_FIRST
    limit = app[settings_key].start_retry_max
    while not app[readiness_key].ready:
        await asyncio.sleep(delay)
        delay = min(delay * 2, limit)
        await try_start(app)
    await watch_stored_versions(app)
