"""Server connections and per (database, user) pools.

A :class:`ServerConnection` is an asyncio Protocol to a real Postgres server. It logs in as a
client (trust, cleartext, md5, SCRAM-SHA-256), then is handed to client connections by its
:class:`Pool`. While linked it relays the server's bytes to the client unchanged and watches
ReadyForQuery to know when a transaction (transaction mode) is over.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import itertools
import os
import secrets
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import structlog

from marchproxy_common.net.sockets import SocketPoller, open_connection
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.postgres import BackendDecoder, RemoteProtocolError
from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_common.wire.postgres.auth import ScramClient, md5_response
from marchproxy_common.wire.postgres.decoder import (
    parse_authentication,
    parse_backend_key_data,
    parse_data_row,
    parse_fields,
    parse_parameter_status,
    parse_sasl_mechanisms,
)
from marchproxy_common.wire.postgres.messages import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    B_AUTHENTICATION,
    B_BACKEND_KEY_DATA,
    B_COMMAND_COMPLETE,
    B_COPY_DATA,
    B_DATA_ROW,
    B_ERROR,
    B_PARAMETER_STATUS,
    B_PARSE_COMPLETE,
    B_READY_FOR_QUERY,
    Message,
)

from .config import DblbConfig, PoolMode

if TYPE_CHECKING:
    from .frontends.postgres import PostgresClient

_log = structlog.get_logger("marchproxy.dblb.pool")

#: Server parameters we keep in step with each client (PgBouncer's tracked set).
TRACKED_PARAMETERS = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
)
#: Close a server that holds more prepared statements than this when it is released.
MAX_SERVER_PREPARED = 5_000
#: Passthrough-auth passwords remembered per pool (as SHA-256 digests) before starting over.
MAX_VERIFIED_PASSWORDS = 64
#: Statement names remembered per pool as "parses fine here" before starting over.
MAX_KNOWN_STATEMENTS = 100_000
#: Seconds to connect to a server and deliver a CancelRequest.
CANCEL_TIMEOUT = 5.0
#: client cancel keys drawn from one os.urandom call
SECRET_KEY_BATCH = 1024
_UINT32 = struct.Struct("!I")
_Z = B_READY_FOR_QUERY
_IDLE = ord("I")
_D = ord("D")
_HEADER = struct.Struct("!BI")  # type byte + int32 length that counts itself
#: Server message types the relay must look at (the others are forwarded unread).
_OBSERVED = frozenset({_Z, B_PARSE_COMPLETE, B_PARAMETER_STATUS, B_COMMAND_COMPLETE})


class QueryFailed(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message


class Expect:
    """Items in the per-link queue of responses we must align: Parse and Sync boundaries."""

    REAL: ClassVar[int] = 0  # a client's Parse: forward its ParseComplete
    INJECTED: ClassVar[int] = 1  # our re-Parse: swallow its ParseComplete
    FAKE: ClassVar[int] = 2  # a client's Parse we did not send: synthesize ParseComplete
    SYNC: ClassVar[int] = 3  # Sync/Query/FunctionCall: ends with ReadyForQuery


#: the item a Sync/Query/FunctionCall puts in ``ServerConnection.expect`` (one shared tuple)
SYNC_POINT: tuple[int, bytes | None] = (Expect.SYNC, None)


@dataclass(slots=True)
class PoolStats:
    xact_count: int = 0
    query_count: int = 0
    xact_time: float = 0.0
    query_time: float = 0.0
    wait_count: int = 0
    wait_time: float = 0.0
    bytes_received: int = 0
    bytes_sent: int = 0
    wait_timeouts: int = 0
    server_login_errors: int = 0
    server_logins: int = 0


_server_ids = itertools.count(1)


class ServerConnection(asyncio.Protocol):
    def __init__(self, pool: Pool, password: str | None = None, *, keep_rows: bool = False) -> None:
        self.pool = pool
        #: logging in with a client's password to check it (passthrough), not as the pool
        self.verifying = password is not None
        self.password = password if password is not None else pool.server_password
        self.id = next(_server_ids)
        self.state = "login"  # login | idle | active | reset | closed
        self.transport: asyncio.Transport | None = None
        self.client: PostgresClient | None = None
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        self.prepared: set[bytes] = set()
        self.pending_prepared: set[bytes] = set()
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.status = _IDLE
        self.outstanding = 0  # ReadyForQuery messages still due
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.expect: collections.deque[tuple[int, bytes | None]] = collections.deque()
        self.special = 0  # INJECTED/FAKE items in ``expect`` + injected queries in flight
        self.swallow_z = 0
        self.last_kind = Expect.SYNC
        self.query_started = 0.0
        self.linked_at = 0.0
        self._decoder = BackendDecoder(
            max_message_len=pool.config.max_packet_size,
            skip_bodies=frozenset({B_COPY_DATA} if keep_rows else {B_DATA_ROW, B_COPY_DATA}),
        )
        #: the longest message length field _relay_whole accepts (the length counts itself)
        self._max_length = pool.config.max_packet_size + 4
        self._query_done: asyncio.Future[list[list[bytes | None]]] | None = None
        self._query_rows: list[list[bytes | None]] = []
        self._query_error: tuple[str, str] | None = None
        self._scram: ScramClient | None = None
        self._ssl_answer: asyncio.Future[bytes] | None = None
        self.tls = False
        self._login_done: asyncio.Future[None] | None = None
        self.remote = f"{pool.host}:{pool.port}"
        #: flow control: our reading is paused for a client whose buffer is full, and our
        #: buffer to the server is full (``paused_client`` is the client we paused for it);
        #: both are undone in unlink() so nothing carries over to the next client
        self.reading_paused = False
        self.writing_paused = False
        self.paused_client: PostgresClient | None = None

    # ---- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: duck-typed
        self.transport = cast(asyncio.Transport, transport)

    def _send_startup(self) -> None:
        assert self.transport is not None
        params = {"user": self.pool.server_user, "database": self.pool.dbname}
        params.update(self.pool.startup_params)
        self.transport.write(enc.startup_message(params))

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = "closed"
        self.transport = None
        if self._ssl_answer is not None and not self._ssl_answer.done():
            self._ssl_answer.set_exception(ConnectionError("server closed the connection"))
        if self._login_done is not None and not self._login_done.done():
            self._login_done.set_exception(ConnectionError("server closed the connection"))
        if self._query_done is not None and not self._query_done.done():
            self._query_done.set_exception(ConnectionError("server closed the connection"))
        self.pool.on_server_closed(self, was)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_client(self.client)

    def resume_writing(self) -> None:
        self.writing_paused = False
        client, self.paused_client = self.paused_client, None
        if client is not None:
            client.resume_reading()

    def _pause_client(self, client: PostgresClient | None) -> None:
        if client is not None and self.paused_client is None:
            self.paused_client = client
            client.pause_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            if self.state == "active":  # linked to a client: by far the most common
                self._relay(data)
            elif self.state == "ssl":
                if self._ssl_answer is not None and not self._ssl_answer.done():
                    if data[:1] not in (b"S", b"N") or len(data) != 1:
                        raise RemoteProtocolError("bad answer to SSLRequest")
                    self._ssl_answer.set_result(data[:1])
            elif self.state == "login":
                self._login_received(data)
            elif self.state == "reset":
                self._reset_received(data)
            elif self.state == "query":
                self._query_received(data)
            else:
                # idle servers must be silent except for async notices; drop them
                msgs = self._decoder.feed(data)
                for m in msgs:
                    if m.type == B_ERROR:
                        _log.info("idle_server_error", fields=parse_fields(m.body))
                        self.close()
        except RemoteProtocolError as exc:
            _log.warning("server_protocol_error", server=self.remote, error=exc.message)
            self.close()

    # ---- login as a client ----------------------------------------------------------------

    def _login_received(self, data: bytes) -> None:
        assert self.transport is not None
        for m in self._decoder.feed(data):
            if m.type == B_AUTHENTICATION:
                self._authenticate(m)
            elif m.type == B_PARAMETER_STATUS:
                name, value = parse_parameter_status(m.body)
                self.params[name] = value
            elif m.type == B_BACKEND_KEY_DATA:
                self.backend_pid, self.backend_key = parse_backend_key_data(m.body)
            elif m.type == B_ERROR:
                fields = parse_fields(m.body)
                self._fail_login(fields.get("C", "08006"), fields.get("M", "login failed"))
                return
            elif m.type == _Z:
                self.state = "idle"
                self.pool.stats.server_logins += 1
                self.pool.manager.server_logins += 1
                if self._login_done is not None and not self._login_done.done():
                    self._login_done.set_result(None)

    def _authenticate(self, m: Message) -> None:
        assert self.transport is not None
        code, data = parse_authentication(m.body)
        password = self.password
        if code == AUTH_OK:
            return
        keys = self.pool.scram_keys if not self.verifying else None
        if code == AUTH_SASL and keys is not None:
            # auth_query: no password, but the keys recovered from a client's SCRAM proof
            if "SCRAM-SHA-256" not in parse_sasl_mechanisms(data):
                self._fail_login("28000", "server offers no supported SASL mechanism")
                return
            self._scram = ScramClient("", keys=keys)
            self.transport.write(
                enc.sasl_initial_response("SCRAM-SHA-256", self._scram.client_first())
            )
            return
        if password is None and code in (AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL):
            self._fail_login("28P01", "server asked for a password and none is configured")
            return
        assert password is not None or code in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL)
        if code == AUTH_CLEARTEXT:
            self.transport.write(enc.password_message(password or ""))
        elif code == AUTH_MD5:
            resp = md5_response(self.pool.server_user, password or "", data[:4])
            self.transport.write(enc.password_message(resp))
        elif code == AUTH_SASL:
            if "SCRAM-SHA-256" not in parse_sasl_mechanisms(data):
                self._fail_login("28000", "server offers no supported SASL mechanism")
                return
            self._scram = ScramClient(password or "")
            self.transport.write(
                enc.sasl_initial_response("SCRAM-SHA-256", self._scram.client_first())
            )
        elif code == AUTH_SASL_CONTINUE and self._scram is not None:
            self.transport.write(enc.sasl_response(self._scram.client_final(data)))
        elif code == AUTH_SASL_FINAL and self._scram is not None:
            self._scram.verify_server_final(data)
        else:
            self._fail_login("28000", f"unsupported authentication request {code}")

    def _fail_login(self, code: str, message: str) -> None:
        _log.warning("server_login_failed", server=self.remote, code=code, message=message)
        self.pool.stats.server_login_errors += 1
        self.pool.last_login_error = (code, message)
        if code.startswith("28") and not self.verifying:
            self.pool.server_auth_failed()
        if self._login_done is not None and not self._login_done.done():
            self._login_done.set_exception(ConnectionError(f"{code}: {message}"))
        self.close()

    async def login(self, connect_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._login_done = loop.create_future()
        async with asyncio.timeout(connect_timeout):
            poller = self.pool.manager.poller
            if poller is not None:
                # the clients' poller: a server's reply is handled from the same poll as a
                # client's query, without an asyncio handle of its own
                await open_connection(poller, lambda: self, self.pool.host, self.pool.port)
            else:
                await loop.create_connection(lambda: self, self.pool.host, self.pool.port)
            if self.pool.manager.server_tls is not None:
                await self._negotiate_tls(self.pool.manager.server_tls)
            self._send_startup()
            await self._login_done

    async def _negotiate_tls(self, ctx: ssl.SSLContext) -> None:
        """SSLRequest; on 'S' upgrade to TLS, on 'N' continue in clear unless TLS is required."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._ssl_answer = loop.create_future()
        self.state = "ssl"
        self.transport.write(enc.ssl_request())
        answer = await self._ssl_answer
        self.state = "login"
        if answer == b"S":
            new = await loop.start_tls(self.transport, self, ctx, server_hostname=self.pool.host)
            self.transport = cast(asyncio.Transport, new)
            self.tls = True
        elif self.pool.config.server_tls_mode == "require":
            raise ConnectionError("server does not support TLS (server_tls_mode = require)")

    # ---- a query of our own (auth_query) -----------------------------------------------------

    async def fetch_rows(self, sql: str, params: list[bytes | None]) -> list[list[bytes | None]]:
        """Run one statement with text parameters (extended protocol) on this idle server."""
        assert self.transport is not None and self.state == "idle"
        self.state = "query"
        self._query_done = asyncio.get_running_loop().create_future()
        self.transport.write(
            enc.parse(b"", sql.encode("utf-8"), b"\x00\x00")
            + enc.bind(b"", params)
            + enc.execute()
            + enc.sync()
        )
        rows = await self._query_done
        if self._query_error is not None:
            code, message = self._query_error
            raise QueryFailed(code, message)
        return rows

    def _query_received(self, data: bytes) -> None:
        for m in self._decoder.feed(data):
            if m.type == B_DATA_ROW:
                self._query_rows.append(parse_data_row(m.body))
            elif m.type == B_ERROR:
                fields = parse_fields(m.body)
                self._query_error = (fields.get("C", "XX000"), fields.get("M", "query failed"))
            elif m.type == _Z:
                self.state = "idle"
                if self._query_done is not None and not self._query_done.done():
                    self._query_done.set_result(self._query_rows)

    # ---- linked to a client -----------------------------------------------------------------

    def link(self, client: PostgresClient) -> None:
        self.client = client
        self.state = "active"
        if self.writing_paused:
            self._pause_client(client)
        self.outstanding = 0
        self.unsynced = False
        self.last_kind = Expect.SYNC
        self.linked_at = time.monotonic()
        sets = []
        for name, value in client.tracked_params.items():
            if self.params.get(name) != value:
                sets.append(f"SET {name} = {_quote(value)}")
                self.params[name] = value
        if sets:
            self.inject(enc.query("; ".join(sets)))

    def inject(self, query: bytes) -> None:
        """Send a Query of our own; every reply up to its ReadyForQuery is swallowed."""
        if self.transport is not None:
            self.transport.write(query)
            self.swallow_z += 1
            self.special += 1

    def in_flight(self) -> bool:
        return self.outstanding > 0 or self.unsynced or self.swallow_z > 0

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _relay(self, data: bytes) -> None:
        client = self.client
        assert client is not None
        self.pool.stats.bytes_received += len(data)
        if self.special:
            out = self._relay_slow(self._decoder.feed_framed(data, full=True)[0])
        elif self._decoder.buffered:
            msgs, out = self._decoder.feed_framed(data)
            for m in msgs:
                if m.type in _OBSERVED:
                    self._observe(m.type, m.body, 0, len(m.body))
        else:
            out = self._relay_whole(data)
        if out and client.transport is not None:
            client.transport.write(out)  # (PostgresClient.write, a call less per reply)
        if (
            self.client is client
            and self.status == _IDLE
            and not (self.outstanding or self.unsynced or self.swallow_z)  # in_flight()
        ):
            client.on_server_idle(self)

    def _relay_whole(self, data: bytes) -> bytes:
        """The common case, nothing buffered: walk the message headers of ``data`` in place
        (no Message objects, no copies) and forward it whole. A partial or invalid message
        at the end goes to the decoder, which buffers it or raises as it would have."""
        n = len(data)
        pos = 0
        max_length = self._max_length
        while n - pos >= 5:
            t, length = _HEADER.unpack_from(data, pos)
            end = pos + 1 + length
            if end > n or not 4 <= length <= max_length:
                break
            if t in _OBSERVED:
                if t == _Z:  # ends every reply: no detour through _observe
                    self._ready(data[pos + 5] if length > 4 else _IDLE)
                elif t != B_COMMAND_COMPLETE or (length > 4 and data[pos + 5] == _D):
                    self._observe(t, data, pos + 5, end)
            pos = end
        if pos == n:
            return data
        self._decoder.feed(data[pos:])  # a partial message (buffered) or an error
        return data[:pos]

    def _observe(self, t: int, buf: bytes, start: int, end: int) -> None:
        """A forwarded message of a type in ``_OBSERVED``; its body is ``buf[start:end]``."""
        if t == _Z:
            self._ready(buf[start] if end > start else _IDLE)
        elif t == B_PARSE_COMPLETE:
            if self.expect:
                self._parse_complete()
        elif t == B_PARAMETER_STATUS:
            name, value = parse_parameter_status(buf[start:end])
            self.params[name] = value
            assert self.client is not None
            self.client.on_parameter_status(name, value)
        elif end > start and buf[start] == _D:  # CommandComplete "DISCARD ..."/"DEALLOCATE ..."
            self._forget_statements(buf[start:end])

    def _forget_statements(self, tag: bytes) -> None:
        """SQL DISCARD ALL / DEALLOCATE ran on this server: our record of it is stale."""
        if tag.startswith((b"DISCARD", b"DEALLOCATE")):
            self.prepared.clear()

    def _ready(self, status: int) -> None:
        """ReadyForQuery: the server's transaction status; a Sync segment is answered."""
        self.status = status
        if self.outstanding:
            self.outstanding -= 1
            if self.outstanding == 0:
                now = time.monotonic()
                self.pool.stats.query_time += now - self.query_started
        expect = self.expect
        if expect:
            if expect[0] is SYNC_POINT:  # simple query protocol: nothing else to align
                expect.popleft()
            else:
                self._pop_through_sync()

    def _parse_complete(self) -> int:
        """Pop the Parse item a ParseComplete answers; return its kind."""
        expect = self.expect
        while expect and expect[0][0] == Expect.SYNC:
            # cannot happen in a well-behaved stream; keep going rather than misalign
            expect.popleft()
        if not expect:
            return Expect.REAL
        kind, name = expect.popleft()
        if kind == Expect.INJECTED:
            self.special -= 1
        if name is not None:
            self.pending_prepared.discard(name)
            self.prepared.add(name)
            known = self.pool.known_statements
            if len(known) >= MAX_KNOWN_STATEMENTS:
                known.clear()
            known.add(name)
        return kind

    def _relay_slow(self, msgs: list[Message]) -> bytes:
        client = self.client
        assert client is not None
        out: list[bytes] = []
        for m in msgs:
            t = m.type
            if self.swallow_z:
                if t == _Z:
                    self.swallow_z -= 1
                    self.special -= 1
                    if not self.swallow_z:
                        self._emit_fakes(out)
                elif t == B_ERROR:
                    _log.warning("injected_query_failed", fields=parse_fields(m.body))
                elif t == B_PARAMETER_STATUS:
                    name, value = parse_parameter_status(m.body)
                    self.params[name] = value
                continue
            if t == B_PARSE_COMPLETE:
                kind = self._parse_complete()
                if kind != Expect.INJECTED:
                    out.append(m.raw)
                self._emit_fakes(out)
            elif t == _Z:
                self._ready(m.body[0] if m.body else _IDLE)
                out.append(m.raw)
                self._emit_fakes(out)
            else:
                if t == B_PARAMETER_STATUS:
                    name_s, value = parse_parameter_status(m.body)
                    self.params[name_s] = value
                    client.on_parameter_status(name_s, value)
                elif t == B_COMMAND_COMPLETE and m.body[:1] == b"D":
                    self._forget_statements(m.body)
                out.append(m.raw)
        return b"".join(out)

    def _pop_through_sync(self) -> None:
        """ReadyForQuery ends a Sync segment; Parses it did not answer were skipped (error)."""
        expect = self.expect
        while expect:
            kind, name = expect.popleft()
            if kind in (Expect.INJECTED, Expect.FAKE):
                self.special -= 1
            if name is not None and name not in self.prepared:
                self.pending_prepared.discard(name)
            if kind == Expect.SYNC:
                break

    def _emit_fakes(self, out: list[bytes]) -> None:
        expect = self.expect
        while expect and expect[0][0] == Expect.FAKE:
            expect.popleft()
            self.special -= 1
            out.append(enc.parse_complete())

    def unlink(self) -> None:
        client = self.client
        if client is not None and client.paused_server is self:
            client.paused_server = None
            self.resume_reading()
        paused, self.paused_client = self.paused_client, None
        if paused is not None:
            paused.resume_reading()
        self.client = None
        if self.expect:
            self.expect.clear()
        self.special = self.swallow_z
        self.last_used = now = time.monotonic()
        stats = self.pool.stats
        stats.xact_count += 1
        stats.xact_time += now - self.linked_at

    # ---- reset (session mode) ---------------------------------------------------------------

    def start_reset(self, query: str) -> None:
        self.state = "reset"
        self.write(enc.query(query))

    def _reset_received(self, data: bytes) -> None:
        for m in self._decoder.feed(data):
            if m.type == B_ERROR:
                _log.warning("server_reset_failed", fields=parse_fields(m.body))
            elif m.type == B_PARAMETER_STATUS:
                name, value = parse_parameter_status(m.body)
                self.params[name] = value
            elif m.type == _Z:
                self.prepared.clear()
                self.pending_prepared.clear()
                if m.body[:1] == b"I":
                    self.pool.release(self)
                else:
                    self.close()
                return

    def close(self) -> None:
        if self.transport is not None:
            if self.state != "login":
                self.transport.write(enc.terminate())
            self.transport.close()
        if self.state == "idle":
            # closed from now on, not at connection_lost: never handed out again meanwhile
            # (an active server keeps its state so its client hears of the loss)
            self.state = "closed"

    def cancel_in_flight(self) -> None:
        """Ask the server to cancel what it runs (a client vanished mid-query)."""
        if self.outstanding and self.backend_pid:
            spawn(
                send_cancel(self.pool.host, self.pool.port, self.backend_pid, self.backend_key),
                name=f"dblb cancel server {self.id}",
            )


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def send_cancel(host: str, port: int, pid: int, key: int) -> None:
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(enc.cancel_request(pid, key))
                await writer.drain()
                await reader.read(1)  # the server closes when done
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        _log.info("cancel_forward_failed", error=str(exc))


