"""Accepting from raw listening sockets on the event loop, without asyncio's server machinery.

``loop.create_server`` gives every connection an accept task's share, a transport and a few
``call_soon``s before the protocol sees it: for short connections that was most of their CPU.
``Acceptor`` watches its listening sockets with ``loop.add_reader``, accepts a batch per
wake-up and hands each connection, non-blocking, to a callback (the NLB's sniffer, the DBLB's
client transport). Out of descriptors or memory it stops accepting for a while, as asyncio
does, rather than spin on the error.

API: ``Acceptor(sockets, on_accept, *, name="", batch=ACCEPT_BATCH)`` sets the listening
sockets non-blocking with TCP_NODELAY (accepted sockets inherit it on Linux: one
``setsockopt`` per listener, not per connection); ``start()``; ``accepting``; ``close()``
stops accepting and closes the listening sockets (whatever was accepted is already the
callback's). ``on_accept(sock, peer)`` runs on the loop; an exception from it ends that batch
and reaches the loop's exception handler.
``batch`` is how many connections one wake-up accepts at most. A batch that is not full ends
with a failed ``accept`` and the ``BlockingIOError`` it raises (~5k instructions); with
``batch=1`` a wake-up accepts one connection and the (level-triggered) poll reports the
listener again while more wait: on a busy loop, where that poll happens anyway, the cheaper
choice for connections that come one at a time (pgbench -C), at a loop iteration per
connection in a burst.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog

__all__ = ["ACCEPT_BATCH", "ACCEPT_RETRY_DELAY", "Acceptor"]

_log = structlog.get_logger("marchproxy.accept")

#: connections accepted per readiness callback (asyncio: the backlog, 100)
ACCEPT_BATCH: Final = 128
#: seconds without accepting after EMFILE and the like (as asyncio)
ACCEPT_RETRY_DELAY = 1.0
_PAUSE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

AcceptCallback = Callable[[socket.socket, Any], None]


class Acceptor:
    def __init__(
        self,
        sockets: Sequence[socket.socket],
        on_accept: AcceptCallback,
        *,
        name: str = "",
        batch: int = ACCEPT_BATCH,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self.loop = asyncio.get_running_loop()
        self.sockets = list(sockets)
        self.name = name
        self.batch = batch
        self.accepting = False
        self._on_accept = on_accept
        self._retry: asyncio.TimerHandle | None = None
        for sock in self.sockets:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        if self.accepting:
            return
        self.accepting = True
        for sock in self.sockets:
            # (family, type and proto passed as ints: the socket properties build enums)
            kind = (int(sock.family), int(sock.type), sock.proto)
            self.loop.add_reader(sock.fileno(), self._accept, sock, kind)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._stop()
        for sock in self.sockets:
            sock.close()

    def _stop(self) -> None:
        if self.accepting:
            for sock in self.sockets:
                self.loop.remove_reader(sock.fileno())
            self.accepting = False

    def _accept(self, listening: socket.socket, kind: tuple[int, int, int]) -> None:
        on_accept = self._on_accept
        family, type_, proto = kind
        accept = listening._accept  # type: ignore[attr-defined]
        for _ in range(self.batch):
            try:
                # socket.accept() without its wrapper: it looks the family and type up as
                # enums on every call: ~5 % of the DBLB's instructions per pgbench -C connection
                fd, peer = accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _PAUSE_ERRNOS:
                    raise
                _log.error("accept_failed", listener=self.name, error=str(exc),
                           retry_after=ACCEPT_RETRY_DELAY)  # fmt: skip
                self._stop()
                self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            sock = socket.socket(family, type_, proto, fd)
            try:
                sock.setblocking(False)
            except OSError:
                sock.close()
                continue
            on_accept(sock, peer)

    def _resume(self) -> None:
        self._retry = None
        if all(sock.fileno() >= 0 for sock in self.sockets):
            self.start()
