"""Hand an accepted client connection to a co-located module (the NLB leaves the data path).

Instead of relaying, the NLB sends the client's socket descriptor, the bytes it already read
(sniffed) and the client address over a Unix socket (SCM_RIGHTS); the module adopts the socket
with ``loop.connect_accepted_socket`` and talks to the client directly.

API (stable):

- NLB side: ``ConnectionHandoff(path)``; ``await send(sock, first_bytes=..., client=(ip, port),
  port=N)`` (opens the channel on first use; one message at a time; raises ``FdPassError`` /
  ``OSError`` if the module is gone, so the caller can fall back to relaying). ``port`` is the
  module's data port the connection would have been relayed to: it picks the module's
  listener (plain or TLS, say). ``sock`` is anything with ``fileno()``, e.g.
  ``transport.get_extra_info("socket")``. Before sending, pause reading on the transport and
  pass every byte read so far as ``first_bytes``; after ``send`` returns, drop the NLB's copy
  with ``transport.abort()`` (the connection stays open: the module holds the other
  descriptor). ``await close()``. With ``expect=ID`` the channel is used only when the module
  that answers on ``path`` greets as instance ``ID`` (``FdPassError`` otherwise): a path names
  a socket on the NLB's own host, and another host's instance may advertise the same path.
- Module side: ``HandoffReceiver(path, factories, identity=...)`` (``identity``: a callable
  returning the instance id it greets each new channel with) with one protocol factory, or a mapping
  from data port to factory (a connection for a port not listed is closed and counted in
  ``errors``); ``await start()`` / ``await close()``. Each adopted connection gets a fresh
  protocol, given the factory's protocol as a PROXY-protocol-aware listener would: the client
  address is recorded before its ``connection_made`` (``net.proxied.client_address(transport)``
  returns it) and ``first_bytes`` are fed to it before anything read from the socket. The
  factories must not strip a PROXY header themselves. ``adopted`` counts connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from collections.abc import Callable, Mapping
from typing import Final, cast

import structlog

from marchproxy_common.net.fdpass import FdPassError, SupportsFileno, recv_sockets, send_sockets
from marchproxy_common.net.proxied import _feed, remember_proxy_header
from marchproxy_common.tasks import cancel_and_wait, spawn
from marchproxy_common.wire.proxy_protocol import Command, Family, ProxyHeader, Transport

__all__ = ["HANDOFF_LABEL", "MAX_FIRST_BYTES", "ConnectionHandoff", "HandoffReceiver"]

_log = structlog.get_logger("marchproxy.handoff")

MAX_FIRST_BYTES: Final = 32 * 1024  # sniffed bytes carried with a hand-over (JSON, base64)
#: registration label under which a module advertises its hand-over socket to the NLB
HANDOFF_LABEL: Final = "handoff_path"


class ConnectionHandoff:
    """NLB side: one persistent channel to one module instance."""

    def __init__(self, path: str, *, expect: str | None = None) -> None:
        self.path = path
        self.expect = expect
        self._conn: socket.socket | None = None
        self._lock = asyncio.Lock()
        self.sent = 0

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            await loop.sock_connect(conn, self.path)
            greeting, socks = await recv_sockets(conn)
            for s in socks:
                s.close()
            instance = greeting.get("instance")
            if self.expect is not None and instance != self.expect:
                raise FdPassError(f"{self.path} is instance {instance!r}, not {self.expect!r}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def send(
        self,
        sock: SupportsFileno,
        *,
        first_bytes: bytes,
        client: tuple[str, int],
        port: int = 0,
    ) -> None:
        if len(first_bytes) > MAX_FIRST_BYTES:
            raise FdPassError(f"more than {MAX_FIRST_BYTES} first bytes")
        meta = {
            "client": [client[0], client[1]],
            "first": base64.b64encode(first_bytes).decode("ascii"),
            "port": port,
        }
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()
            try:
                await send_sockets(self._conn, [sock], meta)
            except BaseException:
                self._conn.close()
                self._conn = None
                raise
            self.sent += 1

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class HandoffReceiver:
    """Module side: adopts client sockets sent to ``path``."""

    def __init__(
        self,
        path: str,
        factories: ProtocolFactory | Mapping[int, ProtocolFactory],
        *,
        identity: Callable[[], str] = str,
        on_adopted: Callable[[asyncio.BaseTransport], None] | None = None,
    ) -> None:
        self.path = path
        self._factories = factories
        self._identity = identity
        self._on_adopted = on_adopted
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.adopted = 0
        self.errors = 0

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        # a raw socket, not start_unix_server: a stream transport could read a message first
        # and a plain recv() would silently drop the descriptors it carries
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._tasks.add(spawn(self._accept_loop(listener), name=f"handoff-accept {self.path}"))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = spawn(self._channel(conn), name=f"handoff-channel {self.path}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _channel(self, conn: socket.socket) -> None:
        try:
            try:  # who answers on this path: the NLB checks it before sending a connection
                await send_sockets(conn, [], {"instance": self._identity()})
            except OSError:
                return
            while True:
                try:
                    meta, socks = await recv_sockets(conn)
                except FdPassError:
                    return  # channel closed (or broken): the NLB reconnects
                for sock in socks:
                    await self._adopt(sock, meta)
        finally:
            conn.close()

    def _factory_for(self, port: object) -> ProtocolFactory | None:
        if not isinstance(self._factories, Mapping):
            return self._factories
        return self._factories.get(port) if isinstance(port, int) else None

    async def _adopt(self, sock: socket.socket, meta: dict[str, object]) -> None:
        loop = asyncio.get_running_loop()
        try:
            client = meta.get("client")
            first_raw = meta.get("first", "")
            if not (isinstance(client, list) and len(client) == 2 and isinstance(first_raw, str)):
                raise FdPassError("bad hand-over metadata")
            factory = self._factory_for(meta.get("port"))
            if factory is None:
                raise FdPassError(f"no listener for port {meta.get('port')!r}")
            first = base64.b64decode(first_raw, validate=True)
            address = (str(client[0]), int(str(client[1])))
            sock.setblocking(False)
            transport, _ = await loop.connect_accepted_socket(
                lambda: _Adopted(factory, address, first), sock
            )
        except (OSError, ValueError, FdPassError) as exc:
            self.errors += 1
            _log.warning("handoff_adopt_failed", path=self.path, error=str(exc))
            sock.close()
            return
        self.adopted += 1
        if self._on_adopted is not None:
            self._on_adopted(transport)

    async def close(self) -> None:
        tasks = list(self._tasks)
        self._tasks.clear()
        await cancel_and_wait(*tasks)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class _Adopted(asyncio.Protocol):
    """Stands in for the module's protocol only during ``connection_made``: records the client
    address, then puts the real protocol on the transport and feeds it the first bytes (no
    per-read cost afterwards, as with a PROXY header)."""

    def __init__(self, factory: ProtocolFactory, client: tuple[str, int], first: bytes) -> None:
        self._factory, self._client, self._first = factory, client, first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        local = transport.get_extra_info("sockname")
        remember_proxy_header(
            transport,
            ProxyHeader(
                2,
                Command.PROXY,
                Family.INET6 if ":" in self._client[0] else Family.INET,
                Transport.STREAM,
                self._client,
                (str(local[0]), int(local[1])) if isinstance(local, tuple) else None,
            ),
        )
        inner = self._factory()
        transport.set_protocol(inner)
        inner.connection_made(transport)
        if self._first and not cast(asyncio.Transport, transport).is_closing():
            _feed(inner, self._first)
