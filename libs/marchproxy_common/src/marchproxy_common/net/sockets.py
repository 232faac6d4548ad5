"""Accepted (and connected) sockets with a small transport each, on one epoll.

``asyncio``'s ``create_server`` spends most of a short connection's CPU in its own machinery: an
accept task per connection, a ``getsockname``/``getpeername``/``setsockopt`` per socket, a
transport built over several mixins, three ``call_soon`` before ``connection_made`` and a
waiter future, then the server's bookkeeping on close. With ``pgbench -C`` (a connection per
transaction) that was more than the DBLB's pooling itself. ``ClientListener`` accepts in a
``loop.add_reader`` callback (a batch per wake-up); its sockets wait on a ``SocketPoller`` (one
``epoll_ctl`` per socket and a dict lookup per event, no selector key or handle per socket):
the loop's own epoll when its selector is a ``PollerSelector`` (``marchproxy_common.loop.run``
makes it so; the loop's poll then handles the poller's events at once), else an epoll of its
own polled from the loop. ``SocketTransport`` is the part of an
asyncio socket transport a protocol uses: ``connection_made`` runs at once, reads go straight
to ``data_received`` (or ``get_buffer``/``buffer_updated``), a write is one ``send`` when
nothing waits, and ``close()`` closes the socket at once when nothing is left to write
(``connection_lost`` follows right after the read callback that closed it, else with
``call_soon`` as with asyncio, and the transport then lets go of its protocol). It works with
``loop.start_tls`` (TLS to clients) and ``set_protocol`` (PROXY protocol headers) like an
asyncio transport. The same protocols run on any loop: ``ClientListener`` is for the standard
selector loop; elsewhere (uvloop) ``start_client_server`` uses ``loop.create_server``.

``open_connection`` is the outbound side: a non-blocking connect (``loop.sock_connect``), then
the same transport on the same poller, for a proxy whose upstream sockets should cost no more
per request than its client sockets (the ALB: both sides on one epoll, one poll per wake-up).
The caller bounds it with ``asyncio.timeout`` as it would ``loop.create_connection``.
"""

from __future__ import annotations

import asyncio
import math
import select
import selectors
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from marchproxy_common.net.accept import ACCEPT_BATCH, Acceptor

__all__ = [
    "ClientListener",
    "PollerSelector",
    "SocketPoller",
    "SocketTransport",
    "new_poller",
    "open_connection",
    "start_client_server",
]

_log = structlog.get_logger("marchproxy.net.sockets")

#: bytes read per recv (asyncio's socket transports read 256 KiB)
READ_SIZE = 256 * 1024
#: write buffer limits (asyncio's defaults): pause_writing above HIGH, resume at LOW
HIGH_WATER = 64 * 1024
LOW_WATER = HIGH_WATER // 4

#: events handled per poll of the client epoll
POLL_BATCH = 256
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
#: what a transport's protocol is once connection_lost has been called
_DETACHED = asyncio.Protocol()
_P = TypeVar("_P", bound=asyncio.BaseProtocol)


class SocketPoller:
    """One level-triggered epoll for a service's client sockets: registering a socket is one
    ``epoll_ctl``, an event one dict lookup, with no selector key or handle per socket. On a
    loop whose selector is a ``PollerSelector`` it is the loop's own epoll, and the loop's
    poll hands our events over (one ``epoll_wait`` per wake-up); on another selector loop it is
    an epoll of its own, polled from the loop (one ``loop.add_reader`` on its descriptor).
    A loop has at most one poller on its selector (a second one gets its own epoll)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transports: dict[int, SocketTransport] = {}
        self._closing = False
        selector = getattr(loop, "_selector", None)
        if isinstance(selector, PollerSelector) and selector.poller is None:
            # the loop's own epoll: our events come with its poll (PollerSelector)
            self._selector: PollerSelector | None = selector
            self.epoll = selector.epoll
            selector.poller = self
        else:
            self._selector = None
            self.epoll = select.epoll()
            loop.add_reader(self.epoll.fileno(), self._poll)

    def _poll(self) -> None:
        transports = self.transports
        for fd, events in self.epoll.poll(0, POLL_BATCH):
            t = transports.get(fd)
            if t is None:
                continue
            if events & _READ_EVENTS and t._mask & _IN:
                t._read_ready()
            if events & _WRITE_EVENTS and t._mask & _OUT:
                t._write_ready()

    def dispatch(self, fd_events: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Handle our sockets' events of a poll of the loop's epoll; return the others."""
        transports = self.transports
        rest = []
        for fd, events in fd_events:
            t = transports.get(fd)
            if t is None:
                rest.append((fd, events))
                continue
            try:
                if events & _READ_EVENTS and t._mask & _IN:
                    t._read_ready()
                if events & _WRITE_EVENTS and t._mask & _OUT:
                    t._write_ready()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # (the transports catch their protocols' errors)
                _log.error("socket_event_failed", fd=fd, exc_info=exc)
        return rest

    def close(self) -> None:
        """Close the epoll once no socket is left on it (now, or when the last one closes)."""
        self._closing = True
        if self.transports:
            return
        if self._selector is not None:
            if self._selector.poller is self:
                self._selector.poller = None  # (the epoll is the loop's)
        elif not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()

    def forget(self, fd: int, registered: bool) -> None:
        """``fd`` is about to be closed."""
        if registered:
            self.epoll.unregister(fd)
        del self.transports[fd]
        if self._closing and not self.transports:
            self.close()


