"""DBLB module hooks: the data plane (Postgres, MySQL) behind the shared module runtime."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import shutil
import ssl
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from marchproxy.v1 import types_pb2
from marchproxy_common.module.hooks import BaseModuleHooks, BoundAddress, LoadReport
from marchproxy_common.native import build_kind
from marchproxy_common.net.listener import stop_serving
from marchproxy_common.net.proxied import client_address, wrap_proxy_protocol
from marchproxy_common.net.sockets import (
    ClientListener,
    SocketPoller,
    new_poller,
    start_client_server,
)
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.postgres.auth import ScramVerifier

from . import pool as pool_module
from .config import DEFAULT_MODULE_ID, DblbConfig, DblbSettings, module_config_from_snapshot
from .frontends.admin import PAUSE_TIMEOUT
from .frontends.postgres import PostgresClient
from .metrics import DblbCollector
from .pool import PoolManager, send_cancel

if TYPE_CHECKING:
    from .workers import WorkerSupervisor

_log = structlog.get_logger("marchproxy.dblb")
#: Distinct prepared-statement texts remembered for pool-wide names before starting over.
MAX_STATEMENT_NAMES = 100_000
#: Upper bound on drain polls (50 ms each): one hour.
DRAIN_POLL_LIMIT = 72_000


def _tls_context(config: DblbConfig) -> ssl.SSLContext | None:
    if config.client_tls_mode == "disable":
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.client_tls_cert, config.client_tls_key)
    return ctx


class DblbHooks(BaseModuleHooks):
    module_type = types_pb2.MODULE_TYPE_DBLB
    protocols = (types_pb2.PROTOCOL_POSTGRESQL, types_pb2.PROTOCOL_MYSQL)
    default_module_id = DEFAULT_MODULE_ID

    def __init__(
        self,
        settings: DblbSettings,
        config: DblbConfig | None = None,
        *,
        worker_index: int = 0,
        peer_dir: str = "",
    ) -> None:
        self.settings = settings
        self.module_id = settings.module_id or DEFAULT_MODULE_ID
        self.config = config or DblbConfig()
        self.manager = PoolManager(
            self.config, worker_index=worker_index, worker_count=settings.workers
        )
        #: several workers: this one's index, the directory of their cancel sockets
        self.worker_index = worker_index
        self.peer_dir = peer_dir
        self._own_peer_dir = False
        self._peer_server: asyncio.AbstractServer | None = None
        #: the other workers' processes (main process, ``workers`` > 1)
        self.supervisor: WorkerSupervisor | None = None
        self._supervisor_seq = 0
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(DblbCollector(self))
        self.total_connections = 0
        self.protocol_errors = 0
        self.auth_failures = 0
        self.cancels_forwarded = 0
        self._server: ClientListener | asyncio.Server | None = None
        #: the epoll our client sockets wait on (None: asyncio's own transports, e.g. uvloop)
        self._poller: SocketPoller | None = None
        self._mysql: Any = None
        self._statement_names: dict[bytes, bytes] = {}
        self._unique_names = itertools.count(1)
        self._verifiers: dict[tuple[str, str], ScramVerifier] = {}
        self.mysql_address: BoundAddress | None = None
        self.client_tls: ssl.SSLContext | None = None
        self._last_snapshot: Mapping[str, Any] | None = None

    # ---- hooks ------------------------------------------------------------------------------

    def extra_addresses(self) -> dict[int, BoundAddress]:
        """The MySQL listener, so the NLB sends MySQL connections there (not to PostgreSQL's)."""
        if self.mysql_address is None:
            return {}
        return {types_pb2.PROTOCOL_MYSQL: self.mysql_address}

    async def start_data_plane(self) -> BoundAddress:
        factory: Any = lambda: PostgresClient(self)  # noqa: E731
        if self.settings.proxy_protocol != "off":
            factory = wrap_proxy_protocol(
                factory,
                mode=self.settings.proxy_protocol,
                trusted_sources=self.settings.proxy_trusted_networks(),
            )
        workers = self.settings.workers
        self._poller = self.manager.poller = new_poller()
        self._server = await start_client_server(
            factory,
            self.settings.data_host,
            self.settings.data_port,
            backlog=1024,
            reuse_port=workers > 1,
            poller=self._poller,
            name="postgresql",
            # one connection per wake-up: Postgres clients connect one at a time (libpq blocks
            # on each login step), and a batch ends in a raised BlockingIOError (net.accept)
            accept_batch=1,
        )
        self.manager.start()
        if workers > 1:
            await self._start_workers()
        if self.settings.mysql_port >= 0:
            from .frontends.mysql import MysqlFrontend

            self._mysql = MysqlFrontend(self)
            self.mysql_address = await self._mysql.start(
                self.settings.data_host, self.settings.mysql_port
            )
        host, port = self._server.sockets[0].getsockname()[:2]
        _log.info("dblb_listening", host=host, port=port, build=build_kind(pool_module))
        return BoundAddress(host, port)

    async def _start_workers(self) -> None:
        """SO_REUSEPORT workers: our cancel socket, then (main process) the other workers."""
        from . import workers as w

        assert self._server is not None
        if not self.peer_dir:
            self.peer_dir = tempfile.mkdtemp(prefix="marchproxy-dblb-")
            self._own_peer_dir = True
        own = w.peer_socket(self.peer_dir, self.worker_index)
        self._peer_server = await w.serve_peer(self, own)
        if self.worker_index == 0:
            host, port = self._server.sockets[0].getsockname()[:2]
            supervisor = w.WorkerSupervisor(self, host, port, self.settings.workers, self.peer_dir)
            try:
                await supervisor.start(self._last_snapshot)
            except BaseException:
                await self.close()  # our listener, cancel socket and directory
                raise
            self.supervisor = supervisor

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        errors = self.apply_snapshot(snapshot)
        if not errors and self.supervisor is not None:
            # the workers validate the same snapshot; wait until they all run it
            errors = await self.supervisor.wait_applied(self._supervisor_seq)
        return errors

    def apply_snapshot(self, snapshot: Mapping[str, Any]) -> list[str]:
        config, errors = module_config_from_snapshot(snapshot, self.module_id)
        if errors or config is None:
            return errors
        try:
            client_tls = _tls_context(config)
        except (OSError, ssl.SSLError) as exc:
            return [f"client TLS: {exc}"]
        self.client_tls = client_tls
        self.config = config
        self.manager.apply(config)
        if self._mysql is not None:
            self._mysql.apply(config)
        self._last_snapshot = snapshot
        if self.supervisor is not None:
            self._supervisor_seq = self.supervisor.broadcast(snapshot)
        return []

    def load(self) -> LoadReport:
        queries = sum(p.stats.query_count for p in self.manager.pools.values())
        rx = sum(p.stats.bytes_received for p in self.manager.pools.values())
        tx = sum(p.stats.bytes_sent for p in self.manager.pools.values())
        waiting = sum(len(p.waiters) for p in self.manager.pools.values())
        return LoadReport(
            active_connections=self.manager.client_count,
            total_connections=self.total_connections,
            requests_total=queries,
            errors_total=self.protocol_errors + self.auth_failures,
            bytes_in=tx,
            bytes_out=rx,
            custom={"waiting_clients": float(waiting), "pools": float(len(self.manager.pools))},
        )

    def routes(self) -> list[dict[str, Any]]:
        return [
            {
                "name": alias,
                "match_rules": {"database": alias},
                "backend_config": {
                    "target": f"postgresql://{db.host}:{db.port}/{db.dbname or alias}",
                    "pool_mode": db.pool_mode or self.config.pool_mode,
                },
            }
            for alias, db in self.config.databases.items()
        ]

    def status(self) -> dict[str, Any]:
        return {
            "build": build_kind(pool_module),  # compiled by mypyc in the image
            "pools": [
                {
                    "database": p.database,
                    "user": p.user,
                    "mode": p.mode,
                    "size": p.size,
                    **p.counts(),
                }
                for p in self.manager.pools.values()
            ],
            "clients": self.manager.client_count,
            "paused": self.manager.paused,
            "paused_databases": sorted(self.manager.paused_databases),
        }

    async def stop_accepting(self) -> None:
        if isinstance(self._server, ClientListener):
            self._server.close()  # nothing accepted is left without its protocol
        elif self._server is not None:
            await stop_serving(self._server)
        if self._mysql is not None:
            await self._mysql.stop_accepting()

    async def drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(DRAIN_POLL_LIMIT):
            if not self.manager.client_count or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        await self.stop_accepting()
        if self.supervisor is not None:
            await self.supervisor.stop()
        for client in list(self.manager.clients.values()):
            if client.transport is not None:
                client.transport.close()
        self.manager.close()
        if self._poller is not None:
            self._poller.close()  # once its last client socket is closed
        if self._mysql is not None:
            await self._mysql.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self._peer_server is not None:
            self._peer_server.close()
            await self._peer_server.wait_closed()
        if self._own_peer_dir:
            shutil.rmtree(self.peer_dir, ignore_errors=True)

    async def check_health(self, deep: bool) -> dict[str, str]:
        result = {"data_plane": "ok" if self._server is not None else "not started"}
        if deep:
            for alias, db in self.config.databases.items():
                try:
                    async with asyncio.timeout(3):
                        _, w = await asyncio.open_connection(db.host, db.port)
                        w.close()
                    result[f"db:{alias}"] = "ok"
                except (OSError, TimeoutError) as exc:
                    result[f"db:{alias}"] = f"unreachable: {exc}"
        return result

    # ---- helpers for the frontends ------------------------------------------------------------

    def cancel(self, pid: int, key: int) -> None:
        """A CancelRequest: ours, or (several workers) forwarded to the worker that owns it."""
        if pid in self.manager.clients or self.manager.worker_count == 1:
            self.cancel_local(pid, key)
            return
        from . import workers as w

        owner = w.worker_of(pid)
        if owner != self.worker_index and owner < self.manager.worker_count and self.peer_dir:
            spawn(
                w.forward_cancel(w.peer_socket(self.peer_dir, owner), pid, key),
                name=f"dblb cancel to worker {owner}",
            )

    async def admin_everywhere(self, command: Mapping[str, Any]) -> list[dict[str, Any] | None]:
        """An admin console command (:meth:`admin_local`) on this process and on every other
        worker: their answers in worker order, None for a worker that did not answer (PAUSE:
        within PAUSE_TIMEOUT)."""
        from . import workers as w

        wait = PAUSE_TIMEOUT + 5.0 if command.get("command") == "PAUSE" else w.PEER_ADMIN_TIMEOUT

        async def on(index: int) -> dict[str, Any] | None:
            if index == self.worker_index:
                return await self.admin_local(command)
            return await w.admin_on_peer(w.peer_socket(self.peer_dir, index), command, wait)

        indexes = range(self.manager.worker_count) if self.peer_dir else [self.worker_index]
        return list(await asyncio.gather(*(on(i) for i in indexes)))

    async def admin_local(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """One admin command on this process: ``{"command": "PAUSE"|"RESUME", "database": name
        or None}``, ``{"command": "RELOAD"}`` or ``{"command": "SHOW", "what": "POOLS"}``;
        answers ``{"ok": bool}`` plus ``errors`` (RELOAD) or ``rows`` (SHOW)."""
        from .frontends.admin import show_rows

        database = command.get("database")
        if database is not None and not isinstance(database, str):
            return {"ok": False}
        match command.get("command"):
            case "PAUSE":
                return {"ok": await self.manager.pause(PAUSE_TIMEOUT, database)}
            case "RESUME":
                self.manager.resume(database)
                return {"ok": True}
            case "RELOAD":
                errors = await self.reload()
                return {"ok": not errors, "errors": errors}
            case "SHOW":
                rows = show_rows(self, str(command.get("what")))
                return {"ok": rows is not None, "rows": rows or []}
        return {"ok": False}

    def cancel_local(self, pid: int, key: int) -> None:
        target = self.manager.clients.get(pid)
        if target is None or not hmac.compare_digest(
            target.backend_key[1].to_bytes(4, "big", signed=True),
            key.to_bytes(4, "big", signed=True),
        ):
            return
        server = target.server
        if server is not None and server.backend_pid:
            self.cancels_forwarded += 1
            spawn(
                send_cancel(
                    server.pool.host, server.pool.port, server.backend_pid, server.backend_key
                ),
                name=f"dblb cancel for client {target.id}",
            )

    def local_pool_report(self) -> list[dict[str, Any]]:
        """This process's Postgres pools, in the form workers send to the main process."""
        return [
            {
                "labels": [p.database, p.user, p.mode, p.role],
                "counts": p.counts(),
                "size": p.size,
                "stats": dataclasses.asdict(p.stats),
            }
            for p in self.manager.all_pools()
        ]

    def pool_report(self) -> list[dict[str, Any]]:
        """Every pool for the metrics: ours, MySQL's and (several workers) theirs, summed by
        labels."""
        rows = self.local_pool_report()
        rows += [
            {
                "labels": [m["database"], m["user"], "session", "mysql"],
                "counts": _counts(m),
                "size": self.mysql_pool_size,
                "stats": dataclasses.asdict(m["stats"]),
            }
            for m in self.mysql_pool_rows()
        ]
        if self.supervisor is not None:
            rows += self.supervisor.worker_reports()
        merged: dict[tuple[str, ...], dict[str, Any]] = {}
        for row in rows:
            key = tuple(str(v) for v in row["labels"])
            into = merged.get(key)
            if into is None:
                merged[key] = {
                    "labels": list(key),
                    "counts": dict(row["counts"]),
                    "size": row["size"],
                    "stats": dict(row["stats"]),
                }
                continue
            into["size"] += row["size"]
            for part in ("counts", "stats"):
                for k, v in row[part].items():
                    into[part][k] = into[part].get(k, 0) + v
        return list(merged.values())

    def client_total(self) -> int:
        """Clients of both frontends (max_client_conn counts them together, as PgBouncer)."""
        mysql = len(self._mysql.clients) if self._mysql is not None else 0
        return self.manager.client_count + mysql

    def mysql_pool_rows(self) -> list[dict[str, Any]]:
        return self._mysql.pool_rows() if self._mysql is not None else []

    @property
    def mysql_pool_size(self) -> int:
        return self._mysql.config.pool_size if self._mysql is not None else 0

    def client_address(self, transport: asyncio.BaseTransport) -> tuple[str, int]:
        return client_address(transport)

    def statement_name(self, query: bytes, param_types: bytes) -> bytes:
        """Pool-wide server name for a prepared statement: the same text gets the same name."""
        key = param_types + b"\x00" + query
        name = self._statement_names.get(key)
        if name is None:
            if len(self._statement_names) >= MAX_STATEMENT_NAMES:
                # safe to forget: clients keep the names they were given, servers re-prepare
                self._statement_names.clear()
            digest = hashlib.blake2b(key, digest_size=8).hexdigest().encode("ascii")
            name = b"mp_" + digest
            self._statement_names[key] = name
        return name

    def unique_statement_name(self) -> bytes:
        return b"mp_u" + str(next(self._unique_names)).encode("ascii")

    def scram_verifier(self, user: str, secret: str) -> ScramVerifier:
        parsed = ScramVerifier.parse(secret)
        if parsed is not None:
            return parsed
        key = (user, secret)
        v = self._verifiers.get(key)
        if v is None:
            v = self._verifiers[key] = ScramVerifier.from_password(secret)
        return v

    async def reload(self) -> list[str]:
        """Admin RELOAD; why not (empty when done). With several workers the main process does
        it, whichever worker took the command, and answers once every worker runs the result."""
        if self.worker_index != 0:
            from . import workers as w

            answer = await w.admin_on_peer(
                w.peer_socket(self.peer_dir, 0), {"command": "RELOAD"}, w.PEER_ADMIN_TIMEOUT
            )
            if answer is None:
                return ["the main DBLB process did not answer"]
            return [str(e) for e in answer.get("errors") or []]
        errors = self._reload()
        if not errors and self.supervisor is not None:
            errors = await self.supervisor.wait_applied(self._supervisor_seq)
        return errors

    def _reload(self) -> list[str]:
        """Re-read the config file, or re-apply the last desired-state snapshot (this re-reads
        the TLS certificate, key and CA files it names)."""
        if self.settings.config_file:
            from marchproxy_common.configfile import ConfigFileError, load_config_file

            try:
                snapshot: Mapping[str, Any] = load_config_file(self.settings.config_file)
            except ConfigFileError as exc:
                _log.warning("reload_failed", error=str(exc))
                return [str(exc)]
        elif self._last_snapshot is not None:
            snapshot = self._last_snapshot
        else:
            return ["not applicable: no config file, and no desired state has been applied yet"]
        errors = self.apply_snapshot(snapshot)
        if errors:
            _log.warning("reload_rejected", errors=errors)
        return errors


_COUNT_KEYS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login")


def _counts(row: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(row[k]) for k in _COUNT_KEYS}
