"""Bidirectional byte relay between two asyncio transports, built on Protocols (not streams).

API (stable):

- ``Relay(*, idle_timeout=None, high_water=DEFAULT_HIGH_WATER, low_water=None, on_close=None)``
  pairs two ``RelaySide`` protocols: ``relay.downstream`` (the client) and ``relay.upstream``.
  Each chunk a side receives is written straight to the other side's transport (one attribute
  load, one counter add, one ``write``: no per-chunk timers, tasks or copies).
- Flow control: both transports get ``set_write_buffer_limits(high_water, low_water)``; when one
  side's ``pause_writing()`` fires, the other side's transport stops reading until
  ``resume_writing()``. A relay's buffered bytes per direction therefore stay below
  ``high_water`` plus one read (asyncio reads at most 256 KiB at a time).
- Half-close: EOF from one side is passed on with ``write_eof()`` and the other direction stays
  open; the relay closes once both directions saw EOF (or at once if a transport cannot
  half-close, e.g. TLS). A lost connection closes the other side after its pending writes.
- Idle timeout: one timer per relay that checks every ``idle_timeout / IDLE_CHECKS_PER_TIMEOUT``
  whether the byte counters moved; it closes the pair after ``idle_timeout`` (up to one check
  interval later) without traffic in either direction.
- ``on_close(stats: RelayStats)`` runs once when both sides are gone: ``bytes_up``
  (downstream → upstream), ``bytes_down``, ``duration`` (seconds) and ``reason``
  (``"eof"``, ``"idle"``, ``"error"``, ``"closed"`` or the reason given to ``close``).

Wiring (what the NLB does):

    relay = Relay(idle_timeout=300, on_close=record)
    await relay.connect_upstream(host, port, connect_timeout=5, first_bytes=proxy_v2 + sniffed)
    relay.attach_downstream(client_transport)   # set_protocol + connection_made + resume_reading

uvloop ignores ``pause_reading()`` called inside ``connection_made`` (it starts reading right
after), so a sniffing protocol keeps receiving while the upstream connects: buffer those bytes
and pass them as ``attach_downstream(transport, buffered=...)``.
``attach_downstream`` may also come first: bytes read before the upstream is connected are
held (and reading paused) and sent after ``first_bytes``. If ``connect_upstream`` raises (refused,
timeout) the relay is untouched, so it can be retried on another instance; call ``close()`` to
give up (it closes the attached downstream).

``open_upstream(loop, host, port, *, connect_timeout, first_bytes=b"", protocol_factory)``
connects any protocol, writing ``first_bytes`` before the protocol is attached (so they are
always first on the wire), and returns ``(transport, protocol)``.
``await stream_addresses(loop, host, port)`` lists the ``(family, address)`` pairs to try
(``address_family(host)``: the family of an address, 0 for a name); ``net.fdrelay`` uses them
too.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar, cast

__all__ = [
    "DEFAULT_HIGH_WATER",
    "IDLE_CHECKS_PER_TIMEOUT",
    "Relay",
    "RelaySide",
    "RelayStats",
    "address_family",
    "open_upstream",
    "stream_addresses",
]

DEFAULT_HIGH_WATER: Final = 256 * 1024  # per direction; pause the reader above this
IDLE_CHECKS_PER_TIMEOUT: Final = 4  # idle precision: timeout + timeout/4 at worst

P = TypeVar("P", bound=asyncio.BaseProtocol)


@dataclass(frozen=True, slots=True)
class RelayStats:
    bytes_up: int
    bytes_down: int
    duration: float
    reason: str


class RelaySide(asyncio.Protocol):
    """One end of a relay. Use ``relay.downstream`` / ``relay.upstream``; do not build these."""

    __slots__ = (
        "_pending",
        "bytes_in",
        "closed",
        "eof",
        "name",
        "other",
        "peer",
        "relay",
        "transport",
    )

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None  # the other side's transport, once paired
        self.other: RelaySide = self  # set by Relay
        self.bytes_in = 0
        self.eof = False
        self.closed = False
        self._pending: list[bytes] = []

    # -- hot path
    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None:
            peer.write(data)
            return
        self._pending.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        t = self.other.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.other.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    # -- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses but have the same methods
        t = cast(asyncio.Transport, transport)
        self.transport = t
        t.set_write_buffer_limits(self.relay.high_water, self.relay.low_water)
        self.relay._side_connected(self)

    def eof_received(self) -> bool | None:
        self.eof = True
        self.relay._side_eof(self)
        return True  # keep our write half open; the relay closes when both are done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay._side_lost(self, exc)

    @property
    def buffered(self) -> int:
        """Bytes waiting in this side's transport write buffer (sent to this side)."""
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0