class PollerSelector(selectors.EpollSelector):
    """The standard loop's epoll selector, shared with a ``SocketPoller``: one ``epoll_wait``
    per loop iteration reports asyncio's descriptors and the poller's sockets, whose events
    are handled at once (``SocketPoller.dispatch``), with no handle of the loop's and no
    second poll. Without a poller it is asyncio's ``EpollSelector``. Give it to the loop
    (``asyncio.SelectorEventLoop(PollerSelector())``, as ``marchproxy_common.loop.run`` does);
    the poller's callbacks then run inside ``select()``, before the loop's ready handles."""

    def __init__(self) -> None:
        super().__init__()
        self.poller: SocketPoller | None = None

    @property
    def epoll(self) -> select.epoll:
        return self._selector  # type: ignore[attr-defined,no-any-return]

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        poller = self.poller
        if poller is None:
            return super().select(timeout)
        # EpollSelector.select, with the poller's events handled first
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            timeout = math.ceil(timeout * 1e3) * 1e-3  # (at least the timeout, as asyncio)
        fd_to_key = self._fd_to_key  # type: ignore[attr-defined]
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            fd_events = self.epoll.poll(timeout, len(fd_to_key) + len(poller.transports) + 1)
        except InterruptedError:
            return ready
        for fd, event in poller.dispatch(fd_events):
            key = fd_to_key.get(fd)
            if key is not None:
                events = 0
                if event & ~_IN:
                    events |= selectors.EVENT_WRITE
                if event & ~_OUT:
                    events |= selectors.EVENT_READ
                ready.append((key, events & key.events))
        return ready


