"""UDP listeners whose socket can be handed to a new NLB process (hitless restart).

``marchproxy_common.net.udp.UdpRelay.start(host, port)`` binds a socket of its own and does
not expose it, so a hand-over could pass TCP listeners only and the new process then failed to
bind the UDP port (EADDRINUSE). ``HandoverUdpRelay`` starts the same relay on a socket we bind
ourselves or inherited, and keeps it at hand for the next hand-over.

It reaches into ``UdpRelay``'s private start-up state; the common library change that makes
this unnecessary (``UdpRelay.start(..., sock=None)`` and a ``socket`` property) is proposed in
the NLB report.
"""

from __future__ import annotations

import asyncio
import socket

from marchproxy_common.net import udp


def bind_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class HandoverUdpRelay(udp.UdpRelay):
    sock: socket.socket | None = None

    async def start_on(self, sock: socket.socket) -> tuple[str, int]:
        """Serve on ``sock`` (bound; inherited or from :func:`bind_udp`)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: udp._Listener(self),  # the relay's own listening protocol
            sock=sock,
        )
        self._listener = transport
        self._sweeper = loop.call_later(self._sweep_interval(), self._sweep, loop)
        self.sock = sock
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])