class Relay:
    __slots__ = (
        "_closing",
        "_finished",
        "_idle_handle",
        "_last_active",
        "_last_total",
        "_on_close",
        "_reason",
        "_started",
        "downstream",
        "high_water",
        "idle_timeout",
        "low_water",
        "upstream",
    )

    def __init__(
        self,
        *,
        idle_timeout: float | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        on_close: Callable[[RelayStats], None] | None = None,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.high_water = high_water
        self.low_water = low_water if low_water is not None else high_water // 4
        self._on_close = on_close
        self.downstream = RelaySide(self, "downstream")
        self.upstream = RelaySide(self, "upstream")
        self.downstream.other = self.upstream
        self.upstream.other = self.downstream
        self._started = time.monotonic()
        self._closing = False
        self._finished = False
        self._reason: str | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._last_total = -1
        self._last_active = 0.0

    # -- public
    @property
    def bytes_up(self) -> int:
        return self.downstream.bytes_in

    @property
    def bytes_down(self) -> int:
        return self.upstream.bytes_in

    @property
    def closing(self) -> bool:
        return self._closing

    def stats(self) -> RelayStats:
        return RelayStats(
            self.bytes_up,
            self.bytes_down,
            time.monotonic() - self._started,
            self._reason or "open",
        )

    def attach_downstream(self, transport: asyncio.BaseTransport, buffered: bytes = b"") -> None:
        """Take over an accepted transport (e.g. from a sniffing protocol).

        ``buffered``: bytes the previous protocol read and did not put in ``first_bytes``;
        they go upstream before anything read from now on.
        """
        t = cast(asyncio.Transport, transport)
        if t.is_closing():
            # the client went away while we were connecting: its connection_lost has gone (or
            # will go) to the previous protocol, so end the pair here
            self.downstream.closed = True
            self.close("closed")
            return
        if buffered:
            self.downstream.bytes_in += len(buffered)
            self.downstream._pending.append(buffered)
        t.set_protocol(self.downstream)
        self.downstream.connection_made(t)
        if not t.is_closing() and self.downstream.peer is not None:
            t.resume_reading()

    async def connect_upstream(
        self, host: str, port: int, *, connect_timeout: float, first_bytes: bytes = b""
    ) -> asyncio.Transport:
        if self._closing:
            raise ConnectionAbortedError("relay is closed")
        loop = asyncio.get_running_loop()
        transport, _ = await open_upstream(
            loop,
            host,
            port,
            connect_timeout=connect_timeout,
            first_bytes=first_bytes,
            protocol_factory=lambda: self.upstream,
        )
        return transport

    def close(self, reason: str = "closed") -> None:
        """Close both sides after their pending writes."""
        self._begin_close(reason)
        for side in (self.downstream, self.upstream):
            if side.transport is not None and not side.closed:
                side.transport.close()
        self._maybe_finish()

    def abort(self, reason: str = "aborted") -> None:
        self._begin_close(reason)
        for side in (self.downstream, self.upstream):
            if side.transport is not None and not side.closed:
                side.transport.abort()
        self._maybe_finish()

    # -- side callbacks
    def _side_connected(self, side: RelaySide) -> None:
        assert side.transport is not None
        if self._closing:
            side.transport.close()
            return
        other = side.other
        if other.transport is None:
            # the first side: hold its bytes until the peer is there
            side.transport.pause_reading()
            return
        side.peer, other.peer = other.transport, side.transport
        for src in (side, other):
            dst = src.other.transport
            assert dst is not None and src.transport is not None
            if src._pending:
                dst.writelines(src._pending)
                src._pending.clear()
            if src.eof and dst.can_write_eof():
                dst.write_eof()
            elif src.eof:
                self.close("eof")
                return
        for s in (side, other):
            if s.transport is not None and not s.transport.is_closing() and not s.eof:
                s.transport.resume_reading()
        if side.eof and other.eof:
            self.close("eof")
            return
        self._start_idle_timer()

    def _side_eof(self, side: RelaySide) -> None:
        peer = side.peer
        if peer is None:
            return  # not paired yet: passed on in _side_connected
        if side.other.eof:
            self.close("eof")
        elif peer.is_closing():
            return
        elif peer.can_write_eof():
            peer.write_eof()
        else:
            self.close("eof")

    def _side_lost(self, side: RelaySide, exc: Exception | None) -> None:
        self._begin_close("error" if exc is not None else "closed")
        other = side.other
        other.peer = None  # anything still arriving on the other side is dropped, not written
        if other.transport is not None and not other.closed:
            other.transport.close()
        self._maybe_finish()

    # -- internals
    def _begin_close(self, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self._reason = reason
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _maybe_finish(self) -> None:
        if self._finished:
            return
        for side in (self.downstream, self.upstream):
            if side.transport is not None and not side.closed:
                return
        self._finished = True
        for side in (self.downstream, self.upstream):
            side.peer = None
            side._pending.clear()
        if self._on_close is not None:
            self._on_close(self.stats())

    def _start_idle_timer(self) -> None:
        if self.idle_timeout is None or self._idle_handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._last_total = self.bytes_up + self.bytes_down
        self._last_active = loop.time()
        self._idle_handle = loop.call_later(
            self.idle_timeout / IDLE_CHECKS_PER_TIMEOUT, self._check_idle, loop
        )

    def _check_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        self._idle_handle = None
        if self._closing or self.idle_timeout is None:
            return
        now = loop.time()
        total = self.bytes_up + self.bytes_down
        if total != self._last_total:
            self._last_total = total
            self._last_active = now
        elif now - self._last_active >= self.idle_timeout:
            self.close("idle")
            return
        self._idle_handle = loop.call_later(
            self.idle_timeout / IDLE_CHECKS_PER_TIMEOUT, self._check_idle, loop
        )


async def open_upstream(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    *,
    connect_timeout: float,
    first_bytes: bytes = b"",
    protocol_factory: Callable[[], P],
) -> tuple[asyncio.Transport, P]:
    """Connect to ``host:port`` within ``connect_timeout``, send ``first_bytes``, then attach.

    Raises ``TimeoutError`` or ``OSError`` (refused, unreachable, DNS) on failure; no protocol
    is created then.
    """
    async with asyncio.timeout(connect_timeout):
        sock = await _connect(loop, host, port)
        try:
            if first_bytes:
                await loop.sock_sendall(sock, first_bytes)
            transport, protocol = await loop.create_connection(protocol_factory, sock=sock)
        except BaseException:
            sock.close()
            raise
    return transport, protocol


@functools.lru_cache(maxsize=1024)
def address_family(host: str) -> int:
    """AF_INET or AF_INET6 for an address, 0 for a name (instances are few: cached)."""
    try:
        return socket.AF_INET if ipaddress.ip_address(host).version == 4 else socket.AF_INET6
    except ValueError:
        return 0


async def stream_addresses(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> list[tuple[int, str]]:
    """(family, address) pairs to try for ``host``: itself when it is an address, else the
    IPv4/IPv6 addresses it resolves to."""
    family = address_family(host)
    if family:
        return [(family, host)]
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [
        (fam, str(addr[0]))
        for fam, _, _, _, addr in infos
        if fam in (socket.AF_INET, socket.AF_INET6)
    ]


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    last_exc: OSError | None = None
    for family, address in await stream_addresses(loop, host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (address, port))
        except OSError as exc:
            sock.close()
            last_exc = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last_exc or OSError(f"could not resolve {host}")