class SocketTransport(asyncio.Transport):
    """A non-blocking TCP socket (accepted, or connected by ``open_connection``) on the loop's
    ``SocketPoller``."""

    _start_tls_compatible = True
    #: in the protocol's data_received/buffer_updated; a close() there leaves connection_lost
    #: to be called right after it returns (_lost_pending), not from a loop callback
    _dispatching = False
    _lost_pending = False
    # state every transport starts with (class defaults: a short connection sets fewer
    # attributes; each is set on the instance when it changes)
    _closing = False  # close() or a fatal error: no more reads or writes
    _closed = False  # the socket is closed
    _mask = 0  # events registered on the poller: _IN while reading, _OUT while writing
    _paused = False  # pause_reading() (reading resumes only on resume_reading())
    _writing_paused = False  # the protocol's pause_writing() was called
    _eof_written = False
    _high = HIGH_WATER
    _low = LOW_WATER

    def __init__(
        self,
        poller: SocketPoller,
        sock: socket.socket,
        peer: Any,
        protocol: asyncio.BaseProtocol,
        listener: ClientListener | None = None,
    ) -> None:
        self._extra = {"peername": peer, "socket": sock}
        self._poller = poller
        self._loop = poller.loop
        self._sock = sock
        self._fd = sock.fileno()
        self._listener = listener
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._buffer = bytearray()  # what the socket did not take yet

    def start(self) -> None:
        """Give the socket to its protocol and start reading (unless it paused us at once)."""
        self._poller.transports[self._fd] = self
        self._protocol.connection_made(self)
        if not self._closing and not self._paused:
            self._set_mask(self._mask | _IN)

    # ---- BaseTransport ---------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname" and "sockname" not in self._extra:
            try:
                self._extra["sockname"] = self._sock.getsockname()
            except OSError:
                return default
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer:
            self._close_socket()
            if self._dispatching:
                self._lost_pending = True  # (a loop callback less per short connection)
            else:
                self._loop.call_soon(self._call_connection_lost, None)
        # else: _write_ready closes once the buffer is written

    def abort(self) -> None:
        self._force_close(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ---- reading ---------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return bool(self._mask & _IN)

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._set_mask(self._mask | _IN)

    def _stop_reading(self) -> None:
        if self._mask & _IN:
            self._set_mask(self._mask & ~_IN)

    def _set_mask(self, mask: int) -> None:
        """Register what we wait for (a socket waiting for nothing is not registered: epoll
        reports hang-ups and errors whatever the mask)."""
        old, self._mask = self._mask, mask
        if not old:
            self._poller.epoll.register(self._fd, mask)
        elif not mask:
            self._poller.epoll.unregister(self._fd)
        else:
            self._poller.epoll.modify(self._fd, mask)

    def _read_ready(self) -> None:
        if self._buffered:
            self._read_into_buffer()
            return
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc)
            return
        if not data:
            self._eof()
            return
        self._dispatching = True
        try:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc)
        self._dispatching = False
        if self._lost_pending:
            self._lost_after_dispatch()

    def _read_into_buffer(self) -> None:
        protocol = self._protocol
        assert isinstance(protocol, asyncio.BufferedProtocol)
        try:
            buf = memoryview(protocol.get_buffer(-1))
            if not buf.nbytes:
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc)
            return
        try:
            n = self._sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc)
            return
        if not n:
            self._eof()
            return
        self._dispatching = True
        try:
            protocol.buffer_updated(n)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc)
        self._dispatching = False
        if self._lost_pending:
            self._lost_after_dispatch()

    def _eof(self) -> None:
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc)
            return
        if keep_open:
            self._stop_reading()  # half-closed: nothing more to read
        else:
            self.close()

    # ---- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._set_mask(self._mask | _OUT)
        self._buffer += data
        if not self._writing_paused and len(self._buffer) > self._high:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def _write_ready(self) -> None:
        try:
            n = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._set_mask(self._mask & ~_OUT)
            self._buffer.clear()
            self._fatal_error(exc)
            return
        if n:
            del self._buffer[:n]
        if self._writing_paused and len(self._buffer) <= self._low:
            self._writing_paused = False
            self._call_protocol("resume_writing")
        if self._buffer:
            return
        self._set_mask(self._mask & ~_OUT)
        if self._closing:
            self._close_socket()
            self._call_connection_lost(None)
        elif self._eof_written:
            self._shutdown_write()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        if not self._buffer:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    # ---- teardown --------------------------------------------------------------------------

    def _fatal_error(self, exc: BaseException) -> None:
        if not isinstance(exc, OSError):
            _log.error("client_transport_error", error=repr(exc), exc_info=exc)
        self._force_close(exc if isinstance(exc, Exception) else None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._buffer.clear()
        self._closing = True
        self._close_socket()  # (closed <=> connection_lost called or scheduled)
        self._loop.call_soon(self._call_connection_lost, exc)

    def _close_socket(self) -> None:
        if not self._closed:
            self._closed = True
            self._poller.forget(self._fd, registered=bool(self._mask))
            self._mask = 0
            self._sock.close()
            if self._listener is not None:
                self._listener.connections -= 1

    def _lost_after_dispatch(self) -> None:
        """The protocol closed us from its read callback: tell it now that it returned (as
        asyncio's ``call_soon`` would, without the trip through the loop)."""
        self._lost_pending = False
        try:
            self._call_connection_lost(None)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            _log.error("client_protocol_callback_failed", callback="connection_lost", exc_info=exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            # a protocol usually keeps its transport: without this, each connection's
            # protocol, transport and socket are a cycle, freed only by the cyclic collector
            # (asyncio's transports drop their protocol here too)
            self._protocol = _DETACHED

    def _call_protocol(self, method: str) -> None:
        try:
            getattr(self._protocol, method)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            _log.error("client_protocol_callback_failed", callback=method, exc_info=exc)


class ClientListener:
    """Listening sockets (``net.accept.Acceptor``) whose connections each get a
    ``SocketTransport`` and a protocol from ``factory``; the ``asyncio.Server`` calls a service
    uses (``sockets``, ``close``, ``is_serving``, ``wait_closed``). ``name`` labels its logs;
    ``accept_batch``: connections accepted per wake-up at most (``net.accept.Acceptor``)."""

    def __init__(
        self,
        poller: SocketPoller,
        sockets: list[socket.socket],
        factory: ProtocolFactory,
        *,
        name: str,
        accept_batch: int = ACCEPT_BATCH,
    ) -> None:
        self._poller = poller
        self.sockets = sockets
        self._factory = factory
        self._acceptor = Acceptor(sockets, self._accepted, name=name, batch=accept_batch)
        #: accepted sockets not yet closed
        self.connections = 0

    def start(self) -> None:
        self._acceptor.start()

    def is_serving(self) -> bool:
        return self._acceptor.accepting

    def close(self) -> None:
        """Stop accepting and close the listening sockets (connections accepted so far are
        their protocols' already: nothing accepted is dropped)."""
        self._acceptor.close()

    async def wait_closed(self) -> None:
        return None

    def _accepted(self, sock: socket.socket, peer: Any) -> None:
        self.connections += 1
        transport = None
        try:
            transport = SocketTransport(self._poller, sock, peer, self._factory(), self)
            transport.start()
            if transport._mask & _IN:
                # a client usually speaks first, and its first bytes are often here by
                # now: read them without waiting for the next poll (libpq blocks on
                # each step of a login, so every wake-up saved is latency saved)
                transport._read_ready()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            _log.error("client_setup_failed", exc_info=exc)
            if transport is None:
                self.connections -= 1
                sock.close()
            else:
                transport.abort()  # (closes the socket and counts it once)


def bind_sockets(host: str, port: int, *, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (as ``loop.create_server`` binds)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # port 0: every address on the port the first one got
            sock.bind((address[0], port, *address[2:]))
            sock.listen(backlog)
            port = port or sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def start_client_server(
    factory: ProtocolFactory,
    host: str,
    port: int,
    *,
    backlog: int,
    reuse_port: bool,
    poller: SocketPoller | None,
    name: str,
    accept_batch: int = ACCEPT_BATCH,
) -> ClientListener | asyncio.Server:
    """Listen on ``host:port`` for clients of ``factory``'s protocols: a ``ClientListener`` on
    ``poller`` (``accept_batch``: see ``net.accept.Acceptor``), or ``loop.create_server``
    without one (a loop other than the standard selector loop, such as uvloop, where
    ``new_poller`` gives None)."""
    if poller is None:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            factory, host, port, backlog=backlog, reuse_port=True if reuse_port else None
        )
    listener = ClientListener(
        poller,
        bind_sockets(host, port, backlog=backlog, reuse_port=reuse_port),
        factory,
        name=name,
        accept_batch=accept_batch,
    )
    listener.start()
    return listener


async def open_connection(
    poller: SocketPoller, factory: Callable[[], _P], host: str, port: int
) -> tuple[SocketTransport, _P]:
    """Connect to ``host:port`` (each resolved address in turn, as ``loop.create_connection``;
    an IP literal is not resolved) and give the socket, non-blocking with TCP_NODELAY, to a
    ``SocketTransport`` on ``poller`` with ``factory()``'s protocol (``connection_made`` has run
    when this returns). Raises the last ``OSError`` when every address fails; a cancellation
    (the caller's timeout) closes the socket being connected."""
    loop = poller.loop
    addresses = _literal_address(host, port)
    if addresses is None:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [(family, proto, address) for family, _, proto, _, address in infos]
        if not addresses:
            raise OSError(f"getaddrinfo({host!r}) returned nothing")
    error: OSError | None = None
    for family, proto, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        break
    else:
        assert error is not None
        raise error
    try:
        protocol = factory()
        transport = SocketTransport(poller, sock, address, protocol)
    except BaseException:
        sock.close()
        raise
    try:
        transport.start()
    except BaseException:
        transport.abort()  # (closes the socket; connection_lost follows, as for clients)
        raise
    return transport, protocol


def _literal_address(host: str, port: int) -> list[tuple[int, int, Any]] | None:
    """``host`` as a connectable address when it is an IP literal, else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        address = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
        return [(family, socket.IPPROTO_TCP, address)]
    return None


def new_poller() -> SocketPoller | None:
    """A poller on the running loop if it is the standard selector loop, else None."""
    loop = asyncio.get_running_loop()
    return SocketPoller(loop) if isinstance(loop, asyncio.SelectorEventLoop) else None
