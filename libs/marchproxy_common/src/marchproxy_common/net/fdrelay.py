"""Byte relay between pairs of connected TCP sockets on an edge-triggered epoll of its own.

A relay built from asyncio transports (``net.relay``) spends most of a short connection's CPU
in asyncio's machinery rather than in the kernel: a transport, a protocol and their callbacks
per side, a task and futures per connect, a selector update per pause and resume. Here one
``select.epoll`` per event loop is polled from the loop (``loop.add_reader`` on the epoll's
descriptor), both sockets of a pair are registered once, edge-triggered, and an event costs one
dict lookup and the ``recv``/``send`` calls themselves. Linux only (epoll).

API (stable):

- ``FdRelayEngine(loop, *, bulk_after=BULK_AFTER, splice_after=None)`` (``engine.loop``);
  ``close()`` closes every pair and the epoll.
- ``await engine.connect(host, port, *, connect_timeout) -> socket`` connects a non-blocking
  TCP socket (TCP_NODELAY; a host name is resolved first) and returns it connected; ``OSError``
  or ``TimeoutError`` otherwise (the socket is closed then; the timeout is kept to within
  ``CONNECT_SWEEP``). Until ``join`` it is the caller's. ``start_connect(host, port, *,
  connect_timeout, callback)`` does the same with ``callback(sock | None, exc | None)``, for a
  caller that has no task to wait in.
- ``engine.join(client, upstream, *, first=b"", client_eof=False, idle_timeout=None,
  on_close=None) -> FdRelay`` takes both sockets (they are the engine's from now on), writes
  ``first`` to ``upstream`` before anything read from ``client``, and relays both ways.
  ``client_eof``: the client already half-closed (passed on after ``first``).
- ``watch(sock, on_readable)`` / ``unwatch(sock, forget=False)``: readiness callbacks for a
  socket read before it joins (a client being sniffed); ``join`` keeps its registration.
- ``FdRelay``: ``bytes_up`` (read from the client, ``first`` not included), ``bytes_down``,
  ``stats()``, ``closed``, ``close(reason)`` (FIN) and ``abort(reason)`` (RST);
  ``on_close(relay)`` runs once when the pair is gone (maybe inside ``join``, when a socket
  failed at once); ``relay.stats().reason`` is ``"eof"``, ``"idle"``, ``"error"`` or the one
  given.

Buffers: a read lands in one ``CHUNK`` (256 KiB) buffer the engine shares between all pairs
and is sent on at once; what a peer does not take is copied out and waits. A direction that
has moved ``bulk_after`` bytes (``BULK_AFTER``, 1 MiB; None: never) is a bulk one and gets a
``BULK_CHUNK`` (1 MiB) buffer of its own: a read four times the size and no copy of what
waits (its pages are touched only as far as reads reach). Measured with iperf3 through the
NLB (benchmarks/nlb), this moves more per CPU second than the shared buffer and than
splice(2): ``splice_after`` (None: never) instead gives a direction that has moved that many
bytes a pipe, socket -> pipe -> socket, as HAProxy's ``option splice-auto`` does; on the
kernels we measured it cost more CPU per GB than the bulk buffer, so it is off by default.
Flow control: a side is read only while nothing is waiting to be written to its peer (at most
one read per direction) and epoll is asked for writability; reading that direction resumes
once it is written, so a slow reader holds the sender in the kernel's buffers, not in ours.
Half-close: EOF from a side is passed on with ``shutdown(SHUT_WR)`` once its bytes are
written; the pair closes when both directions saw EOF. Idle timeout: one timer per engine
checks every quarter of the shortest timeout which pairs saw no bytes for their whole timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

import structlog

from marchproxy_common.net.relay import (
    IDLE_CHECKS_PER_TIMEOUT,
    RelayStats,
    address_family,
    stream_addresses,
)
from marchproxy_common.tasks import spawn

__all__ = [
    "BULK_AFTER",
    "BULK_CHUNK",
    "CHUNK",
    "CONNECT_SWEEP",
    "FdRelay",
    "FdRelayEngine",
]

_log = structlog.get_logger("marchproxy.fdrelay")

CHUNK: Final = 256 * 1024  # one read; also the most a direction holds in user space
_IN: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HUP: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_IN_OUT: Final = _IN | select.EPOLLOUT
_CONNECTING: Final = select.EPOLLOUT | select.EPOLLET
_MAX_EVENTS: Final = 1024
CONNECT_SWEEP: Final = 0.05  # seconds between checks of connect deadlines (their precision)
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: bytes one direction moves through the engine's shared buffer before it gets its own
BULK_AFTER: Final = 1 << 20
BULK_CHUNK: Final = 1 << 20  # a bulk direction's own buffer: one read
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_IN_PIPE: Final = memoryview(b"")  # ``_Side.out`` when what waits for a side is in a pipe


def _connect_error(err: int, where: str) -> OSError:
    return OSError(err, f"connect to {where}: {os.strerror(err)}")


ConnectCallback = Callable[[socket.socket | None, BaseException | None], None]


class _Connect:
    __slots__ = ("callback", "deadline", "sock", "where")

    def __init__(
        self, sock: socket.socket, deadline: float, callback: ConnectCallback, where: str
    ) -> None:
        self.sock, self.deadline, self.callback, self.where = sock, deadline, callback, where


class _Side:
    __slots__ = (
        "buf",
        "drain",
        "eof",
        "fd",
        "hup",
        "in_pipe",
        "out",
        "peer",
        "pipe",
        "read",
        "relay",
        "sock",
    )

    def __init__(self, relay: FdRelay, sock: socket.socket) -> None:
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: _Side = self
        #: read from the peer, not yet written here (``_IN_PIPE``: waiting in the peer's pipe)
        self.out: memoryview | None = None
        self.eof = False  # this side sent EOF (read)
        self.hup = False  # epoll said it did (or failed): read until recv says so
        self.drain = False  # the next read goes on until recv says EAGAIN (events were missed)
        self.read = 0  # bytes read from this side
        #: (read end, write end, capacity) once this side's bytes go by splice(2)
        self.pipe: tuple[int, int, int] | None = None
        self.in_pipe = 0  # of this side's bytes, how many are in its pipe
        #: this side's own read buffer once it is a bulk one (what its peer did not take
        #: waits in it, uncopied)
        self.buf: memoryview | None = None


class FdRelay:
    __slots__ = (
        "_engine",
        "_on_close",
        "_reason",
        "_started",
        "client",
        "idle_timeout",
        "last_active",
        "upstream",
    )

    def __init__(
        self,
        engine: FdRelayEngine,
        client: socket.socket,
        upstream: socket.socket,
        idle_timeout: float | None,
        on_close: Callable[[FdRelay], None] | None,
    ) -> None:
        self._engine = engine
        self.client = _Side(self, client)
        self.upstream = _Side(self, upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.idle_timeout = idle_timeout
        self._on_close = on_close
        self._reason: str | None = None
        self._started = time.monotonic()
        self.last_active = engine.loop.time()

    @property
    def bytes_up(self) -> int:
        return self.client.read

    @property
    def bytes_down(self) -> int:
        return self.upstream.read

    @property
    def closed(self) -> bool:
        return self._reason is not None

    def stats(self) -> RelayStats:
        duration = time.monotonic() - self._started
        return RelayStats(self.bytes_up, self.bytes_down, duration, self._reason or "open")

    def close(self, reason: str = "closed") -> None:
        self._engine._finish(self, reason, reset=False)

    def abort(self, reason: str = "aborted") -> None:
        self._engine._finish(self, reason, reset=True)


class FdRelayEngine:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        bulk_after: int | None = BULK_AFTER,
        splice_after: int | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.splice_after = splice_after
        self.bulk_after = bulk_after
        self._epoll = select.epoll()
        self._sides: dict[int, _Side] = {}
        # every read lands here and is sent on at once (only what a peer does not take is
        # copied out): no allocation per read
        self._view = memoryview(bytearray(CHUNK))
        self._connecting: dict[int, _Connect] = {}
        #: fd -> (socket, callback) of watched sockets; callback None once unwatched (the
        #: socket stays registered until it is joined or closed)
        self._watched: dict[int, tuple[socket.socket, Callable[[], None] | None]] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None
        self.relays: set[FdRelay] = set()
        self.now = self.loop.time()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_every = 0.0
        self.loop.add_reader(self._epoll.fileno(), self._poll)

    # -- public
    def start_connect(
        self, host: str, port: int, *, connect_timeout: float, callback: ConnectCallback
    ) -> None:
        """``connect`` without a task or future: ``callback(sock, None)`` once connected,
        ``callback(None, exc)`` (``OSError``, ``TimeoutError``) if not; never before this
        returns. An address costs no timer of its own (``_sweep``); a name is resolved in a
        task."""
        family = address_family(host)
        if not family:
            spawn(self._connect_by_name(host, port, connect_timeout, callback), name="connect")
            return
        deadline = self.loop.time() + connect_timeout
        where = f"{host}:{port}"
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self.loop.call_soon(callback, None, exc)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((host, port))
            if err == errno.EINPROGRESS:
                fd = sock.fileno()
                # stays registered (its events are ignored) until join modifies it or the
                # socket is closed, which takes it out of the epoll (it has no duplicates)
                self._epoll.register(fd, _CONNECTING)
                self._connecting[fd] = _Connect(sock, deadline, callback, where)
                if self._sweep_handle is None:
                    self._sweep_handle = self.loop.call_later(CONNECT_SWEEP, self._sweep)
                return
        except OSError as exc:
            sock.close()
            self.loop.call_soon(callback, None, exc)
            return
        if err:
            sock.close()
            self.loop.call_soon(callback, None, _connect_error(err, where))
        else:
            self.loop.call_soon(callback, sock, None)

    async def connect(self, host: str, port: int, *, connect_timeout: float) -> socket.socket:
        """A connected non-blocking TCP socket (TCP_NODELAY); a name is resolved first and
        its addresses tried in turn."""
        family = address_family(host)
        if family:
            return await self._connect_address(host, port, connect_timeout)
        deadline = self.loop.time() + connect_timeout
        async with asyncio.timeout_at(deadline):
            addresses = await stream_addresses(self.loop, host, port)
        last: OSError = OSError(errno.EADDRNOTAVAIL, f"could not resolve {host}")
        for _, address in addresses:
            try:
                left = max(0.0, deadline - self.loop.time())
                return await self._connect_address(address, port, left)
            except OSError as exc:
                last = exc
        raise last

    async def _connect_address(self, host: str, port: int, connect_timeout: float) -> socket.socket:
        fut: asyncio.Future[socket.socket] = self.loop.create_future()

        def done(sock: socket.socket | None, exc: BaseException | None) -> None:
            if fut.cancelled():  # our caller gave up
                if sock is not None:
                    sock.close()
            elif sock is not None:
                fut.set_result(sock)
            else:
                fut.set_exception(exc or OSError("connect failed"))

        self.start_connect(host, port, connect_timeout=connect_timeout, callback=done)
        return await fut

    async def _connect_by_name(
        self, host: str, port: int, connect_timeout: float, callback: ConnectCallback
    ) -> None:
        try:
            sock = await self.connect(host, port, connect_timeout=connect_timeout)
        except (OSError, TimeoutError) as exc:
            callback(None, exc)
            return
        callback(sock, None)

    def watch(self, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable()`` whenever ``sock`` gets bytes or an EOF (edge-triggered: each
        call reads until ``recv`` raises BlockingIOError, or stops wanting bytes). For a client
        read before it joins (sniffed): cheaper than ``loop.add_reader``, and ``join`` keeps
        the registration."""
        fd = sock.fileno()
        self._watched[fd] = (sock, on_readable)
        try:
            self._epoll.register(fd, _IN)
        except FileExistsError:  # an unwatched socket watched again
            self._epoll.modify(fd, _IN)

    def unwatch(self, sock: socket.socket, *, forget: bool = False) -> None:
        """No more ``on_readable`` calls. The socket stays registered for ``join``; with
        ``forget`` (it is about to be closed) it is let go of entirely."""
        fd = sock.fileno()
        entry = self._watched.get(fd)
        if entry is None or entry[0] is not sock:
            return
        if forget:
            del self._watched[fd]
            if not self._epoll.closed:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
        else:
            self._watched[fd] = (sock, None)

    def join(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        first: bytes = b"",
        client_eof: bool = False,
        idle_timeout: float | None = None,
        on_close: Callable[[FdRelay], None] | None = None,
    ) -> FdRelay:
        relay = FdRelay(self, client, upstream, idle_timeout, on_close)
        self.relays.add(relay)
        c, u = relay.client, relay.upstream
        self._sides[c.fd] = c
        self._sides[u.fd] = u
        watched = self._watched.pop(c.fd, None)
        try:
            if watched is not None and watched[0] is client:
                c.drain = True  # registered while watched: edges since then went unheard
            else:
                self._epoll.register(c.fd, _IN)
            try:
                self._epoll.modify(u.fd, _IN)  # registered by connect
            except FileNotFoundError:
                self._epoll.register(u.fd, _IN)
        except OSError:
            relay.abort("error")
            return relay
        c.eof = client_eof
        if first and not self._write(u, first):
            pass  # the rest follows from _flush (EOF, the client's next bytes)
        elif client_eof:
            self._pass_eof(c)
        elif c.drain:
            self._read(c)
        if idle_timeout:
            self._watch_idle(idle_timeout)
        return relay

    def close(self) -> None:
        for relay in list(self.relays):
            relay.abort("closed")
        for pending in list(self._connecting.values()):
            pending.sock.close()
            pending.callback(None, ConnectionAbortedError("relay engine closed"))
        self._connecting.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if not self._epoll.closed:
            self.loop.remove_reader(self._epoll.fileno())
            self._epoll.close()

    # -- connect
    # -- events
    def _poll(self) -> None:
        self.now = self.loop.time()
        sides = self._sides
        try:
            events = self._epoll.poll(0, _MAX_EVENTS)
        except InterruptedError:
            return
        for fd, ev in events:
            side = sides.get(fd)
            if side is None:
                # callers' code: a failure there must not drop the rest of this batch (its
                # edges would not come again)
                try:
                    watched = self._watched.get(fd)
                    if watched is not None:
                        if watched[1] is not None:
                            watched[1]()
                        continue
                    pending = self._connecting.pop(fd, None)
                    if pending is not None:
                        self._connected(pending)
                except Exception:
                    _log.exception("fdrelay_callback_failed", fd=fd)
                continue
            if ev & _HUP:
                side.hup = True  # edge-triggered: this is said once, maybe while paused
            if ev & select.EPOLLOUT and side.out is not None:
                self._flush(side)
            if ev & ~select.EPOLLOUT and side.relay._reason is None:
                self._read(side)

    def _read(self, src: _Side) -> None:
        dst = src.peer
        if dst.out is not None or src.eof:
            return  # paused until dst takes what it has (then _flush reads on)
        relay = src.relay
        relay.last_active = self.now
        drain = src.hup or src.drain
        src.drain = False
        if src.pipe is not None or (
            self.splice_after is not None and src.read >= self.splice_after and self._pipe(src)
        ):
            self._splice(src, drain)
            return
        view = src.buf
        if view is None:
            bulk_after = self.bulk_after
            if bulk_after is not None and src.read >= bulk_after:
                # an anonymous mapping, not a bytearray (which zeroes, so touches, all of
                # it): pages are touched only as far as reads reach, and unmapped with it
                view = src.buf = memoryview(mmap.mmap(-1, BULK_CHUNK))
            else:
                view = self._view
        shared = view is self._view
        size = len(view)
        while True:
            try:
                n = src.sock.recv_into(view)
            except BlockingIOError:
                return
            except OSError:
                relay.abort("error")
                return
            if not n:
                src.eof = True
                self._pass_eof(src)
                return
            src.read += n
            if not self._write(dst, view[:n], borrowed=shared):
                return  # paused (or failed)
            if n < size and not drain:
                return  # drained: a short read empties the socket; new bytes raise an event

    def _pipe(self, src: _Side) -> bool:
        """Give ``src`` a pipe: a direction that moved ``splice_after`` bytes is a bulk one,
        and splice(2) moves its bytes socket -> pipe -> socket without copying them into
        Python (half the CPU per byte). False when no pipe can be had (keeps recv/send)."""
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            # out of descriptors: stop trying on every read (bulk goes on by recv/send)
            _log.warning("fdrelay_splice_off", error=str(exc))
            self.splice_after = None
            return False
        try:
            size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:
            size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        src.pipe = (r, w, size)
        return True

    def _splice(self, src: _Side, drain: bool) -> None:
        """Move ``src``'s bytes through its (empty) pipe to its peer until ``src`` is drained,
        its peer is full (then ``_flush`` goes on) or either side ends."""
        assert src.pipe is not None
        w, size = src.pipe[1], src.pipe[2]
        while True:
            try:
                n = os.splice(src.fd, w, size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError:
                src.relay.abort("error")
                return
            if not n:
                src.eof = True
                self._pass_eof(src)
                return
            src.read += n
            src.in_pipe = n
            if not self._drain_pipe(src):
                return  # paused (or failed)
            if n < size and not drain:
                return  # drained, as for recv

    def _drain_pipe(self, src: _Side) -> bool:
        """Splice what waits in ``src``'s pipe to its peer. True when the pipe is empty."""
        assert src.pipe is not None
        dst, r = src.peer, src.pipe[0]
        while src.in_pipe:
            try:
                src.in_pipe -= os.splice(r, dst.fd, src.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                dst.out = _IN_PIPE
                try:
                    self._epoll.modify(dst.fd, _IN_OUT)
                except OSError:
                    src.relay.abort("error")
                return False
            except OSError:
                src.relay.abort("error")
                return False
        return True

    def _write(self, dst: _Side, data: bytes | memoryview, *, borrowed: bool = False) -> bool:
        """Send to ``dst``; keep what it did not take (a copy when ``data`` is ``borrowed``:
        the engine's read buffer). True when all of it went."""
        try:
            sent = dst.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            dst.relay.abort("error")
            return False
        if sent == len(data):
            return True
        dst.out = memoryview(bytes(data[sent:]) if borrowed else data[sent:])
        try:
            self._epoll.modify(dst.fd, _IN_OUT)
        except OSError:
            dst.relay.abort("error")
        return False

    def _flush(self, dst: _Side) -> None:
        out = dst.out
        assert out is not None
        dst.out = None
        dst.relay.last_active = self.now
        if not (self._drain_pipe(dst.peer) if out is _IN_PIPE else self._write(dst, out)):
            return
        try:
            self._epoll.modify(dst.fd, _IN)
        except OSError:
            dst.relay.abort("error")
            return
        src = dst.peer
        if src.eof:
            self._pass_eof(src)
        else:
            self._read(src)  # edge-triggered: what arrived while paused raised no new event

    def _pass_eof(self, src: _Side) -> None:
        dst = src.peer
        if dst.out is not None:
            return  # after its bytes (_flush)
        if dst.eof:
            self._finish(src.relay, "eof", reset=False)
            return
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(src.relay, "error", reset=False)

    def _finish(self, relay: FdRelay, reason: str, *, reset: bool) -> None:
        if relay._reason is not None:
            return
        relay._reason = reason
        self.relays.discard(relay)
        for side in (relay.client, relay.upstream):
            self._sides.pop(side.fd, None)
            side.out = side.buf = None
            with contextlib.suppress(OSError):
                self._epoll.unregister(side.fd)
            if reset:
                with contextlib.suppress(OSError):
                    side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            side.sock.close()
            if side.pipe is not None:
                os.close(side.pipe[0])
                os.close(side.pipe[1])
                side.pipe = None
        if relay._on_close is not None:
            relay._on_close(relay)

    def _connected(self, pending: _Connect) -> None:
        sock = pending.sock
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            sock.close()
            pending.callback(None, _connect_error(err, pending.where))
        else:
            pending.callback(sock, None)

    def _sweep(self) -> None:
        """Fail the connects past their deadline: one timer for all of them, not one each (a
        connect on the same host is usually over within the loop iteration)."""
        self._sweep_handle = None
        if not self._connecting:
            return
        now = self.loop.time()
        for fd, pending in list(self._connecting.items()):
            if pending.deadline <= now:
                del self._connecting[fd]
                pending.sock.close()
                pending.callback(None, TimeoutError(f"connect to {pending.where} timed out"))
        if self._connecting:
            self._sweep_handle = self.loop.call_later(CONNECT_SWEEP, self._sweep)

    # -- idle
    def _watch_idle(self, timeout: float) -> None:
        every = timeout / IDLE_CHECKS_PER_TIMEOUT
        if self._idle_handle is not None and every >= self._idle_every:
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_every = every
        self._idle_handle = self.loop.call_later(every, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_handle = None
        now = self.now = self.loop.time()
        shortest = 0.0
        for relay in list(self.relays):
            timeout = relay.idle_timeout
            if not timeout:
                continue
            if now - relay.last_active >= timeout:
                relay.close("idle")
            elif not shortest or timeout < shortest:
                shortest = timeout
        if shortest:
            self._idle_every = shortest / IDLE_CHECKS_PER_TIMEOUT
            self._idle_handle = self.loop.call_later(self._idle_every, self._check_idle)
