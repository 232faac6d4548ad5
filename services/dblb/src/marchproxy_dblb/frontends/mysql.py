"""MySQL session pooling: clients authenticate to us, then get a pooled server connection for
the whole session. On disconnect the server is reset (COM_RESET_CONNECTION + COM_INIT_DB) and
reused, unless a response was still in flight.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import structlog

from marchproxy_common.module.hooks import BoundAddress
from marchproxy_common.net.listener import stop_serving
from marchproxy_common.net.proxied import wrap_proxy_protocol
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.mysql import (
    Handshake,
    HandshakeResponse,
    Packet,
    PacketDecoder,
    RemoteProtocolError,
    ResponseTracker,
    encode_packet,
)
from marchproxy_common.wire.mysql import packets as p
from marchproxy_common.wire.mysql.auth import CACHING_SHA2, NATIVE, native_verify, scramble_for
from marchproxy_common.wire.mysql.packets import MAX_HANDSHAKE_PACKET
from marchproxy_dblb.config import DblbConfig, MysqlConfig
from marchproxy_dblb.pool import PoolStats

if TYPE_CHECKING:
    from marchproxy_dblb.module import DblbHooks

_log = structlog.get_logger("marchproxy.dblb.mysql")

#: Capabilities we offer clients and use to servers: no TLS, compression or LOCAL INFILE, no
#: session tracking, no MariaDB extended capabilities (they change the binary protocol).
SUPPORTED_CAPS = (
    p.CLIENT_LONG_PASSWORD
    | p.CLIENT_FOUND_ROWS
    | p.CLIENT_LONG_FLAG
    | p.CLIENT_CONNECT_WITH_DB
    | p.CLIENT_IGNORE_SPACE
    | p.CLIENT_PROTOCOL_41
    | p.CLIENT_INTERACTIVE
    | p.CLIENT_TRANSACTIONS
    | p.CLIENT_SECURE_CONNECTION
    | p.CLIENT_MULTI_STATEMENTS
    | p.CLIENT_MULTI_RESULTS
    | p.CLIENT_PS_MULTI_RESULTS
    | p.CLIENT_PLUGIN_AUTH
    | p.CLIENT_CONNECT_ATTRS
    | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | p.CLIENT_DEPRECATE_EOF
)
ER_ACCESS_DENIED = 1045
ER_CON_COUNT = 1040  # also "Too many connections"
ER_UNKNOWN_COM = 1047
#: Seconds the MySQL listener waits for an optional PROXY header before greeting the client.
PROXY_HEADER_WAIT = 0.2
#: Seconds to learn the backend's greeting (version, capabilities) for our own greeting.
GREETING_TIMEOUT = 10.0
#: Seconds between janitor rounds (idle timeout, lifetime, unused pools).
JANITOR_INTERVAL = 1.0
_ids = itertools.count(1)


def _salt() -> bytes:
    return bytes(secrets.choice(range(1, 128)) for _ in range(20))


class MysqlServer(asyncio.Protocol):
    def __init__(self, pool: MysqlPool, login: HandshakeResponse, password: str) -> None:
        self.pool = pool
        self.id = next(_ids)
        self.login_template = login
        self.password = password
        self.state = "greeting"  # greeting | auth | idle | active | reset | closed
        self.transport: asyncio.Transport | None = None
        self.client: MysqlClient | None = None
        self.decoder = PacketDecoder()
        self.tracker = ResponseTracker(
            deprecate_eof=bool(login.capabilities & p.CLIENT_DEPRECATE_EOF)
        )
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset_steps = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: duck-typed
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("server closed the connection"))
        self.pool.on_server_closed(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, code: int, state: str, message: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RemoteProtocolError(message, code=code, sqlstate=state))
        self.close()

    def data_received(self, data: bytes) -> None:
        try:
            if self.state == "active":
                self._relay(data)
                return
            for pkt in self.decoder.feed(data):
                self._on_packet(pkt.seq, pkt.payload)
        except RemoteProtocolError as exc:
            _log.warning("mysql_server_protocol_error", error=exc.message)
            if self.client is not None:
                self.client.fail(exc.code, exc.sqlstate, exc.message)
            self._fail(exc.code, exc.sqlstate, exc.message)

    def _on_packet(self, seq: int, payload: bytes) -> None:
        assert self.transport is not None
        if self.state == "greeting":
            hs = p.parse_handshake(payload)
            t = self.login_template
            caps = t.capabilities & hs.capabilities & SUPPORTED_CAPS & ~p.CLIENT_CONNECT_ATTRS
            caps |= p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
            if t.database:
                caps |= p.CLIENT_CONNECT_WITH_DB
            plugin = hs.auth_plugin if hs.auth_plugin in (NATIVE, CACHING_SHA2) else NATIVE
            token = scramble_for(plugin, self.password, hs.salt) or b""
            resp = HandshakeResponse(
                caps, t.max_packet, t.charset, t.user, token, t.database, plugin
            )
            self.state = "auth"
            self.transport.write(encode_packet(seq + 1, p.encode_handshake_response(resp)))
        elif self.state == "auth":
            head = payload[:1]
            if head == b"\x00":
                self.state = "idle"
                self.pool.stats.server_logins += 1
                if not self.ready.done():
                    self.ready.set_result(None)
            elif head == b"\xff":
                code, state, msg = p.parse_err(payload)
                self._fail(code, state, msg)
            elif head == b"\xfe":
                plugin, salt = p.parse_auth_switch(payload)
                switched = scramble_for(plugin, self.password, salt)
                if switched is None:
                    self._fail(ER_ACCESS_DENIED, "28000", f"unsupported auth plugin {plugin}")
                    return
                self.transport.write(encode_packet(seq + 1, switched))
            elif head == b"\x01" and payload[1:2] == b"\x03":
                pass  # caching_sha2 fast auth succeeded; OK follows
            else:
                self._fail(
                    ER_ACCESS_DENIED,
                    "28000",
                    "server requires full caching_sha2_password auth (needs TLS)",
                )
        elif self.state == "reset":
            if payload[:1] != b"\x00":
                _log.info("mysql_reset_failed", payload=payload[:80])
                self.close()
                return
            self._reset_steps -= 1
            if self._reset_steps == 0:
                self.pool.release(self)

    def start_reset(self) -> None:
        assert self.transport is not None
        self.state = "reset"
        self._reset_steps = 1
        out = encode_packet(0, bytes((p.COM_RESET_CONNECTION,)))
        if self.login_template.database:
            self._reset_steps = 2
            out += encode_packet(0, bytes((p.COM_INIT_DB,)) + self.login_template.database.encode())
        self.transport.write(out)

    def _relay(self, data: bytes) -> None:
        client = self.client
        for pkt in self.decoder.feed(data):
            self.tracker.feed(pkt.payload)
        self.pool.stats.bytes_received += len(data)
        if client is not None:
            client.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


@dataclass(eq=False)
class MysqlPool:
    frontend: MysqlFrontend
    key: tuple[str, str, int, int]
    login: HandshakeResponse
    password: str
    idle: collections.deque[MysqlServer] = field(default_factory=collections.deque)
    servers: set[MysqlServer] = field(default_factory=set)
    #: (client, its wait timer, when it started waiting)
    waiters: collections.deque[tuple[MysqlClient, asyncio.TimerHandle, float]] = field(
        default_factory=collections.deque
    )
    connecting: int = 0
    clients: int = 0
    stats: PoolStats = field(default_factory=PoolStats)

    def counts(self) -> dict[str, int]:
        states = [s.state for s in self.servers]
        return {
            "cl_active": self.clients - len(self.waiters),
            "cl_waiting": len(self.waiters),
            "sv_active": states.count("active"),
            "sv_idle": len(self.idle),
            "sv_used": states.count("reset"),
            "sv_login": self.connecting,
        }

    @property
    def unused(self) -> bool:
        return not (self.clients > 0 or self.waiters or self.connecting or self.servers)

    def request(self, client: MysqlClient) -> None:
        while self.idle:
            server = self.idle.pop()  # LIFO, as the Postgres pools: idle ones age out
            if server.state == "idle":
                self._link(server, client)
                return
        timer = asyncio.get_running_loop().call_later(
            self.frontend.dblb_config.query_wait_timeout, self._timeout, client
        )
        self.waiters.append((client, timer, time.monotonic()))
        self.stats.wait_count += 1
        if len(self.servers) + self.connecting < self.frontend.config.pool_size:
            self.connecting += 1
            spawn(self._open(), name=f"dblb mysql connect {self.key[0]}")

    def _timeout(self, client: MysqlClient) -> None:
        for item in list(self.waiters):
            if item[0] is client:
                self.waiters.remove(item)
                self.stats.wait_timeouts += 1
                client.fail(ER_CON_COUNT, "08004", "query_wait_timeout: no server connection")

    async def _open(self) -> None:
        cfg = self.frontend.config
        loop = asyncio.get_running_loop()
        server = MysqlServer(self, self.login, self.password)
        try:
            async with asyncio.timeout(self.frontend.dblb_config.server_connect_timeout):
                await loop.create_connection(lambda: server, cfg.host, cfg.port)
                await server.ready
        except (OSError, TimeoutError, ConnectionError, RemoteProtocolError) as exc:
            self.connecting -= 1
            server.close()
            self.stats.server_login_errors += 1
            if isinstance(exc, RemoteProtocolError):
                code, state, msg = exc.code, exc.sqlstate, exc.message
            else:
                code, state, msg = 2003, "HY000", f"cannot connect to MySQL server: {exc}"
            if not self.servers and not self.connecting:
                while self.waiters:
                    client, timer, _ = self.waiters.popleft()
                    timer.cancel()
                    client.fail(code, state, msg)
            return
        self.connecting -= 1
        self.servers.add(server)
        self.release(server)

    def _link(self, server: MysqlServer, client: MysqlClient) -> None:
        server.state = "active"
        server.client = client
        client.on_server(server)

    def release(self, server: MysqlServer) -> None:
        server.client = None
        now = time.monotonic()
        server.last_used = now
        if (
            server.state == "closed"
            or server not in self.servers
            or self.frontend.closed
            or now - server.created_at > self.frontend.dblb_config.server_lifetime
        ):
            server.close()
            return
        server.state = "idle"
        while self.waiters:
            client, timer, since = self.waiters.popleft()
            timer.cancel()
            if not client.closed:
                self.stats.wait_time += now - since
                self._link(server, client)
                return
        self.idle.append(server)

    def maintain(self, now: float) -> None:
        """Close idle servers past server_idle_timeout or server_lifetime."""
        cfg = self.frontend.dblb_config
        for server in list(self.idle):
            too_idle = now - server.last_used > cfg.server_idle_timeout
            if too_idle or now - server.created_at > cfg.server_lifetime:
                self.idle.remove(server)
                self.servers.discard(server)
                server.close()

    def release_after_client(self, server: MysqlServer) -> None:
        server.client = None
        if server.state == "active" and server.tracker.idle and server.transport is not None:
            server.start_reset()
        else:
            server.close()

    def on_server_closed(self, server: MysqlServer) -> None:
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        if server.client is not None:
            client, server.client = server.client, None
            client.fail(2013, "HY000", "lost connection to MySQL server")

    def close_all(self) -> None:
        for _, timer, _ in self.waiters:
            timer.cancel()
        self.waiters.clear()
        for server in list(self.servers):
            server.close()


class MysqlClient(asyncio.Protocol):
    def __init__(self, frontend: MysqlFrontend) -> None:
        self.frontend = frontend
        self.transport: asyncio.Transport | None = None
        self.decoder = PacketDecoder(max_packet=MAX_HANDSHAKE_PACKET)
        self.state = "greeting"  # greeting | handshake | auth_switch | wait | ready | closed
        self.closed = False
        self.salt = _salt()
        self.response: HandshakeResponse | None = None
        self.server: MysqlServer | None = None
        self.pool: MysqlPool | None = None
        self.tracker: ResponseTracker | None = None
        self._ok_seq = 2
        self._greeting_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: duck-typed
        self.transport = cast(asyncio.Transport, transport)
        if self.frontend.hooks.client_total() >= self.frontend.dblb_config.max_client_conn:
            # what mysqld does: an ERR packet in place of the greeting
            self.fail(ER_CON_COUNT, "08004", "Too many connections (max_client_conn)", seq=0)
            return
        self.frontend.clients.add(self)
        self._greeting_task = spawn(self._greet(), name="dblb mysql greeting")

    async def _greet(self) -> None:
        try:
            hs = await self.frontend.server_greeting()
        except (OSError, TimeoutError, RemoteProtocolError) as exc:
            self.fail(2003, "HY000", f"cannot reach MySQL server: {exc}")
            return
        ours = Handshake(
            hs.server_version,
            secrets.randbelow(1 << 31),
            self.salt,
            hs.capabilities & SUPPORTED_CAPS,
            hs.charset,
            hs.status,
            NATIVE,
        )
        self.state = "handshake"
        self.write(encode_packet(0, p.encode_handshake(ours)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state = "closed"
        self.transport = None
        self.frontend.clients.discard(self)
        if self._greeting_task is not None:
            self._greeting_task.cancel()
        pool = self.pool
        if pool is not None:
            pool.clients -= 1
            for item in list(pool.waiters):
                if item[0] is self:
                    pool.waiters.remove(item)
                    item[1].cancel()
            if self.server is not None:
                server, self.server = self.server, None
                pool.release_after_client(server)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def fail(self, code: int, sqlstate: str, message: str, seq: int | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                encode_packet(
                    self._ok_seq if seq is None else seq, p.encode_err(code, sqlstate, message)
                )
            )
            self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            if self.state == "ready":
                self._relay(data)
                return
            for pkt in self.decoder.feed(data):
                self._on_packet(pkt.seq, pkt.payload)
                if self.closed:
                    return
        except RemoteProtocolError as exc:
            self.frontend.hooks.protocol_errors += 1
            self.fail(exc.code, exc.sqlstate, exc.message)

    def _on_packet(self, seq: int, payload: bytes) -> None:
        if self.state == "handshake":
            self.response = r = p.parse_handshake_response(payload)
            self._ok_seq = seq + 1
            if r.auth_plugin != NATIVE:
                self.state = "auth_switch"
                self.write(encode_packet(seq + 1, p.encode_auth_switch(NATIVE, self.salt)))
                self._ok_seq = seq + 3
                return
            self._check_password(r.auth_response)
        elif self.state == "auth_switch":
            self._check_password(payload)
        elif self.state == "wait":
            raise RemoteProtocolError("command before authentication finished")
        else:
            raise RemoteProtocolError("unexpected packet")

    def _check_password(self, token: bytes) -> None:
        r = self.response
        assert r is not None
        users = self.frontend.config.users
        password = users.get(r.user)
        if password is None or not native_verify(password, self.salt, token):
            self.frontend.hooks.auth_failures += 1
            using = "YES" if token else "NO"
            self.fail(
                ER_ACCESS_DENIED,
                "28000",
                f"Access denied for user '{r.user}' (using password: {using})",
            )
            return
        self.state = "wait"
        self.pool = self.frontend.pool_for(r, password)
        self.pool.clients += 1
        self.pool.request(self)

    def on_server(self, server: MysqlServer) -> None:
        assert self.response is not None
        self.server = server
        self.tracker = server.tracker
        self.state = "ready"
        self.decoder = PacketDecoder()
        self.write(encode_packet(self._ok_seq, p.encode_ok()))

    def _relay(self, data: bytes) -> None:
        server = self.server
        tracker = self.tracker
        assert server is not None and tracker is not None
        for pkt in self.decoder.feed(data):
            if pkt.seq != 0 or not tracker.idle:
                continue  # continuation of a command (long data) or an in-flight exchange
            cmd = pkt.payload[0] if pkt.payload else -1
            if cmd == p.COM_QUIT:
                if self.transport is not None:
                    self.transport.close()
                return
            if cmd == p.COM_CHANGE_USER:
                self.fail(
                    ER_UNKNOWN_COM, "08S01", "COM_CHANGE_USER is not supported by the proxy", seq=1
                )
                return
            tracker.start(cmd)
            server.pool.stats.query_count += 1
        server.pool.stats.bytes_sent += len(data)
        server.write(data)


class MysqlFrontend:
    def __init__(self, hooks: DblbHooks) -> None:
        self.hooks = hooks
        self.dblb_config: DblbConfig = hooks.config
        self.config: MysqlConfig = hooks.config.mysql or MysqlConfig()
        self.pools: dict[tuple[str, str, int, int], MysqlPool] = {}
        self.clients: set[MysqlClient] = set()
        self.closed = False
        self._server: asyncio.Server | None = None
        self._greeting: Handshake | None = None
        self._greeting_at = 0.0
        self._janitor: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> BoundAddress:
        loop = asyncio.get_running_loop()
        factory: Any = lambda: MysqlClient(self)  # noqa: E731
        mode = self.hooks.settings.proxy_protocol
        if mode != "off":
            # the server speaks first: wait only briefly for a PROXY header (the NLB sends it at
            # once), so direct clients get their greeting after PROXY_HEADER_WAIT at most
            factory = wrap_proxy_protocol(
                factory,
                mode=mode,
                header_timeout=PROXY_HEADER_WAIT,
                trusted_sources=self.hooks.settings.proxy_trusted_networks(),
            )
        self._server = await loop.create_server(factory, host, port)
        self._janitor = spawn(self._janitor_loop(), name="dblb mysql janitor")
        h, prt = self._server.sockets[0].getsockname()[:2]
        return BoundAddress(h, prt)

    async def _janitor_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            for key, pool in list(self.pools.items()):
                pool.maintain(now)
                if pool.unused:  # no clients and no servers left: forget it
                    del self.pools[key]

    def pool_rows(self) -> list[dict[str, Any]]:
        """One row per (database, user) for SHOW POOLS/STATS and metrics (a (database, user)
        may have several pools, one per client capability set and charset)."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        now = time.monotonic()
        for pool in self.pools.values():
            user, database = pool.key[0], pool.key[1] or ""
            row = rows.setdefault(
                (database, user),
                {
                    "database": database,
                    "user": user,
                    "stats": PoolStats(),
                    "maxwait": 0.0,
                    **dict.fromkeys(pool.counts(), 0),
                },
            )
            for k, v in pool.counts().items():
                row[k] += v
            if pool.waiters:
                row["maxwait"] = max(row["maxwait"], now - pool.waiters[0][2])
            total, s = row["stats"], pool.stats
            for name in PoolStats.__dataclass_fields__:
                setattr(total, name, getattr(total, name) + getattr(s, name))
        return list(rows.values())

    def apply(self, config: DblbConfig) -> None:
        self.dblb_config = config
        new = config.mysql or MysqlConfig()
        if (new.host, new.port) != (self.config.host, self.config.port):
            for pool in self.pools.values():
                for server in list(pool.idle):
                    server.close()
            self.pools.clear()
            self._greeting = None
        self.config = new

    async def server_greeting(self) -> Handshake:
        """The backend's greeting (cached a minute): we copy its version and capabilities."""
        if self._greeting is not None and time.monotonic() - self._greeting_at < 60:
            return self._greeting
        async with asyncio.timeout(GREETING_TIMEOUT):
            reader, writer = await asyncio.open_connection(self.config.host, self.config.port)
            try:
                decoder = PacketDecoder(max_packet=MAX_HANDSHAKE_PACKET)
                packets: list[Packet] = []
                while not packets:
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise ConnectionError("MySQL server closed before its greeting")
                    packets = decoder.feed(chunk)
            finally:
                writer.close()
        self._greeting = p.parse_handshake(packets[0].payload)
        self._greeting_at = time.monotonic()
        return self._greeting

    def pool_for(self, r: HandshakeResponse, password: str) -> MysqlPool:
        caps = r.capabilities & SUPPORTED_CAPS & ~p.CLIENT_CONNECT_ATTRS
        key = (r.user, r.database, caps, r.charset)
        pool = self.pools.get(key)
        if pool is None:
            login = HandshakeResponse(
                caps, r.max_packet, r.charset, r.user, b"", r.database, NATIVE
            )
            pool = self.pools[key] = MysqlPool(self, key, login, password)
        return pool

    async def stop_accepting(self) -> None:
        if self._server is not None:
            await stop_serving(self._server)

    async def close(self) -> None:
        self.closed = True
        if self._janitor is not None:
            self._janitor.cancel()
        await self.stop_accepting()
        for c in list(self.clients):
            if c.transport is not None:
                c.transport.close()
        for pool in self.pools.values():
            pool.close_all()
        if self._server is not None:
            await self._server.wait_closed()
