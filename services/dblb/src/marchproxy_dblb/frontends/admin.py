"""PgBouncer-style admin console: psql -d pgbouncer (or marchproxy), simple queries only.

Commands run one at a time in the order they arrived (a PAUSE waits for active servers; with
several workers every command but SHOW DATABASES/VERSION/HELP asks the other workers too).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from marchproxy_common.tasks import spawn
from marchproxy_common.wire.postgres import Message, RemoteProtocolError
from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_common.wire.postgres.decoder import parse_query
from marchproxy_common.wire.postgres.encoder import INT8_OID, TEXT_OID
from marchproxy_common.wire.postgres.messages import F_QUERY, F_SYNC, F_TERMINATE

if TYPE_CHECKING:
    from marchproxy_dblb.frontends.postgres import PostgresClient
    from marchproxy_dblb.module import DblbHooks

_log = structlog.get_logger("marchproxy.dblb.admin")
#: How long PAUSE waits for active servers to be released before it reports failure.
PAUSE_TIMEOUT = 30.0
#: Commands an admin client may send ahead before it is disconnected.
MAX_PENDING_COMMANDS = 64

Row = Sequence[str | int | float | None]
Columns = list[tuple[str, int]]


def _table(columns: Sequence[tuple[str, int]], rows: Sequence[Row], tag: str) -> bytes:
    out = [enc.row_description(columns)]
    for row in rows:
        out.append(enc.data_row([None if v is None else str(v) for v in row]))
    out.append(enc.command_complete(f"{tag} {len(rows)}" if tag == "SELECT" else tag))
    return b"".join(out)


# ---- the rows of one process (a worker answers SHOW with these) ------------------------------

POOLS_COLUMNS: Columns = [
    ("database", TEXT_OID),
    ("user", TEXT_OID),
    ("cl_active", INT8_OID),
    ("cl_waiting", INT8_OID),
    ("sv_active", INT8_OID),
    ("sv_idle", INT8_OID),
    ("sv_used", INT8_OID),
    ("sv_login", INT8_OID),
    ("maxwait", INT8_OID),
    ("pool_mode", TEXT_OID),
    ("pool_size", INT8_OID),
    ("role", TEXT_OID),
]


def _pool_rows(hooks: DblbHooks) -> list[Row]:
    now = time.monotonic()
    rows: list[Row] = []
    for p in hooks.manager.all_pools():
        c = p.counts()
        maxwait = int(now - p.waiters[0].since) if p.waiters else 0
        rows.append(
            [
                p.database,
                p.user,
                c["cl_active"],
                c["cl_waiting"],
                c["sv_active"],
                c["sv_idle"],
                c["sv_used"],
                c["sv_login"],
                maxwait,
                p.mode,
                p.size,
                p.role,
            ]
        )
    for m in hooks.mysql_pool_rows():
        rows.append(
            [
                m["database"],
                m["user"],
                m["cl_active"],
                m["cl_waiting"],
                m["sv_active"],
                m["sv_idle"],
                m["sv_used"],
                m["sv_login"],
                int(m["maxwait"]),
                "session",
                hooks.mysql_pool_size,
                "mysql",
            ]
        )
    return rows


_STATS_NAMES = [
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_wait_count",
]
STATS_COLUMNS: Columns = [
    ("database", TEXT_OID),
    ("user", TEXT_OID),
    *[(n, INT8_OID) for n in _STATS_NAMES],
    ("role", TEXT_OID),
]


def _stats_rows(hooks: DblbHooks) -> list[Row]:
    pools = [(p.database, p.user, p.stats, p.role) for p in hooks.manager.all_pools()]
    pools += [(m["database"], m["user"], m["stats"], "mysql") for m in hooks.mysql_pool_rows()]
    return [  # replica and MySQL pools too, by role
        [
            database,
            user,
            s.xact_count,
            s.query_count,
            s.bytes_received,
            s.bytes_sent,
            int(s.xact_time * 1e6),
            int(s.query_time * 1e6),
            int(s.wait_time * 1e6),
            s.wait_count,
            role,
        ]
        for database, user, s, role in pools
    ]


CLIENTS_COLUMNS: Columns = [
    ("type", TEXT_OID),
    ("user", TEXT_OID),
    ("database", TEXT_OID),
    ("state", TEXT_OID),
    ("addr", TEXT_OID),
    ("port", INT8_OID),
    ("connect_time", TEXT_OID),
    ("pid", INT8_OID),
    ("server_id", INT8_OID),
    ("worker", INT8_OID),
]


def _client_rows(hooks: DblbHooks) -> list[Row]:
    rows: list[Row] = []
    for c in list(hooks.manager.clients.values()):
        state = "active" if c.server is not None else ("waiting" if c.waiting else "idle")
        rows.append(
            [
                "C",
                c.user,
                c.database,
                state,
                c.addr[0],
                c.addr[1],
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.connected_at)),
                c.backend_key[0],
                c.server.id if c.server is not None else None,
                hooks.worker_index,
            ]
        )
    return rows


SERVERS_COLUMNS: Columns = [
    ("type", TEXT_OID),
    ("id", INT8_OID),
    ("user", TEXT_OID),
    ("database", TEXT_OID),
    ("state", TEXT_OID),
    ("addr", TEXT_OID),
    ("port", INT8_OID),
    ("age_seconds", INT8_OID),
    ("backend_pid", INT8_OID),
    ("prepared_statements", INT8_OID),
    ("client_pid", INT8_OID),
    ("worker", INT8_OID),
]


def _server_rows(hooks: DblbHooks) -> list[Row]:
    now = time.monotonic()
    rows: list[Row] = []
    for p in hooks.manager.all_pools():
        for s in list(p.servers):
            rows.append(
                [
                    "S",
                    s.id,
                    p.server_user,
                    p.dbname,
                    s.state,
                    p.host,
                    p.port,
                    int(now - s.created_at),
                    s.backend_pid,
                    len(s.prepared),
                    s.client.backend_key[0] if s.client is not None else None,
                    hooks.worker_index,
                ]
            )
    return rows


class _Show:
    """One cluster-wide SHOW: its columns, one process's rows, and how the workers' rows
    combine: rows with equal ``key`` columns are summed (``maxima``: the largest is kept), or,
    with no key, listed one after the other."""

    def __init__(
        self,
        columns: Columns,
        rows: Callable[[DblbHooks], list[Row]],
        key: tuple[str, ...] = (),
        maxima: tuple[str, ...] = (),
    ) -> None:
        names = [name for name, _ in columns]
        self.columns, self.rows = columns, rows
        self.key = [names.index(k) for k in key]
        self.maxima = {names.index(m) for m in maxima}

    def combine(self, rows: list[list[Any]]) -> list[list[Any]]:
        if not self.key:
            return rows
        merged: dict[tuple[Any, ...], list[Any]] = {}
        for row in rows:
            k = tuple(row[i] for i in self.key)
            into = merged.get(k)
            if into is None:
                merged[k] = list(row)
                continue
            for i, v in enumerate(row):
                if i not in self.key:
                    into[i] = max(into[i], v) if i in self.maxima else into[i] + v
        return list(merged.values())


SHOWS = {
    "POOLS": _Show(
        POOLS_COLUMNS,
        _pool_rows,
        key=("database", "user", "pool_mode", "role"),
        maxima=("maxwait",),
    ),
    "STATS": _Show(STATS_COLUMNS, _stats_rows, key=("database", "user", "role")),
    "CLIENTS": _Show(CLIENTS_COLUMNS, _client_rows),
    "SERVERS": _Show(SERVERS_COLUMNS, _server_rows),
}


def show_rows(hooks: DblbHooks, what: str) -> list[Row] | None:
    """This process's rows of ``SHOW what`` (None: not a SHOW the workers answer)."""
    show = SHOWS.get(what)
    return show.rows(hooks) if show is not None else None


