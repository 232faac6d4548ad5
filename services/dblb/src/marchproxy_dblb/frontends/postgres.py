"""One asyncio Protocol per Postgres client: startup, auth, then pooled server links.

The client's raw bytes go to the server unchanged, except in transaction mode where named
prepared statements are renamed to pool-wide names and re-prepared on servers that lack them.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import re
import secrets
import ssl
import struct
import time
from typing import TYPE_CHECKING, cast

import structlog

from marchproxy_common.tasks import spawn
from marchproxy_common.wire.postgres import (
    MAX_AUTH_MESSAGE,
    CancelRequest,
    DecoderState,
    FrontendDecoder,
    GSSENCRequest,
    Message,
    RemoteProtocolError,
    SSLRequest,
    StartupMessage,
)
from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_common.wire.postgres.auth import (
    ScramServer,
    ScramVerifier,
    md5_hash,
    md5_response,
)
from marchproxy_common.wire.postgres.decoder import (
    parse_bind,
    parse_describe_or_close,
    parse_parse,
    parse_password,
    parse_sasl_initial_response,
    read_cstring_bytes,
)
from marchproxy_common.wire.postgres.messages import (
    F_BIND,
    F_CLOSE,
    F_DESCRIBE,
    F_EXECUTE,
    F_FUNCTION_CALL,
    F_PARSE,
    F_PASSWORD,
    F_QUERY,
    F_SYNC,
    F_TERMINATE,
)
from marchproxy_dblb.config import ADMIN_DATABASES
from marchproxy_dblb.frontends.admin import AdminConsole
from marchproxy_dblb.pool import (
    SYNC_POINT,
    TRACKED_PARAMETERS,
    Expect,
    Pool,
    PoolManager,
    QueryFailed,
    ServerConnection,
    TooManyPools,
)

if TYPE_CHECKING:
    from marchproxy_dblb.module import DblbHooks

_log = structlog.get_logger("marchproxy.dblb.client")
_client_ids = itertools.count(1)
_S = ord("S")
_TERMINATE = enc.terminate()
_SSL_REQUEST = enc.ssl_request()
_TRACKED = frozenset(TRACKED_PARAMETERS)
_AUTH_OK = enc.authentication_ok()
_READY_IDLE = enc.ready_for_query(b"I")
_BACKEND_KEY_DATA = struct.Struct("!cIii")  # b"K", length 12, process id, secret key
_HEADER = struct.Struct("!BI")  # type byte + int32 length that counts itself
_MESSAGES = DecoderState.MESSAGES
#: Close target for a client's Close of a renamed statement: it never exists on a server
#: ("It is not an error to issue Close against a nonexistent statement", protocol docs 55.7).
_NEVER_PREPARED = b"mp_closed"
#: the only simple queries we may answer ourselves (_deallocate_locally, _defer_begin)
_LOCAL_CANDIDATE = re.compile(rb"\s*(DEALLOCATE|BEGIN|START)\b", re.I)
#: what such a query starts with, when it does not start with white space (a cheaper test)
_LOCAL_HEADS = frozenset({b"DEA", b"BEG", b"STA"})
_DEALLOCATE = re.compile(rb"^\s*DEALLOCATE\s+(PREPARE\s+)?(\"?[A-Za-z0-9_$]+\"?)\s*;?\s*$", re.I)
#: Seconds a client has to finish the TLS handshake after its SSLRequest.
TLS_HANDSHAKE_TIMEOUT = 10.0
#: Distinct ParameterStatus blocks remembered per pool (keyed by the client's tracked params).
WELCOME_CACHE_SIZE = 64


class PostgresClient(asyncio.Protocol):
    # Defaults that most clients never change live on the class: a connection per
    # transaction (pgbench -C) pays for every attribute set in __init__.
    transport: asyncio.Transport | None = None
    #: the decoder holds no partial startup packet or message (set after each read it framed)
    _decoder_empty = True
    state = "startup"  # startup | auth | welcome | ready | admin | closed
    closed = False
    user = ""
    database = ""
    pool: Pool | None = None  # set once authenticated
    is_admin = False
    server: ServerConnection | None = None
    waiting = False
    welcomed = False
    backend_key = (0, 0)
    _auth_step = ""
    _salt = b""
    _scram: ScramServer | None = None
    _scram_server_key: bytes | None = None
    #: auth_query: the secret fetched for this user, and what its login gave us for the
    #: server login: (password or md5 hash, SCRAM (ClientKey, ServerKey))
    _looked_up: str | None = None
    _learnt: tuple[str | None, tuple[bytes, bytes] | None] | None = None
    _admin: AdminConsole | None = None
    _registered = False
    _auth_ok_pending = False
    _waiting_in: Pool | None = None
    _replica_turn = 0
    tls = False
    _tls_buffer: list[bytes] | None = None
    #: flow control: our buffer to the client is full, and the server whose reading we
    #: paused for it (resumed when it drains or when that server is unlinked)
    writing_paused = False
    paused_server: ServerConnection | None = None
    #: a BEGIN answered by us and not yet sent (read/write split, see _defer_begin)
    _deferred_begin: bytes | None = None
    #: the transport we were accepted on (the client's address is looked up on it)
    _accepted_on: asyncio.BaseTransport | None = None

    def __init__(self, hooks: DblbHooks) -> None:
        self.hooks = hooks
        self.manager: PoolManager = hooks.manager
        self.id = next(_client_ids)
        # strict: clear-text bytes sent along with an SSLRequest/GSSENCRequest are refused
        self.decoder = FrontendDecoder(max_message_len=MAX_AUTH_MESSAGE, strict_negotiation=True)
        #: the decoder's max_message_len (a plain attribute: read for every query)
        self._max_message_len = MAX_AUTH_MESSAGE
        self.params: dict[str, str] = {}
        self.tracked_params: dict[str, str] = {}
        self.pending: list[Message] = []
        self.pending_raw: list[bytes] = []
        self.statements: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        self.connected_at = time.time()

    @property
    def addr(self) -> tuple[str, int]:
        """The client's address (its PROXY protocol source, if it came with one)."""
        if self._accepted_on is None:
            return ("", 0)
        return self.hooks.client_address(self._accepted_on)

    # ---- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: duck-typed
        self.transport = cast(asyncio.Transport, transport)
        self._accepted_on = transport
        self.hooks.total_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state = "closed"
        self.transport = None
        if self._registered:
            self.manager.clients.pop(self.backend_key[0], None)
            self.manager.client_count -= 1
            if self.pool is not None:
                self.pool.clients -= 1
        pool = self.pool
        if pool is not None and self.waiting:
            (self._waiting_in or pool).cancel_wait(self)
        server = self.server
        if server is not None and pool is not None:
            self.server = None
            server.pool.release_after_client(server, reset=pool.mode == "session")

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_server(self.server)

    def resume_writing(self) -> None:
        self.writing_paused = False
        server, self.paused_server = self.paused_server, None
        if server is not None:
            server.resume_reading()

    def _pause_server(self, server: ServerConnection | None) -> None:
        if server is not None and self.paused_server is None:
            self.paused_server = server
            server.pause_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def fail(self, sqlstate: str, message: str, *, severity: str = "FATAL") -> None:
        """Send an ErrorResponse and close this client (only this one)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(enc.error_response(sqlstate, message, severity=severity))
            self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self._tls_buffer is not None:
            # the TLS layer may deliver the first decrypted bytes before start_tls() has
            # handed us the new transport; hold them so every reply goes out encrypted
            self._tls_buffer.append(data)
            return
        try:
            if self.state == "ready":
                if self._decoder_empty and data[0] == F_QUERY and self._one_query(data):
                    return
                if data == _TERMINATE and self._decoder_empty:
                    if self.transport is not None:
                        self.transport.close()
                    return
                msgs = self._whole_query(data)
                raw = data
                if msgs is None:
                    msgs, raw = self.decoder.feed_messages(data)
                    # the decoder hands back ``data`` itself only when it framed all of it
                    # and holds nothing over: then the next read may skip it (_whole_query)
                    self._decoder_empty = raw is data and self.decoder.state is _MESSAGES
                    if not msgs:
                        return
                if self.server is not None:
                    self._forward(msgs, raw)
                else:
                    self._queue(msgs, raw)
                return
            if (
                data == _SSL_REQUEST
                and self.state == "startup"
                and self._decoder_empty
                and self.hooks.client_tls is None
            ):
                # libpq's first packet (sslmode prefer): answered without the decoder, which
                # would only say so; anything sent along with it takes the decoder's path
                self.write(b"N")  # no TLS here: the client may go on in clear
                return
            if self.state == "startup" and self._decoder_empty:
                # the usual second read: one whole StartupMessage (no event list, no dispatch)
                startup = self.decoder.feed_startup(data)
                if startup is not None:
                    self._startup(startup)
                    return
            for ev in self.decoder.feed(data):
                self._on_event(ev)
                if self.closed:
                    return
            self._decoder_empty = not self.decoder.buffered
        except RemoteProtocolError as exc:
            _log.info("client_protocol_error", client=self.id, error=exc.message)
            self.hooks.protocol_errors += 1
            self.fail(exc.sqlstate, exc.message)

    def _one_query(self, data: bytes) -> bool:
        """``data`` (a read that starts with a Query, nothing buffered before it) as exactly
        one whole Query sent on at once: on the server we hold, or on an idle server of our
        pool taken between transactions (the common case of simple-protocol clients, such as
        pgbench -S), with no ``Message`` built. It does what ``_queue``, ``_request_server``,
        ``Pool.request``, ``on_server`` and ``_forward`` do for such a Query, and returns False
        (nothing done) for anything they would treat otherwise: a query we may answer
        ourselves, replicas, a retired or paused pool, no idle server, a client that waits."""
        n = len(data)
        if n < 5:
            return False
        _, length = _HEADER.unpack_from(data, 0)
        if length + 1 != n or length - 4 > self._max_message_len:
            return False
        server = self.server
        if server is None:
            pool = self.pool
            if (
                pool is None
                or self.pending
                or self.waiting
                or self._deferred_begin is not None
                or pool.retired
                or not pool.idle
                or (data[5:8].upper() in _LOCAL_HEADS or data[5:6].isspace())
                or self.manager.has_replicas(pool)
                or pool.paused
            ):
                return False
            server = pool.idle[-1]
            if server.state != "idle":
                return False
            pool.idle.pop()  # LIFO, as Pool.request
            server.link(self)
            self.server = server
            if self.writing_paused:
                self._pause_server(server)
            if server.outstanding == 0:
                server.query_started = server.linked_at
        elif server.outstanding == 0:
            server.query_started = time.monotonic()
        server.outstanding += 1
        stats = server.pool.stats
        stats.query_count += 1
        if self.pool is not None and self.pool.mode == "transaction":
            server.expect.append(SYNC_POINT)
        server.last_kind = Expect.SYNC
        stats.bytes_sent += n
        server.write(data)
        return True

    def _whole_query(self, data: bytes) -> list[Message] | None:
        """``data`` as one complete Query while the decoder holds nothing (the common case of
        simple-protocol clients), framed without the decoder's general path; None: not that."""
        if not self._decoder_empty or len(data) < 5 or data[0] != F_QUERY:
            return None
        _, length = _HEADER.unpack_from(data, 0)
        if length + 1 != len(data) or length - 4 > self._max_message_len:
            return None
        return [Message(F_QUERY, data[5:], length - 4)]

    def eof_received(self) -> bool | None:
        return None

    # ---- startup and authentication -----------------------------------------------------------

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, StartupMessage):
            self._startup(ev)
        elif isinstance(ev, SSLRequest) and self.hooks.client_tls is not None and not self.tls:
            self.write(b"S")
            self._upgrade_tls(self.hooks.client_tls)
        elif isinstance(ev, SSLRequest | GSSENCRequest):
            self.write(b"N")  # no TLS / GSS encryption here; clients may continue in clear
        elif isinstance(ev, CancelRequest):
            self._cancel(ev)
        elif isinstance(ev, Message):
            if self.state == "auth" and ev.type == F_PASSWORD:
                self._password(ev)
            elif self.state in ("ready", "welcome"):
                if self.server is None:
                    self._queue([ev], ev.raw)
                else:
                    self._forward([ev], ev.raw)
            elif self.state == "admin":
                assert self._admin is not None
                self._admin.on_message(ev)
            else:
                raise RemoteProtocolError("unexpected message during authentication")

    def _cancel(self, ev: CancelRequest) -> None:
        if self.transport is not None:
            self.transport.close()
        self.hooks.cancel(ev.process_id, ev.secret_key)

    def _upgrade_tls(self, ctx: ssl.SSLContext) -> None:
        """Switch this connection to TLS (server side) right after answering 'S'."""
        transport = self.transport
        assert transport is not None
        self.tls = True
        self._tls_buffer = []
        self.pause_reading()

        async def upgrade() -> None:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(TLS_HANDSHAKE_TIMEOUT):
                    new = await loop.start_tls(transport, self, ctx, server_side=True)
            except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
                _log.info("client_tls_failed", client=self.id, error=str(exc))
                transport.close()
                return
            self.transport = cast(asyncio.Transport, new)
            # decrypted bytes that arrived before start_tls() returned
            buffered, self._tls_buffer = self._tls_buffer, None
            for data in buffered or []:
                self.data_received(data)

        spawn(upgrade(), name=f"dblb tls {self.id}")

    def _startup(self, ev: StartupMessage) -> None:
        params = ev.parameters
        rules = self.manager.rules
        if rules.require_tls and not self.tls:
            self.fail("28000", "TLS is required (client_tls_mode = require)")
            return
        self.params = params
        self.user = params["user"]
        self.database = params.get("database") or self.user
        # one pass over the parameters: protocol options to refuse, and the tracked ones
        options: list[str] = []
        tracked: dict[str, str] = {}
        for k, v in params.items():
            if k in _TRACKED:
                tracked[k] = v
            elif k.startswith("_pq_."):
                options.append(k)
        if ev.protocol & 0xFFFF or options:
            self.write(enc.negotiate_protocol_version(0, options))
        if self.hooks.client_total() >= self.manager.share_of(rules.max_client_conn):
            self.fail("53300", "no more connections allowed (max_client_conn)")
            return
        self.backend_key = self.manager.new_backend_key()
        self.manager.clients[self.backend_key[0]] = self
        self.manager.client_count += 1
        self._registered = True
        self.is_admin = self.database in ADMIN_DATABASES
        if not self.is_admin:
            # only checked here (config.database() is not None, from the rules): the pool is
            # looked up (or created) once we are authenticated
            if not rules.any_database and self.database not in rules.databases:
                self.fail("3D000", f'no such database: "{self.database}"')
                return
        else:
            cfg = self.manager.config
            if (
                (cfg.admin_users or cfg.stats_users)
                and self.user not in cfg.admin_users
                and self.user not in cfg.stats_users
            ):
                self.fail("28000", f'user "{self.user}" is not allowed on the admin console')
                return
        self.tracked_params = tracked
        self._begin_auth()

    def _secret(self) -> str | None:
        if self._looked_up is not None:
            return self._looked_up
        u = self.manager.config.users.get(self.user)
        return u.password if u is not None and u.password else None

    def _begin_auth(self) -> None:
        auth = self.manager.rules.auth_type
        self.state = "auth"
        if auth == "trust":
            self._auth_ok()
            return
        cfg = self.manager.config
        secret = self._secret()
        if auth == "passthrough" and not self.is_admin:
            # the client's cleartext password is checked by logging in to the server with it
            self._auth_step = "passthrough"
            self.write(enc.authentication_cleartext())
        elif secret is None and cfg.auth_user and not self.is_admin and self._looked_up is None:
            self._auth_step = "lookup"
            spawn(self._lookup_secret(), name=f"dblb auth_query {self.id}")
        elif secret is None:
            self.fail("28P01", f'password authentication failed for user "{self.user}"')
        elif auth == "cleartext":
            self._auth_step = "cleartext"
            self.write(enc.authentication_cleartext())
        elif auth == "md5" and not secret.startswith("SCRAM-SHA-256$"):
            # (a SCRAM secret cannot check an md5 answer: SCRAM is used then, as PgBouncer)
            self._auth_step = "md5"
            self._salt = secrets.token_bytes(4)
            self.write(enc.authentication_md5(self._salt))
        else:
            self._auth_step = "sasl-initial"
            self.write(enc.authentication_sasl(["SCRAM-SHA-256"]))

    async def _lookup_secret(self) -> None:
        """auth_query: fetch this user's secret from the server, then authenticate with it."""
        try:
            secret = await self.manager.lookup_secret(self.database, self.user)
        except (OSError, TimeoutError, ConnectionError, RemoteProtocolError, QueryFailed) as exc:
            _log.warning("auth_query_failed", client=self.id, error=str(exc))
            if not self.closed:
                self.fail("08006", f"auth_query failed: {exc}")
            return
        if self.closed:
            return
        if secret is None:  # no such login role (or its password expired)
            self.hooks.auth_failures += 1
            self.fail("28P01", f'password authentication failed for user "{self.user}"')
            return
        self._looked_up = secret
        self._begin_auth()

    def _password(self, m: Message) -> None:
        secret = self._secret() or ""
        step = self._auth_step
        ok = False
        if step == "cleartext" or (step == "passthrough" and self.is_admin):
            given = parse_password(m.body)
            ok = _check_cleartext(self.user, secret, given)
            self._learnt = (given, None)
        elif step == "passthrough":
            self._auth_step = "verifying"
            spawn(
                self._passthrough(parse_password(m.body)),
                name=f"dblb passthrough auth {self.id}",
            )
            return
        elif step == "md5":
            ok = not secret.startswith("SCRAM-SHA-256$") and hmac.compare_digest(
                md5_response(self.user, secret, self._salt), parse_password(m.body)
            )
            self._learnt = (secret, None)  # an md5 hash (or plain text) logs in to md5 servers
        elif step == "sasl-initial":
            mech, data = parse_sasl_initial_response(m.body)
            if mech != "SCRAM-SHA-256":
                raise RemoteProtocolError("unsupported SASL mechanism", sqlstate="28000")
            verifier = self.hooks.scram_verifier(self.user, secret)
            self._scram = ScramServer(verifier)
            self._scram_server_key = verifier.server_key
            self.write(enc.authentication_sasl_continue(self._scram.server_first(data)))
            self._auth_step = "sasl-final"
            return
        elif step == "sasl-final" and self._scram is not None:
            try:
                final = self._scram.verify_final(m.body)
            except RemoteProtocolError as exc:
                if exc.sqlstate != "28P01":
                    raise
            else:
                self.write(enc.authentication_sasl_final(final))
                ok = True
                if self._scram.client_key is not None and self._scram_server_key is not None:
                    self._learnt = (None, (self._scram.client_key, self._scram_server_key))
        if not ok:
            self.hooks.auth_failures += 1
            self.fail("28P01", f'password authentication failed for user "{self.user}"')
            return
        self._auth_ok()

    async def _passthrough(self, password: str) -> None:
        # verify with the registered pool, or with an unregistered one that becomes the pool
        # only if the password is good: unauthenticated clients never create pools
        manager = self.manager
        pool = manager.pools.get((self.database, self.user)) or manager.new_pool(
            self.database, self.user, self.params
        )
        if pool is None:
            self.fail("3D000", f'no such database: "{self.database}"')
            return
        ok = await pool.check_password(password)
        registered = manager.pools.get((self.database, self.user)) is pool
        if self.closed or not ok:
            if not registered:
                pool.close_all()
            if not self.closed:
                self.hooks.auth_failures += 1
                self.fail("28P01", f'password authentication failed for user "{self.user}"')
            return
        self._auth_ok(pool)

    def _auth_ok(self, candidate: Pool | None = None) -> None:
        # AuthenticationOk goes out with the ParameterStatus block: one write, one packet
        self._auth_ok_pending = True
        self.decoder.max_message_len = self._max_message_len = self.manager.rules.max_packet_size
        if self.is_admin:
            self.state = "admin"
            self._admin = AdminConsole(self)
            self._welcome({"server_version": "16.0 (marchproxy-dblb)", "client_encoding": "UTF8"})
            return
        try:
            if candidate is not None:
                self.pool = self.manager.register(candidate)
            else:
                self.pool = self.manager.pool_for(self.database, self.user, self.params)
        except TooManyPools as exc:
            if candidate is not None:
                candidate.close_all()
            self.fail("53300", str(exc))
            return
        if self.pool is None:  # the database went away while we authenticated
            self.fail("3D000", f'no such database: "{self.database}"')
            return
        self.pool.clients += 1
        if self._looked_up is not None and self._learnt and self.pool.server_user == self.user:
            # auth_query: log in to the server as this user with what its login gave us
            self.pool.learn_credentials(*self._learnt)
        self._learnt = None
        if self.pool.server_params is not None:
            self._welcome(self.pool.server_params)
            self.state = "ready"
            return
        self.write(enc.authentication_ok())
        self._auth_ok_pending = False
        self.state = "welcome"
        self.waiting = True
        self.pool.request(self)

    def _welcome(self, server_params: dict[str, str]) -> None:
        key = tuple(self.tracked_params.items())
        cache = self.pool.welcome_cache if self.pool is not None else {}
        block = cache.get(key)
        if block is None:
            params = dict(server_params)
            params.update(self.tracked_params)
            block = b"".join(enc.parameter_status(k, v) for k, v in params.items())
            if len(cache) >= WELCOME_CACHE_SIZE:
                cache.clear()
            cache[key] = block
        head = _AUTH_OK if self._auth_ok_pending else b""
        self._auth_ok_pending = False
        key_data = _BACKEND_KEY_DATA.pack(b"K", 12, *self.backend_key)
        self.write(head + block + key_data + _READY_IDLE)
        self.welcomed = True

    # ---- pooled operation ----------------------------------------------------------------------

    def _queue(self, msgs: list[Message], raw: bytes) -> None:
        if not msgs:
            return
        if msgs[-1].type == F_TERMINATE:  # the decoder guarantees Terminate comes last
            if self.transport is not None:
                self.transport.close()
            return
        if not self.pending and self._deferred_begin is None:
            # answers of our own are for clients outside a transaction
            single_query = (
                len(msgs) == 1
                and msgs[0].type == F_QUERY
                and _LOCAL_CANDIDATE.match(msgs[0].body) is not None
            )
            if single_query and self._deallocate_locally(msgs[0]):
                return
            if msgs[-1].type == F_SYNC and self._prepare_locally(msgs):
                return
            if single_query and self._defer_begin(msgs[0]):
                return
        self.pending.extend(msgs)
        self.pending_raw.append(raw)
        if not self.waiting and self.pool is not None:
            self.waiting = True
            self._request_server()

    def _request_server(self) -> None:
        """Ask for a server: a replica's when the transaction is routed there, else primary."""
        assert self.pool is not None
        if self.pool.retired:
            self._leave_retired_pool(self.pool)
        target = self.pool
        if (
            self.pool.mode == "transaction"
            and self.pending
            and self.manager.has_replicas(self.pool)
            and _wants_replica(self.pending[0], after_begin=self._deferred_begin is not None)
        ):
            self._replica_turn += 1
            target = self.manager.replica_pool(self.pool, self._replica_turn) or self.pool
        self._waiting_in = target
        target.request(self)

    def _leave_retired_pool(self, old: Pool) -> None:
        """Between transactions (we hold no server) a client of a pool that a config change
        replaced moves to the pool now in force. With none (its database was removed) it
        stays: the retired pool serves it until it leaves."""
        new = self.manager.successor(old, self.params)
        if new is None:
            return
        old.clients -= 1
        new.clients += 1
        self.pool = new
        if old.clients <= 0:
            old.close_idle()

    def request_again(self) -> None:
        """The pool we waited in retired (config change): wait again where we belong now."""
        if self.closed or self.server is not None or self.pool is None:
            return
        self.waiting = True
        self._request_server()

    def _defer_begin(self, m: Message) -> bool:
        """A bare BEGIN on a database with replicas: the statement after it may make the
        transaction read-only (``SET TRANSACTION READ ONLY``), so answer BEGIN here and send it
        (its reply swallowed) with that statement to the server it picks."""
        pool = self.pool
        if pool is None or pool.mode != "transaction" or not self.manager.has_replicas(pool):
            return False
        if _BARE_BEGIN.match(m.body) is None:
            return False
        self._deferred_begin = m.raw
        self.write(enc.command_complete("BEGIN") + enc.ready_for_query(b"T"))
        return True

    def _prepare_locally(self, msgs: list[Message]) -> bool:
        """``Parse(named)... Sync`` outside a transaction (libpq's PQprepare) for statements a
        server of this pool has already parsed: answer without taking a server. Besides saving
        a round trip this avoids a deadlock with clients that prepare synchronously while their
        own thread's other connections hold every server (pgbench -M prepared, PgBouncer too).
        """
        pool = self.pool
        if pool is None or pool.mode != "transaction" or len(msgs) < 2:
            return False
        parsed = []
        for m in msgs[:-1]:
            if m.type != F_PARSE:
                return False
            name, query, rest = parse_parse(m.body)
            sname = self.hooks.statement_name(query, rest)
            if not name or sname not in pool.known_statements:
                return False
            parsed.append((name, (sname, query, rest)))
        self.statements.update(parsed)
        pool.stats.query_count += 1
        self.write(enc.parse_complete() * len(parsed) + enc.ready_for_query(b"I"))
        return True

    def _deallocate_locally(self, m: Message) -> bool:
        """``DEALLOCATE name`` outside a transaction (psycopg < libpq 17 evicting its cache) names
        a statement the servers know under another name: forget it here and answer ourselves.
        """
        if self.pool is None or self.pool.mode != "transaction":
            return False
        match = _DEALLOCATE.match(m.body.rstrip(b"\x00"))
        if match is None:
            return False
        name = match.group(2).strip(b'"')
        if name.upper() == b"ALL":
            self.statements.clear()
        elif self.statements.pop(name, None) is None:
            return False  # not ours: let the server answer (and error if need be)
        self.write(
            enc.command_complete("DEALLOCATE" if name.upper() != b"ALL" else "DEALLOCATE ALL")
            + enc.ready_for_query(b"I")
        )
        return True

    def on_server(self, server: ServerConnection) -> None:
        """The pool linked ``server`` to us."""
        self.waiting = False
        self.server = server
        if self.writing_paused:
            self._pause_server(server)
        if self._deferred_begin is not None:
            server.inject(self._deferred_begin)
            self._deferred_begin = None
        if not self.welcomed:
            self._welcome(server.params)
            self.state = "ready"
        if self.pending:
            msgs, self.pending = self.pending, []
            raw = b"".join(self.pending_raw)
            self.pending_raw = []
            self._forward(msgs, raw)
        elif not server.in_flight():
            self.on_server_idle(server)

    def on_server_idle(self, server: ServerConnection) -> None:
        """ReadyForQuery 'I' with nothing in flight: end of a transaction."""
        owner = server.pool
        if self.pool is not None and self.pool.mode == "transaction" and self.server is server:
            self.server = None
            owner.release(server)
            if self.pending and not self.waiting:
                self.waiting = True
                self._request_server()

    def on_parameter_status(self, name: str, value: str) -> None:
        if name in TRACKED_PARAMETERS:
            self.tracked_params[name] = value

    def server_lost(self, server: ServerConnection) -> None:
        if self.server is server:
            self.server = None
            self.fail("08006", "server connection closed unexpectedly")

    def _forward(self, msgs: list[Message], raw: bytes | None) -> None:  # noqa: C901 - hot path
        server = self.server
        assert server is not None and self.pool is not None
        transaction_mode = self.pool.mode == "transaction"
        # ``out`` is only built once something is rewritten or injected; until then the raw
        # bytes we received are forwarded as they are.
        out: list[bytes] | None = None if raw is not None else []
        expect = server.expect
        stats = server.pool.stats  # the pool that serves it (a replica pool too)
        for i, m in enumerate(msgs):
            t = m.type
            if t in (F_QUERY, F_SYNC, F_FUNCTION_CALL):
                if server.outstanding == 0:
                    server.query_started = time.monotonic()
                server.outstanding += 1
                stats.query_count += 1
                if t == F_SYNC:
                    server.unsynced = False
                if transaction_mode:
                    expect.append(SYNC_POINT)
                server.last_kind = Expect.SYNC
            elif t == F_PARSE:
                server.unsynced = True
                if transaction_mode:
                    name, query, rest = parse_parse(m.body)
                    if name:
                        if out is None:
                            out = [x.raw for x in msgs[:i]]
                        parse_msg = self._prepare(server, name, query, rest)
                        server.last_kind = Expect.REAL
                        if parse_msg:
                            out.append(parse_msg)
                        continue
                    expect.append((Expect.REAL, None))
                server.last_kind = Expect.REAL
            elif t in (F_BIND, F_DESCRIBE, F_CLOSE, F_EXECUTE):
                server.unsynced = True
                server.last_kind = -1
                if transaction_mode and t != F_EXECUTE and self._refers_to_named(m):
                    if out is None:
                        out = [x.raw for x in msgs[:i]]
                    rewritten = self._rewrite_statement_ref(server, m, out)
                    out.append(m.raw if rewritten is None else rewritten)
                    continue
            elif t == F_TERMINATE:
                if out is None:
                    out = [x.raw for x in msgs[:i]]
                if out:
                    server.write(b"".join(out))
                if self.transport is not None:
                    self.transport.close()
                return
            if out is not None:
                out.append(m.raw)
        if out is None:
            assert raw is not None
            stats.bytes_sent += len(raw)
            server.write(raw)
        else:
            data_out = b"".join(out)
            stats.bytes_sent += len(data_out)
            server.write(data_out)

    @staticmethod
    def _refers_to_named(m: Message) -> bool:
        """Bind/Describe/Close of a *named statement* (cheap check before parsing)."""
        body = m.body
        if m.type == F_BIND:
            # portal name, then statement name: named when the byte after the first NUL isn't NUL
            first = body.find(b"\x00")
            return 0 <= first < len(body) - 1 and body[first + 1] != 0
        return len(body) > 2 and body[0] == _S

    def _prepare(self, server: ServerConnection, name: bytes, query: bytes, rest: bytes) -> bytes:
        """A client's named Parse in transaction mode: rename it to a pool-wide name."""
        sname = self.hooks.statement_name(query, rest)
        if sname in server.prepared or sname in server.pending_prepared:
            if server.last_kind in (Expect.REAL, Expect.SYNC):
                self.statements[name] = (sname, query, rest)
                if not server.expect and not server.outstanding and not server.swallow_z:
                    self.write(enc.parse_complete())
                else:
                    server.expect.append((Expect.FAKE, sname))
                    server.special += 1
                return b""
            # our ParseComplete could not be placed in order: use a name of its own
            sname = self.hooks.unique_statement_name()
        self.statements[name] = (sname, query, rest)
        server.expect.append((Expect.REAL, sname))
        server.pending_prepared.add(sname)
        return enc.parse(sname, query, rest)

    def _rewrite_statement_ref(
        self, server: ServerConnection, m: Message, out: list[bytes]
    ) -> bytes | None:
        t = m.type
        if t == F_BIND:
            portal, stmt, offset = parse_bind(m.body)
            if not stmt:
                return None
            sname = self._ensure_prepared(server, stmt, out)
            if sname is None:
                return None
            return enc.message(b"B", portal + b"\x00" + sname + b"\x00" + m.body[offset:])
        kind, name = parse_describe_or_close(m.body)
        if kind != _S or not name:
            return None
        if t == F_CLOSE:
            self.statements.pop(name, None)
            return enc.message(b"C", b"S" + _NEVER_PREPARED + b"\x00")
        sname = self._ensure_prepared(server, name, out)
        if sname is None:
            return None
        return enc.message(b"D", b"S" + sname + b"\x00")

    def _ensure_prepared(
        self, server: ServerConnection, stmt: bytes, out: list[bytes]
    ) -> bytes | None:
        entry = self.statements.get(stmt)
        if entry is None:
            return None  # unknown to us: let the server answer "does not exist"
        sname, query, rest = entry
        if sname not in server.prepared and sname not in server.pending_prepared:
            out.append(enc.parse(sname, query, rest))
            server.expect.append((Expect.INJECTED, sname))
            server.special += 1
            server.pending_prepared.add(sname)
        return sname


