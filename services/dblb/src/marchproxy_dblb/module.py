"""DBLB module hooks: the data plane (Postgres, MySQL) behind the shared module runtime."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import ssl
from collections.abc import Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from marchproxy.v1 import types_pb2
from marchproxy_common.module.hooks import BaseModuleHooks, BoundAddress, LoadReport
from marchproxy_common.net.listener import stop_serving
from marchproxy_common.net.proxied import client_address, wrap_proxy_protocol
from marchproxy_common.wire.postgres.auth import ScramVerifier

from .config import DEFAULT_MODULE_ID, DblbConfig, DblbSettings, module_config_from_snapshot
from .frontends.postgres import PostgresClient
from .metrics import DblbCollector
from .pool import PoolManager

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

    def __init__(self, settings: DblbSettings, config: DblbConfig | None = None) -> None:
        self.settings = settings
        self.module_id = settings.module_id or DEFAULT_MODULE_ID
        self.config = config or DblbConfig()
        self.manager = PoolManager(self.config)
        self.manager.on_reload = self._reload
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(DblbCollector(self))
        self.total_connections = 0
        self.protocol_errors = 0
        self.auth_failures = 0
        self.cancels_forwarded = 0
        self._server: asyncio.Server | None = None
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
        loop = asyncio.get_running_loop()
        factory: Any = lambda: PostgresClient(self)  # noqa: E731
        if self.settings.proxy_protocol != "off":
            factory = wrap_proxy_protocol(factory, mode=self.settings.proxy_protocol)
        self._server = await loop.create_server(
            factory, self.settings.data_host, self.settings.data_port, backlog=1024
        )
        self.manager.start()
        if self.settings.mysql_port >= 0:
            from .frontends.mysql import MysqlFrontend

            self._mysql = MysqlFrontend(self)
            self.mysql_address = await self._mysql.start(
                self.settings.data_host, self.settings.mysql_port
            )
        host, port = self._server.sockets[0].getsockname()[:2]
        _log.info("dblb_listening", host=host, port=port)
        return BoundAddress(host, port)

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        return self._apply_snapshot(snapshot)

    def _apply_snapshot(self, snapshot: Mapping[str, Any]) -> list[str]:
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
        if self._server is not None:
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
        for client in list(self.manager.clients.values()):
            if client.transport is not None:
                client.transport.close()
        self.manager.close()
        if self._mysql is not None:
            await self._mysql.close()
        if self._server is not None:
            await self._server.wait_closed()

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

    def _reload(self) -> list[str]:
        """Admin RELOAD: re-read the config file, or re-apply the last desired-state snapshot
        (this re-reads the TLS certificate, key and CA files it names)."""
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
        errors = self._apply_snapshot(snapshot)
        if errors:
            _log.warning("reload_rejected", errors=errors)
        return errors
