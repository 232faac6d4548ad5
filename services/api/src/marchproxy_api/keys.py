"""Typed application keys (aiohttp ``web.AppKey``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .config import ApiSettings
from .grpc_clients import ModuleClientManager
from .metrics import ApiMetrics
from .publisher import StatePublisher
from .security import LoginLimiter, PasswordHashing

if TYPE_CHECKING:
    from .bootstrap import Readiness
    from .rollouts import ModuleLocks, Rollouts
    from .txn import CompiledCache

settings_key = web.AppKey("settings", ApiSettings)
engine_key = web.AppKey("engine", AsyncEngine)
sessionmaker_key: web.AppKey[async_sessionmaker[AsyncSession]] = web.AppKey("sessionmaker")
publisher_key = web.AppKey("publisher", StatePublisher)
grpc_clients_key = web.AppKey("grpc_clients", ModuleClientManager)
metrics_key = web.AppKey("metrics", ApiMetrics)
login_limiter_key = web.AppKey("login_limiter", LoginLimiter)
password_hashing_key = web.AppKey("password_hashing", PasswordHashing)
compiled_cache_key: web.AppKey[CompiledCache] = web.AppKey("compiled_cache")
readiness_key: web.AppKey[Readiness] = web.AppKey("readiness")
module_locks_key: web.AppKey[ModuleLocks] = web.AppKey("module_locks")
rollouts_key: web.AppKey[Rollouts] = web.AppKey("rollouts")