#: BEGIN / START TRANSACTION with READ ONLY among its modes, or followed in the same query
#: string by SET TRANSACTION ... READ ONLY (``BEGIN; SET TRANSACTION READ ONLY; ...``)
_READ_ONLY_START = re.compile(
    rb"^\s*(BEGIN|START\s+TRANSACTION)\b[^;]*?\bREAD\s+ONLY\b"
    rb"|^\s*(BEGIN|START\s+TRANSACTION)\b[^;]*;\s*SET\s+TRANSACTION\b[^;]*?\bREAD\s+ONLY\b",
    re.I,
)
#: the first statement after a deferred BEGIN that makes the transaction read-only
_SET_READ_ONLY = re.compile(rb"^\s*SET\s+TRANSACTION\b[^;]*?\bREAD\s+ONLY\b", re.I)
#: a BEGIN whose transaction may still become read-only (no READ ONLY/WRITE, no more SQL)
_BARE_BEGIN = re.compile(
    rb"^\s*(BEGIN|START\s+TRANSACTION)(\s+(WORK|TRANSACTION))?"
    rb"(\s*,?\s*(ISOLATION\s+LEVEL\s+(SERIALIZABLE|REPEATABLE\s+READ|READ\s+COMMITTED"
    rb"|READ\s+UNCOMMITTED)|(NOT\s+)?DEFERRABLE))*\s*;?\s*\x00?$",
    re.I,
)
_REPLICA_COMMENT = b"/* marchproxy:replica */"


def _statement_text(m: Message) -> bytes | None:
    if m.type == F_QUERY:
        return m.body
    if m.type == F_PARSE:
        _, pos = read_cstring_bytes(m.body)
        return m.body[pos:]
    return None


def _wants_replica(first: Message, *, after_begin: bool = False) -> bool:
    """Opt-in read/write split: the first message of a transaction decides (after a deferred
    BEGIN: the statement that follows it)."""
    text = _statement_text(first)
    if text is None:
        return False
    if _REPLICA_COMMENT in text[:200]:
        return True
    pattern = _SET_READ_ONLY if after_begin else _READ_ONLY_START
    return pattern.match(text) is not None


def _check_cleartext(user: str, secret: str, given: str) -> bool:
    if secret.startswith("SCRAM-SHA-256$"):
        v = ScramVerifier.parse(secret)
        if v is None:
            return False
        got = ScramVerifier.from_password(given, salt=v.salt, iterations=v.iterations)
        return hmac.compare_digest(got.stored_key, v.stored_key)
    if len(secret) == 35 and secret.startswith("md5"):
        return hmac.compare_digest(md5_hash(user, given), secret)
    return hmac.compare_digest(secret.encode("utf-8"), given.encode("utf-8"))