@dataclass(frozen=True, slots=True)
class ClientRules:
    """What every client login reads from the config, as plain attributes: a pydantic model
    answers each attribute read through its ``__getattr__`` hook (a few hundred instructions,
    a dozen per login)."""

    require_tls: bool
    max_client_conn: int
    auth_type: str
    max_packet_size: int
    #: the database aliases, and whether "*" takes any other name (``config.database()``)
    databases: frozenset[str]
    any_database: bool

    @classmethod
    def of(cls, config: DblbConfig) -> ClientRules:
        return cls(
            require_tls=config.client_tls_mode == "require",
            max_client_conn=config.max_client_conn,
            auth_type=config.auth_type,
            max_packet_size=config.max_packet_size,
            databases=frozenset(config.databases),
            any_database="*" in config.databases,
        )


class TooManyPools(Exception):
    """``max_pools`` pools exist and none of them is unused."""


class PoolManager:
    """Every pool, the client registry (for cancel requests), PAUSE/RESUME and janitor."""

    _config: DblbConfig
    #: what each login reads from ``config``, kept with it
    rules: ClientRules

    @property
    def config(self) -> DblbConfig:
        return self._config

    @config.setter
    def config(self, config: DblbConfig) -> None:
        self._config = config
        self.rules = ClientRules.of(config)

    def __init__(self, config: DblbConfig, *, worker_index: int = 0, worker_count: int = 1) -> None:
        self.config = config
        #: this process's share of the limits when several workers serve the port
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.pools: dict[tuple[str, str], Pool] = {}
        self.replica_pools: dict[tuple[str, str, int], Pool] = {}
        #: pools replaced by a config change that still have clients or servers
        self.retired: set[Pool] = set()
        #: auth_query answers: (database, user) -> (secret or None, when fetched)
        self._secrets: dict[tuple[str, str], tuple[str | None, float]] = {}
        self.server_logins = 0
        self.clients: dict[int, PostgresClient] = {}
        self.client_count = 0
        self.paused = False
        #: databases paused on their own (PAUSE <db>)
        self.paused_databases: set[str] = set()
        self.closed = False
        #: PAUSE commands waiting for active servers: (database or None for all, future)
        self._pause_waiters: list[tuple[str | None, asyncio.Future[None]]] = []
        self._janitor: asyncio.Task[None] | None = None
        self.server_tls = server_tls_context(config)
        self._pid_counter = itertools.count(secrets.randbelow(1 << 20) + 1000)
        self._secret_keys: Iterator[tuple[int]] = iter(())
        #: the client sockets' poller; server sockets go on it too (None: asyncio's transports)
        self.poller: SocketPoller | None = None

    def start(self) -> None:
        self._janitor = spawn(self._janitor_loop(), name="dblb pool janitor")

    async def _janitor_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for pool in self.every_pool():
                pool.maintain(now)
            self.retired = {p for p in self.retired if not p.drained}
            self.evict_unused(now)

    def evict_unused(self, now: float) -> None:
        """Forget pools that stayed unused for ``pool_idle_timeout`` (and close their servers)."""
        timeout = self.config.pool_idle_timeout
        for registry in (self.pools, self.replica_pools):
            for key, pool in list(registry.items()):
                if not pool.unused or pool.min_size > 0:
                    pool.empty_since = None
                elif pool.empty_since is None:
                    pool.empty_since = now
                elif now - pool.empty_since >= timeout:
                    self._evict(registry, key)

    def _evict(self, registry: dict[Any, Pool], key: Any) -> None:
        pool = registry.pop(key)
        pool.close_all()
        if registry is self.pools:  # its replica pools go with it
            for rkey in [k for k in self.replica_pools if k[:2] == key]:
                self._evict(self.replica_pools, rkey)

    def _make_room(self) -> None:
        if len(self.pools) < self.config.max_pools:
            return
        unused = [(p.empty_since or time.monotonic(), k) for k, p in self.pools.items() if p.unused]
        if not unused:
            raise TooManyPools(f"too many pools (max_pools = {self.config.max_pools})")
        self._evict(self.pools, min(unused)[1])

    def apply(self, config: DblbConfig) -> None:
        """New config: pools whose target changed retire; their clients move on (below)."""
        self.config = config
        self.server_tls = server_tls_context(config)
        moved: list[PostgresClient] = []
        for rkey, rpool in list(self.replica_pools.items()):
            resolved = config.database(rpool.database)
            replicas = resolved[0].replicas if resolved is not None else []
            index = rkey[2]
            if index < len(replicas) and _replica_target(replicas[index], resolved) == (
                rpool.host,
                rpool.port,
                rpool.dbname,
            ):
                rpool.config = config
                continue
            del self.replica_pools[rkey]
            moved += self._retire(rpool)
        for key, pool in list(self.pools.items()):
            resolved = config.database(pool.database)
            if resolved is None or _target(resolved[0], resolved[1]) != (
                pool.host,
                pool.port,
                pool.dbname,
            ):
                del self.pools[key]
                moved += self._retire(pool)
            else:
                db = resolved[0]
                pool.config = config
                pool.size = self.share_of(db.pool_size or config.default_pool_size)
                pool.min_size = self.share_of(
                    db.min_pool_size if db.min_pool_size is not None else config.min_pool_size, 0
                )
                pool.mode = config.pool_mode_for(db, pool.user)
        # clients that waited for a server of a retired pool ask again, now for the new target
        for client in moved:
            client.request_again()

    def _retire(self, pool: Pool) -> list[PostgresClient]:
        moved = pool.retire()
        if not pool.drained:
            self.retired.add(pool)
        return moved

    def successor(self, pool: Pool, client_params: dict[str, str]) -> Pool | None:
        """The pool that replaced retired ``pool`` for the same client, if any."""
        try:
            new = self.pool_for(pool.database, pool.user, client_params)
        except TooManyPools:
            return None
        if new is None or new is pool:
            return None
        if (
            new.server_password is None
            and pool.server_password is not None
            and new.server_user == pool.server_user
        ):
            new.server_password = pool.server_password  # passthrough: learnt at login
            new.password_learnt = pool.password_learnt
        return new

    def replica_pool(self, primary: Pool, counter: int) -> Pool | None:
        """A pool to one of the primary's replicas (round robin), or None without replicas."""
        resolved = self.config.database(primary.database)
        if resolved is None or not resolved[0].replicas:
            return None
        replicas = resolved[0].replicas
        index = counter % len(replicas)
        key = (primary.database, primary.user, index)
        pool = self.replica_pools.get(key)
        target = replicas[index]
        if pool is not None and (pool.host, pool.port) != (target.host, target.port):
            self._retire(pool)  # not expected: apply() retires changed replicas
            pool = None
        if pool is None:
            pool = Pool(
                manager=self,
                database=primary.database,
                user=primary.user,
                dbname=target.dbname or primary.dbname,
                host=target.host,
                port=target.port,
                server_user=primary.server_user,
                server_password=primary.server_password,
                mode="transaction",
                size=primary.size,
                min_size=0,
                config=self.config,
                startup_params=dict(primary.startup_params),
                role=f"replica{index}",
            )
            self.replica_pools[key] = pool
        if primary.password_learnt:
            pool.server_password = primary.server_password  # passthrough: follow the primary
            pool.password_learnt = True
        return pool

    async def lookup_secret(self, database: str, user: str) -> str | None:
        """auth_query: the stored secret of ``user`` (None: no such login role), cached for
        ``auth_cache_ttl``. Raises OSError/ConnectionError/TimeoutError/QueryFailed."""
        cfg = self.config
        key = (database, user)
        cached = self._secrets.get(key)
        if cached is not None and time.monotonic() - cached[1] < cfg.auth_cache_ttl:
            return cached[0]
        probe = self.new_pool(database, cfg.auth_user, {})
        if probe is None:
            return None
        probe.server_user = cfg.auth_user
        auth = cfg.users.get(cfg.auth_user)
        probe.server_password = auth.password if auth is not None and auth.password else None
        server = ServerConnection(probe, keep_rows=True)
        try:
            await server.login(cfg.server_connect_timeout)
            async with asyncio.timeout(cfg.server_connect_timeout):
                rows = await server.fetch_rows(cfg.auth_query, [user.encode("utf-8")])
        finally:
            server.close()
        secret = None
        if rows and len(rows[0]) >= 2 and rows[0][1]:
            secret = rows[0][1].decode("utf-8", "replace")
        if len(self._secrets) >= MAX_VERIFIED_PASSWORDS * 16:
            self._secrets.clear()
        self._secrets[key] = (secret, time.monotonic())
        return secret

    def forget_secret(self, database: str, user: str) -> None:
        self._secrets.pop((database, user), None)

    def has_replicas(self, pool: Pool) -> bool:
        """Whether ``pool``'s database has replicas (asked for every transaction: cached per
        config, which is immutable and replaced whole by apply())."""
        cached = pool.replicas_known
        if cached is not None and cached[0] is self.config:
            return cached[1]
        resolved = self.config.database(pool.database)
        answer = resolved is not None and bool(resolved[0].replicas)
        pool.replicas_known = (self.config, answer)
        return answer

    def all_pools(self) -> list[Pool]:
        """The pools in force (SHOW POOLS, metrics); retired ones are in ``retired``."""
        return [*self.pools.values(), *self.replica_pools.values()]

    def every_pool(self) -> list[Pool]:
        return [*self.all_pools(), *self.retired]

    def pool_for(self, database: str, user: str, client_params: dict[str, str]) -> Pool | None:
        """The pool for an authenticated client: found, or created (None: no such database).

        Raises :class:`TooManyPools` when a new pool is needed and none can be evicted.
        """
        pool = self.pools.get((database, user))
        if pool is not None:
            return pool
        candidate = self.new_pool(database, user, client_params)
        return None if candidate is None else self.register(candidate)

    def new_pool(self, database: str, user: str, client_params: dict[str, str]) -> Pool | None:
        """A pool for (database, user) that is not registered yet (passthrough auth logs in
        with it before the client counts as authenticated)."""
        resolved = self.config.database(database)
        if resolved is None:
            return None
        db, dbname = resolved
        server_user = db.user or user
        password = db.password
        if password is None:
            u = self.config.users.get(server_user)
            if u is not None and u.password and not u.password.startswith("SCRAM-SHA-256$"):
                password = u.password
        return Pool(
            manager=self,
            database=database,
            user=user,
            dbname=dbname,
            host=db.host,
            port=db.port,
            server_user=server_user,
            server_password=password,
            mode=self.config.pool_mode_for(db, user),
            size=self.share_of(db.pool_size or self.config.default_pool_size),
            min_size=self.share_of(
                db.min_pool_size if db.min_pool_size is not None else self.config.min_pool_size,
                0,
            ),
            config=self.config,
            startup_params={k: v for k, v in client_params.items() if k in TRACKED_PARAMETERS},
        )

    def register(self, candidate: Pool) -> Pool:
        """Make ``candidate`` the pool of its (database, user), unless one exists already."""
        key = (candidate.database, candidate.user)
        pool = self.pools.get(key)
        if pool is not None:
            if pool.server_password is None and candidate.server_user == pool.server_user:
                pool.server_password = candidate.server_password
                pool.password_learnt = candidate.password_learnt
            if pool is not candidate:
                candidate.close_all()
            return pool
        self._make_room()
        self.pools[key] = candidate
        return candidate

    def share_of(self, total: int, minimum: int = 1) -> int:
        """This worker's part of a limit (all of it with one worker)."""
        if self.worker_count == 1:
            return total
        base, extra = divmod(total, self.worker_count)
        return max(minimum, base + (1 if self.worker_index < extra else 0))

    def new_backend_key(self) -> tuple[int, int]:
        """The fake BackendKeyData; with several workers the low 3 bits name ours."""
        counter = next(self._pid_counter)
        if self.worker_count > 1:
            counter = (counter << 3) | self.worker_index
        # cancel keys from the OS's CSPRNG, fetched a thousand at a time
        random = next(self._secret_keys, None)
        if random is None:
            self._secret_keys = _UINT32.iter_unpack(os.urandom(4 * SECRET_KEY_BATCH))
            random = next(self._secret_keys)
        return counter & 0x7FFFFFFF, random[0] & 0x7FFFFFFF

    def check_paused(self) -> None:
        if not self._pause_waiters:
            return
        still = []
        for database, fut in self._pause_waiters:
            if fut.done():
                continue
            if self.active_servers(database):
                still.append((database, fut))
            else:
                fut.set_result(None)
        self._pause_waiters = still

    def active_servers(self, database: str | None = None) -> int:
        return sum(
            1
            for p in self.every_pool()
            if database is None or p.database == database
            for s in p.servers
            if s.state != "idle"
        )

    async def pause(self, wait_s: float, database: str | None = None) -> bool:
        """PAUSE [db]: hand out no more servers (of ``database``, or at all) and wait until
        the active ones are released; False if that takes longer than ``wait_s``."""
        if database is None:
            self.paused = True
        else:
            self.paused_databases.add(database)
        if not self.active_servers(database):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pause_waiters.append((database, fut))
        try:
            async with asyncio.timeout(wait_s):
                await fut
            return True
        except TimeoutError:
            return False

    def resume(self, database: str | None = None) -> None:
        """RESUME (everything, every paused database) or RESUME <db>."""
        if database is None:
            self.paused = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)
        for pool in self.every_pool():
            if pool.paused:
                continue
            while pool.idle and pool.waiters:
                pool.release(pool.idle.popleft())
            pool._grow()

    def close(self) -> None:
        self.closed = True
        if self._janitor is not None:
            self._janitor.cancel()
        for pool in self.every_pool():
            pool.close_all()


