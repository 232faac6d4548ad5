"""SQL for desired state: the config_version row, stored snapshots, data-plane acks, metrics."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    cast,
    event,
    extract,
    func,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_MODEL_TABLE = {model: name for name, model in SOURCE_TABLES.items()}
#: table name -> ids of rows written in this transaction
Touched = dict[str, set[int]]


def track_writes(session: AsyncSession) -> Touched:
    """Record the source rows ``session`` inserts, updates or deletes (each flush), so the
    snapshot compile can refresh exactly those rows of the cache."""
    touched: Touched = {}

    def after_flush(sess: Session, _ctx: object) -> None:
        for obj in (*sess.new, *sess.dirty, *sess.deleted):
            name = _MODEL_TABLE.get(type(obj))
            if name is not None and obj.id is not None:
                touched.setdefault(name, set()).add(int(obj.id))

    event.listen(session.sync_session, "after_flush", after_flush)
    return touched


def _micros(stamp: datetime) -> int:
    if stamp.tzinfo is None:  # SQLite hands naive UTC back
        stamp = stamp.replace(tzinfo=UTC)
    return (stamp - _EPOCH) // _MICRO


class SourceCache:
    """Rows the snapshot compiler reads, cached per (table, id) and kept current by
    ``updated_at``; rows come from Core (immutable ``Row`` objects), never ORM instances.

    On Postgres one query per load fetches a fingerprint of every table, its row count and the
    sum of its ``updated_at`` in microseconds, which the cache also keeps for what it holds. A
    table whose fingerprint matches is current; otherwise the rows the writing transaction
    touched are fetched by id, and only if the fingerprint still differs (someone else wrote:
    another replica, SQL behind the API's back, a cascade) does the cache diff ``id,
    updated_at`` of the whole table. So a write against 1,000 routes transfers one route, not
    1,000 stamps. SQLite (embedded mode) always diffs.
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[int, Any]] = {name: {} for name in SOURCE_TABLES}
        self._sums: dict[str, int] = dict.fromkeys(SOURCE_TABLES, 0)
        self._lists: dict[str, list[Any] | None] = dict.fromkeys(SOURCE_TABLES)
        self._lock = asyncio.Lock()
        #: full table diffs done (observability, tests)
        self.full_scans = 0

    async def load(
        self, session: AsyncSession, names: tuple[str, ...] = tuple(SOURCE_TABLES)
    ) -> dict[str, list[Any]]:
        async with self._lock:
            prints, _ = await self._freshness(session, names, with_versions=False)
            return await self._refresh(session, names, prints, None)

    async def load_for_write(
        self, session: AsyncSession, touched: Touched | None
    ) -> tuple[dict[str, list[Any]], dict[str, int]]:
        """Every source table, current, plus the stored snapshot versions (one round trip on
        Postgres when nothing but ``touched`` changed)."""
        names = tuple(SOURCE_TABLES)
        async with self._lock:
            prints, versions = await self._freshness(session, names, with_versions=True)
            sources = await self._refresh(session, names, prints, touched)
        if versions is None:
            versions = await stored_versions(session)
        return sources, versions

    async def _refresh(
        self,
        session: AsyncSession,
        names: tuple[str, ...],
        prints: dict[str, tuple[int, int]] | None,
        touched: Touched | None,
    ) -> dict[str, list[Any]]:
        for name in names:
            if prints is not None and prints[name] == self._fingerprint(name):
                continue
            ids = (touched or {}).get(name)
            if prints is not None and ids:
                await self._fetch(session, name, sorted(ids), drop_missing=True)
                if prints[name] == self._fingerprint(name):
                    continue
            await self._diff(session, name)
        return {name: self._list(name) for name in names}

    def _fingerprint(self, name: str) -> tuple[int, int]:
        return len(self._rows[name]), self._sums[name]

    async def _freshness(
        self, session: AsyncSession, names: tuple[str, ...], *, with_versions: bool
    ) -> tuple[dict[str, tuple[int, int]] | None, dict[str, int] | None]:
        """Postgres: (table -> fingerprint, component -> stored snapshot version) in one query;
        (None, None) elsewhere."""
        if session.get_bind().dialect.name != "postgresql":
            return None, None
        parts = []
        for name in names:
            table = SOURCE_TABLES[name].__table__
            micros = cast(extract("epoch", table.c.updated_at) * 1_000_000, BigInteger)
            parts.append(
                select(
                    literal(name).label("t"),
                    func.count().label("n"),
                    func.coalesce(func.sum(micros), 0).label("s"),
                ).select_from(table)
            )
        if with_versions:
            parts.append(
                select(
                    (literal("@") + StateSnapshot.component).label("t"),
                    StateSnapshot.version.label("n"),
                    literal(0).label("s"),
                )
            )
        prints: dict[str, tuple[int, int]] = {}
        versions: dict[str, int] = {}
        for t, n, total in (await session.execute(union_all(*parts))).tuples():
            if t.startswith("@"):
                versions[t[1:]] = int(n)
            else:
                prints[t] = (int(n), int(total))
        return prints, versions if with_versions else None

    def _put(self, name: str, row: Any) -> None:
        rows = self._rows[name]
        old = rows.get(row.id)
        if old is not None:
            self._sums[name] -= _micros(old.updated_at)
        rows[row.id] = row
        self._sums[name] += _micros(row.updated_at)
        self._lists[name] = None

    def _drop(self, name: str, ident: int) -> None:
        old = self._rows[name].pop(ident, None)
        if old is not None:
            self._sums[name] -= _micros(old.updated_at)
            self._lists[name] = None

    async def _fetch(
        self, session: AsyncSession, name: str, ids: list[int], *, drop_missing: bool
    ) -> None:
        table = SOURCE_TABLES[name].__table__
        for start in range(0, len(ids), FETCH_CHUNK):
            chunk = ids[start : start + FETCH_CHUNK]
            found = set()
            for row in (await session.execute(select(table).where(table.c.id.in_(chunk)))).all():
                self._put(name, row)
                found.add(row.id)
            if drop_missing:
                for ident in set(chunk) - found:
                    self._drop(name, ident)

    async def _diff(self, session: AsyncSession, name: str) -> None:
        self.full_scans += 1
        table = SOURCE_TABLES[name].__table__
        stamps = {
            int(i): u
            for i, u in (await session.execute(select(table.c.id, table.c.updated_at))).tuples()
        }
        rows = self._rows[name]
        for gone in set(rows) - set(stamps):
            self._drop(name, gone)
        stale = [i for i, u in stamps.items() if i not in rows or rows[i].updated_at != u]
        await self._fetch(session, name, stale, drop_missing=False)

    def _list(self, name: str) -> list[Any]:
        cached = self._lists[name]
        if cached is None:
            rows = self._rows[name]
            cached = self._lists[name] = [rows[i] for i in sorted(rows)]
        return cached


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


async def put_snapshots(
    session: AsyncSession, snapshots: list[tuple[str, int, str]], existing: set[str]
) -> None:
    """Write ``(component, version, body)`` rows: one executemany UPDATE for the components in
    ``existing`` and INSERTs for the others, never reading old bodies back (they can be MBs)."""
    updates = [{"component": c, "version": v, "body": b} for c, v, b in snapshots if c in existing]
    if updates:
        await session.execute(
            update(StateSnapshot).execution_options(synchronize_session=False), updates
        )
    for c, v, b in snapshots:
        if c not in existing:
            session.add(StateSnapshot(component=c, version=v, body=b))
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
