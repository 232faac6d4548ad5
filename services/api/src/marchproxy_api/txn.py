"""The write path: one transaction that changes rows, writes the audit log, bumps
config_version, compiles and stores the snapshots that changed, and — after the commit — hands
them to the publisher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from .db.models import AuditLog, RegistrationEvent
from .keys import compiled_cache_key, metrics_key, publisher_key, sessionmaker_key
from .repos import state as state_repo
from .schemas import COMPONENTS
from .snapshots import SnapshotCompiler, content_of, stamp_text

_log = structlog.get_logger("marchproxy.api.state")


@dataclass
class Tx:
    session: AsyncSession
    actor: str
    config: bool = True
    force_publish: bool = False
    audits: list[dict[str, Any]] = field(default_factory=list)
    version: int | None = None
    changed: dict[str, tuple[int, str]] = field(default_factory=dict)

    def audit(
        self,
        action: str,
        resource_type: str,
        resource_id: object,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        self.audits.append(
            {
                "action": action,
                "resource_type": resource_type,
                "resource_id": str(resource_id),
                "before": before,
                "after": after,
            }
        )

    def registration(
        self, module_name: str, event: str, *, instance_id: str = "", **details: Any
    ) -> None:
        self.session.add(
            RegistrationEvent(
                module_name=module_name, event=event, instance_id=instance_id, details=details
            )
        )


class CompiledCache:
    """Source rows, the per-route JSON of the compiler, and the content of the last snapshot
    stored per component (by version), so change detection does not re-read large snapshot
    bodies from the database."""

    def __init__(self) -> None:
        self.sources = state_repo.SourceCache()
        self.compiler = SnapshotCompiler()
        self.content: dict[str, tuple[int, str]] = {}


async def compile_and_store(
    session: AsyncSession,
    version: int,
    force: bool,
    cache: CompiledCache,
    touched: state_repo.Touched | None = None,
) -> dict[str, tuple[int, str]]:
    """Compile every component from the (cached) sources, store the ones whose content
    changed under ``version``; ``touched`` names the rows this transaction wrote."""
    sources, versions = await cache.sources.load_for_write(session, touched)
    texts = cache.compiler.compile(sources)
    changed: dict[str, tuple[int, str]] = {}
    for comp, text in texts.items():
        if not force and comp in versions:
            cached = cache.content.get(comp)
            if cached is None or cached[0] != versions[comp]:
                row = await state_repo.snapshot(session, comp)
                cached = (versions[comp], content_of(row.body) if row else "")
                cache.content[comp] = cached
            if cached[1] == text:
                continue
        cache.content[comp] = (version, text)
        changed[comp] = (version, stamp_text(text, version))
    if changed:
        await state_repo.put_snapshots(
            session, [(c, v, body) for c, (v, body) in changed.items()], set(versions)
        )
    return changed


@asynccontextmanager
async def write_tx(
    app: web.Application, actor: str, *, config: bool = True, force_publish: bool = False
) -> AsyncIterator[Tx]:
    async with app[sessionmaker_key]() as session, session.begin():
        tx = Tx(session=session, actor=actor, config=config, force_publish=force_publish)
        touched = state_repo.track_writes(session) if config else None
        if config:
            # First statement: bumping config_version takes its row lock (on SQLite the write
            # lock), so config writes are serialised from here to the commit and every check
            # made inside the transaction (route conflicts, unique names) sees all the writes
            # committed before it.
            tx.version = await state_repo.bump_version(session)
        yield tx
        await session.flush()
        if tx.config and tx.version is not None:
            tx.changed = await compile_and_store(
                session, tx.version, tx.force_publish, app[compiled_cache_key], touched
            )
        for a in tx.audits:
            session.add(AuditLog(actor=actor, config_version=tx.version, **a))
    if tx.version is not None:
        app[metrics_key].config_version.set(tx.version)
    if tx.changed:
        app[publisher_key].submit(tx.changed)


#: how often each API replica looks for snapshots stored by other replicas (seconds)
STORED_VERSION_POLL = 1.0


async def watch_stored_versions(app: web.Application) -> None:
    """One query per second for every long-poller: pick up snapshots other replicas stored."""
    publisher = app[publisher_key]
    while True:
        await asyncio.sleep(STORED_VERSION_POLL)
        try:
            async with app[sessionmaker_key]() as session:
                versions = await state_repo.stored_versions(session)
                newer = {}
                for comp, version in versions.items():
                    if version > publisher.version_of(comp):
                        row = await state_repo.snapshot(session, comp)
                        if row is not None:
                            newer[comp] = (row.version, row.body)
        except (SQLAlchemyError, OSError) as exc:
            _log.debug("stored_version_poll_failed", error=str(exc)[:200])
            continue
        if newer:
            publisher.submit(newer)


async def republish_all(app: web.Application) -> int:
    """At start: compile from Postgres if nothing is stored yet, then queue every snapshot."""
    async with app[sessionmaker_key]() as session, session.begin():
        stored = await state_repo.snapshots(session)
        version = await state_repo.current_version(session)
        if len(stored) < len(COMPONENTS):
            version = await state_repo.bump_version(session)
            await compile_and_store(session, version, True, app[compiled_cache_key])
            stored = await state_repo.snapshots(session)
        snaps = {comp: (row.version, row.body) for comp, row in stored.items()}
    app[metrics_key].config_version.set(version)
    app[publisher_key].submit(snaps)
    return version