class _Waiter:
    # (not a dataclass: compiled by mypyc, a dataclass builds its annotations when the module
    # loads, and PostgresClient's module is still loading then: it imports this one)
    __slots__ = ("client", "since", "timer")

    def __init__(self, client: PostgresClient, since: float) -> None:
        self.client = client
        self.since = since
        self.timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class Pool:
    manager: PoolManager
    database: str  # client-facing alias
    user: str  # client user
    dbname: str
    host: str
    port: int
    server_user: str
    server_password: str | None
    mode: PoolMode
    size: int
    min_size: int
    config: DblbConfig
    startup_params: dict[str, str] = field(default_factory=dict)
    idle: collections.deque[ServerConnection] = field(default_factory=collections.deque)
    servers: set[ServerConnection] = field(default_factory=set)
    waiters: collections.deque[_Waiter] = field(default_factory=collections.deque)
    connecting: int = 0
    stats: PoolStats = field(default_factory=PoolStats)
    server_params: dict[str, str] | None = None
    last_login_error: tuple[str, str] | None = None
    clients: int = 0
    #: passthrough auth: keyed digest of a password the server accepted -> when
    verified_passwords: dict[bytes, float] = field(default_factory=dict)
    _digest_key: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    #: ``server_password`` was learnt from a client (passthrough, auth_query), not configured
    password_learnt: bool = False
    #: auth_query with a SCRAM verifier: (ClientKey, ServerKey) recovered from a client's proof
    scram_keys: tuple[bytes, bytes] | None = None
    #: server statement names some server of this pool parsed successfully
    known_statements: set[bytes] = field(default_factory=set)
    #: replaced by a config change: serves the clients it has until they leave or move on,
    #: and closes servers nobody waits for
    retired: bool = False
    role: str = "primary"
    #: since when the janitor has seen this pool empty (no clients, waiters or busy servers)
    empty_since: float | None = None
    welcome_cache: dict[tuple[tuple[str, str], ...], bytes] = field(default_factory=dict)
    #: PoolManager.has_replicas' answer for this pool, and the config it holds for
    replicas_known: tuple[DblbConfig, bool] | None = None
    #: ``config`` and its server_lifetime, read at every release (see release())
    _lifetime: tuple[DblbConfig | None, float] = (None, 0.0)

    @property
    def name(self) -> str:
        return f"{self.database}/{self.user}"

    @property
    def paused(self) -> bool:
        """PAUSE (everything) or PAUSE <this database> is in force."""
        m = self.manager
        return m.paused or (bool(m.paused_databases) and self.database in m.paused_databases)

    def counts(self) -> dict[str, int]:
        active = sum(1 for s in self.servers if s.state == "active")
        return {
            "cl_active": self.clients - len(self.waiters),
            "cl_waiting": len(self.waiters),
            "sv_active": active,
            "sv_idle": len(self.idle),
            "sv_used": sum(1 for s in self.servers if s.state == "reset"),
            "sv_login": self.connecting,
        }

    # ---- acquire / release ------------------------------------------------------------------

    def request(self, client: PostgresClient) -> None:
        """Give ``client`` a server now or queue it; it gets ``on_server`` or an error."""
        if not self.paused:
            while self.idle:
                # LIFO like PgBouncer (server_round_robin = 0): the most recently used server
                # is warm, and idle ones age out through server_idle_timeout
                server = self.idle.pop()
                if server.state == "idle":
                    self._link(server, client)
                    return
        waiter = _Waiter(client, time.monotonic())
        loop = asyncio.get_running_loop()
        waiter.timer = loop.call_later(self.config.query_wait_timeout, self._wait_timeout, waiter)
        self.waiters.append(waiter)
        self.stats.wait_count += 1
        self._grow()

    def cancel_wait(self, client: PostgresClient) -> None:
        for w in list(self.waiters):
            if w.client is client:
                self.waiters.remove(w)
                if w.timer is not None:
                    w.timer.cancel()

    def _wait_timeout(self, waiter: _Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            self.stats.wait_timeouts += 1
            waiter.client.fail(
                "08P01",
                f"query_wait_timeout: no server connection for pool {self.name} "
                f"within {self.config.query_wait_timeout:g}s",
            )

    def _grow(self) -> None:
        if self.paused or self.manager.closed:
            return
        missing = min(len(self.waiters), self.size - len(self.servers) - self.connecting)
        want_min = self.min_size - len(self.servers) - self.connecting
        for _ in range(max(missing, want_min, 0)):
            self.connecting += 1
            spawn(self._open_server(), name=f"dblb connect {self.name}")

    async def _open_server(self) -> None:
        server = ServerConnection(self)
        try:
            await server.login(self.config.server_connect_timeout)
        except (OSError, TimeoutError, ConnectionError, RemoteProtocolError) as exc:
            self.connecting -= 1
            server.close()
            if self.last_login_error is None or not isinstance(exc, ConnectionError):
                self.last_login_error = ("08006", f"server connection failed: {exc}")
            self.stats.server_login_errors += 1
            if not self.servers and self.connecting == 0:
                code, msg = self.last_login_error
                for w in list(self.waiters):
                    self.waiters.remove(w)
                    if w.timer is not None:
                        w.timer.cancel()
                    w.client.fail(code, msg)
            return
        self.connecting -= 1
        if self.manager.closed or server.state != "idle":
            server.close()
            return
        self.last_login_error = None
        self.servers.add(server)
        if self.server_params is None:
            self.server_params = dict(server.params)
        self.release(server)

    async def check_password(self, password: str) -> bool:
        """Passthrough auth: the password is good if the server accepts it. A yes is
        remembered (as a keyed digest) for ``auth_cache_ttl`` seconds."""
        digest = hmac.new(self._digest_key, password.encode("utf-8"), hashlib.sha256).digest()
        verified_at = self.verified_passwords.get(digest)
        if verified_at is not None:
            if time.monotonic() - verified_at < self.config.auth_cache_ttl:
                return True
            del self.verified_passwords[digest]
        server = ServerConnection(self, password)
        try:
            await server.login(self.config.server_connect_timeout)
        except (OSError, TimeoutError, ConnectionError, RemoteProtocolError):
            server.close()
            return False
        if len(self.verified_passwords) >= MAX_VERIFIED_PASSWORDS:
            self.verified_passwords.clear()
        self.verified_passwords[digest] = time.monotonic()
        if self.server_password is None or self.password_learnt:
            self.server_password = password
            self.password_learnt = True
        if self.manager.closed or len(self.servers) + self.connecting >= self.size:
            server.close()
        else:
            self.servers.add(server)
            if self.server_params is None:
                self.server_params = dict(server.params)
            self.release(server)
        return True

    def server_auth_failed(self) -> None:
        """The server refused our login: a password it accepted before is no longer good."""
        self.verified_passwords.clear()
        if self.password_learnt:
            self.server_password = None
            self.password_learnt = False
        self.scram_keys = None
        self.manager.forget_secret(self.database, self.user)

    def learn_credentials(
        self, password: str | None, scram_keys: tuple[bytes, bytes] | None
    ) -> None:
        """auth_query: what the client's authentication gave us to log in as that user."""
        if self.server_password is not None and not self.password_learnt:
            return  # a configured password wins
        if password is not None:
            self.server_password = password
            self.password_learnt = True
        if scram_keys is not None:
            self.scram_keys = scram_keys

    def _link(self, server: ServerConnection, client: PostgresClient) -> None:
        server.link(client)
        client.on_server(server)

    def release(self, server: ServerConnection) -> None:
        """The server is idle and clean: give it to the next waiter or park it."""
        if server.client is not None:
            server.unlink()  # stamps last_used
            now = server.last_used
        else:
            now = time.monotonic()
        lifetime = self._lifetime
        if lifetime[0] is not self.config:  # (a pydantic attribute read costs ~500 instructions)
            lifetime = self._lifetime = (self.config, self.config.server_lifetime)
        if (
            server.state == "closed"
            or self.manager.closed
            or now - server.created_at > lifetime[1]
            or len(server.prepared) > MAX_SERVER_PREPARED
            or server not in self.servers
        ):
            server.close()
            return
        server.state = "idle"
        if self.waiters and not self.paused:
            while self.waiters:
                w = self.waiters.popleft()
                if w.timer is not None:
                    w.timer.cancel()
                if w.client.closed:
                    continue
                wait = now - w.since
                self.stats.wait_time += wait
                self._link(server, w.client)
                return
        if self.retired and self.clients <= 0:
            # a retired pool parks servers only for clients it still serves
            self.servers.discard(server)
            server.close()
            self.manager.check_paused()
            return
        self.idle.append(server)
        self.manager.check_paused()

    def release_after_client(self, server: ServerConnection, *, reset: bool) -> None:
        """The linked client left. Reuse the server only if it is idle outside a transaction."""
        server.unlink()
        if server.status != _IDLE or server.in_flight():
            server.cancel_in_flight()
            server.close()
            return
        if reset and self.config.server_reset_query:
            server.start_reset(self.config.server_reset_query)
        else:
            self.release(server)

    def on_server_closed(self, server: ServerConnection, was: str) -> None:
        member = server in self.servers
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        client = server.client
        if client is not None and was == "active":
            server.client = None
            client.server_lost(server)
        if member and self.waiters:
            # a server that never logged in is _open_server's to report: growing here
            # again would retry a failing login in a tight loop
            self._grow()
        self.manager.check_paused()

    def retire(self) -> list[PostgresClient]:
        """A config change replaced this pool: close its idle servers, hand back its waiters.

        Linked clients keep their servers; servers released by them go to the clients still
        waiting here (none, once they have moved on) or are closed.
        """
        self.retired = True
        self.min_size = 0
        self.close_idle()
        moved = []
        while self.waiters:
            w = self.waiters.popleft()
            if w.timer is not None:
                w.timer.cancel()
            if not w.client.closed:
                moved.append(w.client)
        return moved

    def close_idle(self) -> None:
        for server in list(self.idle):
            self.servers.discard(server)
            server.close()
        self.idle.clear()

    @property
    def drained(self) -> bool:
        return not (self.clients > 0 or self.servers or self.waiters or self.connecting)

    @property
    def unused(self) -> bool:
        """No clients, nobody waiting, no server busy or logging in: safe to evict."""
        return not (
            self.clients > 0
            or self.waiters
            or self.connecting
            or any(s.state != "idle" for s in self.servers)
        )

    def maintain(self, now: float) -> None:
        keep = self.min_size
        for server in list(self.idle):
            expired = now - server.created_at > self.config.server_lifetime
            too_idle = now - server.last_used > self.config.server_idle_timeout
            if expired or (too_idle and len(self.servers) > keep):
                self.idle.remove(server)
                self.servers.discard(server)
                server.close()
        if not self.paused:
            self._grow()

    def close_all(self) -> None:
        for w in list(self.waiters):
            if w.timer is not None:
                w.timer.cancel()
        self.waiters.clear()
        for server in list(self.servers):
            server.close()


def server_tls_context(config: DblbConfig) -> ssl.SSLContext | None:
    """libpq-like: ``prefer``/``require`` encrypt; the server is verified only with a CA file."""
    if config.server_tls_mode == "disable":
        return None
    if config.server_tls_ca:
        return ssl.create_default_context(cafile=config.server_tls_ca)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _target(db: Any, dbname: str) -> tuple[str, int, str]:
    return (db.host, db.port, dbname)


def _replica_target(replica: Any, resolved: Any) -> tuple[str, int, str]:
    return (replica.host, replica.port, replica.dbname or resolved[1])
