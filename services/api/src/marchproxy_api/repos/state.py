"""SQL for desired state: the config_version row, stored snapshots, data-plane acks, metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from marchproxy_api.db.models import (
    ConfigState,
    Deployment,
    Listener,
    Module,
    ModuleRoute,
    RateLimit,
    RouteMetric,
    ScalingPolicy,
    Service,
    StateAck,
    StateSnapshot,
    utcnow,
)

CONFIG_ROW = 1


async def bump_version(session: AsyncSession) -> int:
    """Increment config_version in the caller's transaction (row lock serialises writers)."""
    stmt = (
        update(ConfigState)
        .where(ConfigState.id == CONFIG_ROW)
        .values(version=ConfigState.version + 1)
        .returning(ConfigState.version)
    )
    return int((await session.execute(stmt)).scalar_one())


async def current_version(session: AsyncSession) -> int:
    row = await session.get(ConfigState, CONFIG_ROW)
    return row.version if row else 0


SOURCE_TABLES: dict[str, Any] = {
    "modules": Module,
    "routes": ModuleRoute,
    "policies": ScalingPolicy,
    "deployments": Deployment,
    "listeners": Listener,
    "rate_limits": RateLimit,
    "services": Service,
}
#: ids fetched per IN (...) query when refreshing the cache
FETCH_CHUNK = 500


class SourceCache:
    """Rows the snapshot compiler reads, cached per (table, id) and refreshed by ``updated_at``.

    A refresh reads only ``id, updated_at`` of each table and then fetches the rows that are new
    or changed, so a write against 1,000 routes re-reads one route, not 1,000 JSON documents.
    Rows come from Core (immutable ``Row`` objects), never ORM instances.
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[int, Any]] = {name: {} for name in SOURCE_TABLES}
        self._stamps: dict[str, dict[int, Any]] = {name: {} for name in SOURCE_TABLES}
        self._lock = asyncio.Lock()

    async def load(
        self, session: AsyncSession, names: tuple[str, ...] = tuple(SOURCE_TABLES)
    ) -> dict[str, list[Any]]:
        async with self._lock:
            return await self._load(session, names)

    async def _load(self, session: AsyncSession, names: tuple[str, ...]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for name in names:
            table = SOURCE_TABLES[name].__table__
            stamps = {
                int(i): u
                for i, u in (await session.execute(select(table.c.id, table.c.updated_at))).tuples()
            }
            rows, known = self._rows[name], self._stamps[name]
            stale = [i for i, u in stamps.items() if known.get(i) != u]
            for start in range(0, len(stale), FETCH_CHUNK):
                chunk = stale[start : start + FETCH_CHUNK]
                for row in (
                    await session.execute(select(table).where(table.c.id.in_(chunk)))
                ).all():
                    rows[row.id] = row
                    known[row.id] = row.updated_at
            for gone in set(rows) - set(stamps):
                rows.pop(gone, None)
                known.pop(gone, None)
            out[name] = [rows[i] for i in sorted(stamps)]
        return out


async def stored_versions(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(StateSnapshot.component, StateSnapshot.version))
    return {c: int(v) for c, v in rows.tuples()}


async def snapshots(session: AsyncSession) -> dict[str, StateSnapshot]:
    rows = await session.execute(select(StateSnapshot))
    return {s.component: s for s in rows.scalars()}


async def snapshot(session: AsyncSession, component: str) -> StateSnapshot | None:
    return await session.get(StateSnapshot, component)


async def snapshot_version(session: AsyncSession, component: str) -> int:
    rows = await session.execute(
        select(StateSnapshot.version).where(StateSnapshot.component == component)
    )
    return int(rows.scalar_one_or_none() or 0)


async def put_snapshot(session: AsyncSession, component: str, version: int, body: str) -> None:
    """Upsert without reading the old body back (snapshots can be megabytes)."""
    result = await session.execute(
        update(StateSnapshot)
        .where(StateSnapshot.component == component)
        .values(version=version, body=body)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        session.add(StateSnapshot(component=component, version=version, body=body))
        await session.flush()


async def record_ack(
    session: AsyncSession,
    component: str,
    instance_id: str,
    applied: int,
    rejected: int,
    reason: str,
) -> tuple[StateAck, bool]:
    """Store an instance's ACK/NACK; also say whether the instance was seen for the first time."""
    row = await session.get(StateAck, (component, instance_id))
    new = row is None
    if row is None:
        row = StateAck(component=component, instance_id=instance_id)
        session.add(row)
    row.applied_version = applied
    row.rejected_version = rejected
    row.reason = reason
    row.updated_at = utcnow()
    await session.flush()
    return row, new


async def acks(session: AsyncSession) -> list[StateAck]:
    rows = await session.execute(
        select(StateAck).order_by(StateAck.component, StateAck.instance_id)
    )
    return list(rows.scalars())


async def record_route_metrics(
    session: AsyncSession, instance_id: str, module: str, routes: dict[str, dict[str, Any]]
) -> None:
    for name, counters in routes.items():
        row = await session.get(RouteMetric, (instance_id, name))
        if row is None:
            row = RouteMetric(instance_id=instance_id, route=name)
            session.add(row)
        row.module = module
        row.call_count = int(counters["call_count"])
        row.error_count = int(counters["error_count"])
        row.total_duration_ms = float(counters["total_duration_ms"])
        row.updated_at = utcnow()
    await session.flush()


async def route_metrics(session: AsyncSession) -> list[RouteMetric]:
    rows = await session.execute(select(RouteMetric))
    return list(rows.scalars())
