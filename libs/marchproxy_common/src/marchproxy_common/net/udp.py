"""UDP relay: one upstream socket per client address, with an idle timeout.

API (stable):

- ``UdpRelay(pick_upstream, *, idle_timeout=60.0, max_sessions=MAX_UDP_SESSIONS,
  max_pending=MAX_PENDING_DATAGRAMS, on_session_close=None)``.
  ``pick_upstream(client_addr) -> (host, port) | None`` is called once per new client address
  (``None`` drops the datagram and counts it in ``dropped_no_upstream``).
- ``await relay.start(host, port) -> (host, port)`` binds the listening socket (port 0 allowed)
  and returns the bound address; ``await relay.start(sock=s)`` serves on an already bound
  socket instead (one inherited in a hitless restart). ``relay.listening_socket`` is that
  socket (to hand it on); ``relay.close()`` closes it and every session.
- Each session is a connected UDP socket towards the chosen upstream; replies are sent back to
  the client from the listening socket. Datagrams that arrive while the session's upstream
  socket is being created are queued (up to ``max_pending``, then dropped).
- Idle sessions (no datagram either way for ``idle_timeout``) are closed by one sweeper timer
  per relay that runs every ``idle_timeout / IDLE_SWEEPS_PER_TIMEOUT`` (no timer per datagram).
- Counters: ``sessions`` (live), ``sessions_total``, ``dropped_no_upstream``,
  ``dropped_overload`` (``max_sessions`` reached or queue full), ``datagrams_up/down``,
  ``bytes_up/down``. ``on_session_close(client_addr, upstream_addr, bytes_up, bytes_down,
  reason)`` with reason ``"idle"`` / ``"error"`` / ``"closed"``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final, cast

from marchproxy_common.tasks import spawn

__all__ = [
    "IDLE_SWEEPS_PER_TIMEOUT",
    "MAX_PENDING_DATAGRAMS",
    "MAX_UDP_SESSIONS",
    "UdpRelay",
]

MAX_UDP_SESSIONS: Final = 65536  # per listener; each session holds one socket
MAX_PENDING_DATAGRAMS: Final = 64  # queued per session while its upstream socket opens
IDLE_SWEEPS_PER_TIMEOUT: Final = 4

Addr = tuple[str, int]
SessionClosed = Callable[[Addr, Addr, int, int, str], None]


class _Session(asyncio.DatagramProtocol):
    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client",
        "closed",
        "last_seen",
        "pending",
        "relay",
        "transport",
        "upstream",
    )

    def __init__(self, relay: UdpRelay, client: Addr, upstream: Addr) -> None:
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] | None = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_seen = 0  # sweep counter value at the last datagram
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.bytes_down += len(data)
        self.last_seen = self.relay._sweep_no
        self.relay._reply(data, self.client)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable from the upstream: the session is useless
        self.relay._close_session(self, "error")

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._close_session(self, "error" if exc else "closed")


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.relay._from_client(data, addr)


class UdpRelay:
    def __init__(
        self,
        pick_upstream: Callable[[Addr], Addr | None],
        *,
        idle_timeout: float = 60.0,
        max_sessions: int = MAX_UDP_SESSIONS,
        max_pending: int = MAX_PENDING_DATAGRAMS,
        on_session_close: SessionClosed | None = None,
    ) -> None:
        self._pick = pick_upstream
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.max_pending = max_pending
        self._on_close = on_session_close
        self._sessions: dict[Addr, _Session] = {}
        self._listener: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_no = 0
        self.sessions_total = 0
        self.dropped_no_upstream = 0
        self.dropped_overload = 0
        self.datagrams_up = 0
        self.datagrams_down = 0
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def listening_socket(self) -> socket.socket | None:
        """The listening socket while the relay runs."""
        if self._listener is None:
            return None
        sock: socket.socket | None = self._listener.get_extra_info("socket")
        return sock

    async def start(
        self, host: str = "", port: int = 0, *, sock: socket.socket | None = None
    ) -> Addr:
        loop = asyncio.get_running_loop()
        if sock is not None:
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=sock)
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Listener(self), local_addr=(host, port)
            )
        self._listener = transport
        self._sweeper = loop.call_later(self._sweep_interval(), self._sweep, loop)
        addr = transport.get_extra_info("sockname")
        return str(addr[0]), int(addr[1])

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for session in list(self._sessions.values()):
            self._close_session(session, "closed")
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- data path
    def _from_client(self, data: bytes, client: Addr) -> None:
        session = self._sessions.get(client)
        if session is None:
            session = self._new_session(client)
            if session is None:
                return
        self.datagrams_up += 1
        self.bytes_up += len(data)
        session.bytes_up += len(data)
        session.last_seen = self._sweep_no
        t = session.transport
        if t is not None:
            t.sendto(data)
        elif session.pending is not None and len(session.pending) < self.max_pending:
            session.pending.append(data)
        else:
            self.dropped_overload += 1

    def _reply(self, data: bytes, client: Addr) -> None:
        self.datagrams_down += 1
        self.bytes_down += len(data)
        if self._listener is not None:
            self._listener.sendto(data, client)

    def _new_session(self, client: Addr) -> _Session | None:
        if len(self._sessions) >= self.max_sessions:
            self.dropped_overload += 1
            return None
        upstream = self._pick(client)
        if upstream is None:
            self.dropped_no_upstream += 1
            return None
        session = _Session(self, client, upstream)
        self._sessions[client] = session
        self.sessions_total += 1
        spawn(self._open(session), name=f"udp-session {client[0]}:{client[1]}")
        return session

    async def _open(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: session, remote_addr=session.upstream)
        except OSError:
            self._close_session(session, "error")
            return
        if session.closed:
            if session.transport is not None:
                session.transport.close()
            return
        pending, session.pending = session.pending or [], None
        assert session.transport is not None
        for data in pending:
            session.transport.sendto(data)

    def _close_session(self, session: _Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        if self._sessions.get(session.client) is session:
            del self._sessions[session.client]
        if session.transport is not None:
            session.transport.close()
        if self._on_close is not None:
            self._on_close(
                session.client, session.upstream, session.bytes_up, session.bytes_down, reason
            )

    # -- idle sweeping
    def _sweep_interval(self) -> float:
        return self.idle_timeout / IDLE_SWEEPS_PER_TIMEOUT

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_no += 1
        # untouched since before the last IDLE_SWEEPS_PER_TIMEOUT full intervals: idle for at
        # least idle_timeout (and at most idle_timeout + one interval)
        cutoff = self._sweep_no - IDLE_SWEEPS_PER_TIMEOUT - 1
        for session in [s for s in self._sessions.values() if s.last_seen <= cutoff]:
            self._close_session(session, "idle")
        self._sweeper = loop.call_later(self._sweep_interval(), self._sweep, loop)
