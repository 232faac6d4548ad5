"""TLS termination on an accepted connection, after an optional PROXY header.

The PROXY header precedes the TLS handshake, so the listener cannot use ``create_server(ssl=)``.
Instead this acceptor starts TLS itself, as ``loop.start_tls`` does, but without losing the bytes
that already followed the PROXY header (the ClientHello): it puts asyncio's ``SSLProtocol`` on
the transport and feeds it those bytes through the BufferedProtocol interface.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from marchproxy_common.net.proxied import client_address

from .downstream import DownstreamProtocol

if TYPE_CHECKING:
    from marchproxy_alb.proxy import DataPlane

TLS_HANDSHAKE_TIMEOUT = 10  # seconds (typeshed wants an int)


class TlsAcceptor(asyncio.Protocol):
    def __init__(self, plane: DataPlane, context: Callable[[], ssl.SSLContext]) -> None:
        self._plane = plane
        self._context = context
        self._ssl: sslproto.SSLProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        loop = asyncio.get_running_loop()
        app = DownstreamProtocol(self._plane, scheme="https", client=client_address(transport))
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(_consume)
        proto = sslproto.SSLProtocol(
            loop,
            app,
            self._context(),
            waiter,
            server_side=True,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        self._ssl = proto
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Bytes that arrived together with the PROXY header: the start of the TLS stream."""
        proto = self._ssl
        assert proto is not None
        view = memoryview(data)
        while view:
            buf = proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ssl is not None:
            self._ssl.connection_lost(exc)


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # a failed handshake is logged by SSLProtocol; do not warn twice