class AdminConsole:
    def __init__(self, client: PostgresClient) -> None:
        self.client = client
        self.manager = client.manager
        self._pending: deque[Message] = deque()
        self._runner: Any = None

    def on_message(self, m: Message) -> None:
        if len(self._pending) >= MAX_PENDING_COMMANDS:
            self.client.fail("54000", f"more than {MAX_PENDING_COMMANDS} admin commands queued")
            return
        self._pending.append(m)
        if self._runner is None:
            self._runner = spawn(self._run_pending(), name=f"dblb admin {self.client.id}")

    async def _run_pending(self) -> None:
        try:
            while self._pending:
                if self.client.transport is None or self.client.transport.is_closing():
                    self._pending.clear()
                    break
                await self._handle(self._pending.popleft())
        finally:
            self._runner = None

    async def _handle(self, m: Message) -> None:
        if m.type == F_TERMINATE:
            if self.client.transport is not None:
                self.client.transport.close()
            return
        if m.type == F_SYNC:
            self.client.write(enc.ready_for_query())
            return
        if m.type != F_QUERY:
            self.client.write(
                enc.error_response("08P01", "admin console supports the simple query protocol only")
                + enc.ready_for_query()
            )
            return
        sql = parse_query(m.body).strip().rstrip(";").strip()
        try:
            body = await self._run(sql.split())
        except RemoteProtocolError as exc:
            body = enc.error_response(exc.sqlstate, exc.message)
        self.client.write(body + enc.ready_for_query())

    def _check_may_change(self, command: str) -> None:
        """PAUSE, RESUME and RELOAD are for ``admin_users`` only (SHOW is for everyone here)."""
        if self.client.user not in self.manager.config.admin_users:
            raise RemoteProtocolError(
                f'{command} is not allowed for user "{self.client.user}": '
                "only users listed in admin_users may change the pooler",
                sqlstate="42501",
            )

    def _database_arg(self, words: list[str]) -> str | None:
        """``PAUSE``/``RESUME`` with an optional database name (as the client connects to)."""
        if len(words) == 1:
            return None
        if len(words) != 2:
            raise RemoteProtocolError(f"usage: {words[0].upper()} [database]", sqlstate="42601")
        name = words[1].strip('"')
        known = name in self.manager.config.databases or any(
            p.database == name for p in self.manager.every_pool()
        )
        if not known:
            raise RemoteProtocolError(f'no such database: "{name}"', sqlstate="3D000")
        return name

    async def _run(self, words: list[str]) -> bytes:
        if not words:
            return enc.empty_query_response()
        cmd = words[0].upper()
        if cmd in ("PAUSE", "RESUME"):
            self._check_may_change(cmd)
            return await self._pause_or_resume(cmd, self._database_arg(words))
        if cmd == "RELOAD" and len(words) == 1:
            self._check_may_change("RELOAD")
            errors = await self.client.hooks.reload()
            if errors:
                raise RemoteProtocolError("RELOAD failed: " + "; ".join(errors), sqlstate="55000")
            return enc.command_complete("RELOAD")
        words = [w.upper() for w in words]
        if cmd == "SHOW" and len(words) == 2:
            what = words[1]
            if what in SHOWS:
                return await self._show(what)
            local = {
                "DATABASES": self._databases,
                "VERSION": self._version,
                "HELP": self._help,
            }.get(what)
            if local is not None:
                return local()
        raise RemoteProtocolError(f"unsupported admin command: {' '.join(words)}", sqlstate="42601")

    async def _pause_or_resume(self, command: str, database: str | None) -> bytes:
        """PAUSE/RESUME on every worker process (one, unless WORKERS > 1)."""
        answers = await self.client.hooks.admin_everywhere(
            {"command": command, "database": database}
        )
        if all(a is not None and a.get("ok") is True for a in answers):
            return enc.command_complete(command)
        if command == "PAUSE":
            return enc.error_response("57014", "PAUSE timed out waiting for active servers")
        return enc.error_response("58000", "RESUME did not reach every worker")

    async def _show(self, what: str) -> bytes:
        """SHOW POOLS/STATS/CLIENTS/SERVERS over every worker process."""
        show = SHOWS[what]
        answers = await self.client.hooks.admin_everywhere({"command": "SHOW", "what": what})
        rows: list[list[Any]] = []
        missing: list[int] = []
        for index, answer in enumerate(answers):
            part = answer.get("rows") if answer is not None else None
            if isinstance(part, list):
                rows += part
            else:
                missing.append(index)
        body = _table(show.columns, show.combine(rows), "SHOW")
        if missing:
            workers = ", ".join(map(str, missing))
            body = (
                enc.notice_response(f"no answer from worker(s) {workers}: their rows are missing")
                + body
            )
        return body

    def _databases(self) -> bytes:
        cols = [
            ("name", TEXT_OID),
            ("host", TEXT_OID),
            ("port", INT8_OID),
            ("database", TEXT_OID),
            ("pool_mode", TEXT_OID),
            ("pool_size", INT8_OID),
        ]
        cfg = self.manager.config
        rows: list[Row] = [
            [
                alias,
                db.host,
                db.port,
                db.dbname or alias,
                db.pool_mode or cfg.pool_mode,
                db.pool_size or cfg.default_pool_size,
            ]
            for alias, db in cfg.databases.items()
        ]
        return _table(cols, rows, "SHOW")

    def _version(self) -> bytes:
        return _table([("version", TEXT_OID)], [["MarchProxy DBLB 0.1.0"]], "SHOW")

    def _help(self) -> bytes:
        text = (
            "SHOW POOLS|STATS|CLIENTS|SERVERS|DATABASES|VERSION; "
            "PAUSE [db]; RESUME [db]; RELOAD (PAUSE, RESUME, RELOAD: admin_users only)"
        )
        return enc.notice_response(text) + enc.command_complete("SHOW")
