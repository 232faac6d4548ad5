"""Promote and rollback of one module never interleave: a per-module lock that holds across
API replicas (a Postgres advisory lock on a connection of its own) and inside one process (an
asyncio lock; the only lock on SQLite), and the incremental rollouts that run as owned
background tasks, so a long rollout outlives the HTTP request that started it."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from marchproxy_common.tasks import cancel_and_wait, spawn

_log = structlog.get_logger("marchproxy.api.rollouts")
#: pg_advisory_lock(classid, objid) namespace of module rollouts ("MP")
LOCK_NAMESPACE = 0x4D50
#: how often a busy advisory lock is tried again while waiting for it (seconds)
LOCK_POLL = 0.05


class ModuleBusy(Exception):
    """Another promote or rollback of the module holds its lock."""


class ModuleLock:
    """A held per-module lock; :meth:`release` exactly once."""

    def __init__(self, local: asyncio.Lock, conn: AsyncConnection | None, module_id: int):
        self._local = local
        self._conn = conn
        self._held = True
        self.module_id = module_id

    async def release(self) -> None:
        if not self._held:
            return
        self._held = False
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                try:
                    await conn.execute(
                        select(func.pg_advisory_unlock(LOCK_NAMESPACE, self.module_id))
                    )
                    await conn.close()
                except (SQLAlchemyError, OSError):
                    # a broken connection released the lock with its session; never pool it
                    await conn.invalidate()
        finally:
            self._local.release()


class ModuleLocks:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._distributed = engine.dialect.name == "postgresql"
        self._local: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    def _local_lock(self, module_id: int) -> asyncio.Lock:
        lock = self._local.get(module_id)
        if lock is None:
            lock = self._local[module_id] = asyncio.Lock()
        return lock

    async def acquire(self, module_id: int, wait: float) -> ModuleLock:
        """The module's lock, waiting up to ``wait`` seconds; :class:`ModuleBusy` if not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        local = self._local_lock(module_id)
        try:
            async with asyncio.timeout(wait):
                await local.acquire()
        except TimeoutError:
            raise ModuleBusy from None
        if not self._distributed:
            return ModuleLock(local, None, module_id)
        conn: AsyncConnection | None = None
        try:
            conn = await self._engine.connect()
            # autocommit: holding the lock must not hold a transaction open
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            stmt = select(func.pg_try_advisory_lock(LOCK_NAMESPACE, module_id))
            while not (await conn.execute(stmt)).scalar():
                if loop.time() >= deadline:
                    raise ModuleBusy
                await asyncio.sleep(LOCK_POLL)
        except BaseException:
            if conn is not None:
                await conn.close()
            local.release()
            raise
        return ModuleLock(local, conn, module_id)


@dataclass
class Rollout:
    module_id: int
    deployment_id: int
    task: asyncio.Task[Any]
    abort: asyncio.Event = field(default_factory=asyncio.Event)


class Rollouts:
    """Incremental rollouts running in this process, one per module at most."""

    def __init__(self) -> None:
        self.running: dict[int, Rollout] = {}

    def start(
        self,
        module_id: int,
        deployment_id: int,
        run: Callable[[asyncio.Event], Coroutine[Any, Any, Any]],
    ) -> Rollout:
        abort = asyncio.Event()
        task = spawn(run(abort), name=f"rollout module={module_id} deployment={deployment_id}")
        rollout = Rollout(module_id, deployment_id, task, abort)
        self.running[module_id] = rollout
        task.add_done_callback(lambda _t: self._forget(rollout))
        return rollout

    def _forget(self, rollout: Rollout) -> None:
        if self.running.get(rollout.module_id) is rollout:
            del self.running[rollout.module_id]

    async def abort(self, module_id: int, wait: float) -> None:
        """Ask the module's rollout to stop at its next step and wait up to ``wait`` s."""
        rollout = self.running.get(module_id)
        if rollout is None:
            return
        rollout.abort.set()
        await asyncio.wait({rollout.task}, timeout=wait)

    async def stop(self, wait: float) -> None:
        """Shutdown: every rollout stops at its next step (its weights stay as they are)."""
        live = list(self.running.values())
        for rollout in live:
            rollout.abort.set()
            _log.warning(
                "rollout_interrupted_by_shutdown",
                module=rollout.module_id,
                deployment=rollout.deployment_id,
            )
        if live:
            await asyncio.wait({r.task for r in live}, timeout=wait)
        await cancel_and_wait(*(r.task for r in live))
