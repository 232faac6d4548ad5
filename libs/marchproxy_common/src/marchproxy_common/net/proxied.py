"""Accept a PROXY protocol v1/v2 header in front of any asyncio Protocol.

API (stable):

- ``wrap_proxy_protocol(protocol_factory, mode="optional", header_timeout=5.0, *,
  on_reject=None) -> protocol_factory``. Use the result with ``loop.create_server``.

  * ``"off"``: returns ``protocol_factory`` itself (no cost at all).
  * ``"optional"``: if the first bytes cannot start a PROXY header (``detect`` says
    ``NOT_PROXY``; decided on the first byte for anything but ``\\r``/``P``), everything is passed
    through unchanged. A header that starts with a valid signature but is malformed closes the
    connection. If nothing (or only a partial signature) arrived after ``header_timeout`` the
    connection is handed to the inner protocol as is (so server-speaks-first protocols still work,
    after that delay: prefer ``"required"`` or ``"off"`` for them).
  * ``"required"``: a missing, invalid or late (``header_timeout``) header aborts the connection.

  After the header the wrapper calls ``transport.set_protocol(inner)``, then
  ``inner.connection_made(transport)`` and ``inner.data_received(rest)`` if bytes followed the
  header: from then on the transport calls the inner protocol directly (no per-chunk overhead).
  A ``BufferedProtocol`` inner gets ``rest`` via ``get_buffer``/``buffer_updated``.
  ``on_reject(reason)`` is called once per rejected connection (``"timeout"``, ``"invalid"``,
  ``"missing"``, ``"eof"``, ``"untrusted"``) so a service can count it.
  ``trusted_sources`` (CIDRs, e.g. the NLB's addresses): peers outside them may not send a
  header: ``"required"`` rejects them, ``"optional"`` passes their bytes through unparsed (so a
  client cannot spoof its address). ``None`` (default) trusts every peer, like HAProxy's
  ``accept-proxy``.

- ``client_address(transport) -> (host, port)``: the PROXY source if a header carrying an IP
  source was seen on this transport, else the socket peer (``("", 0)`` if unknown).
- ``proxy_info(transport) -> ProxyHeader | None``: the header seen on this transport, if any.
- ``remember_proxy_header(transport, header)``: record a header parsed elsewhere.

Not for TLS-terminating servers created with ``ssl=``: the PROXY header precedes the handshake,
so wrap the plain listener and upgrade with ``loop.start_tls`` in the inner protocol.
"""

from __future__ import annotations

import asyncio
import ipaddress
import weakref
from collections.abc import Callable, Iterable
from typing import Final, Literal, cast

from marchproxy_common.wire.proxy_protocol import (
    NEED_DATA,
    Detect,
    ProxyHeader,
    ProxyProtocolError,
    detect,
    parse,
)

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "ProxyMode",
    "client_address",
    "proxy_info",
    "remember_proxy_header",
    "wrap_proxy_protocol",
]

ProxyMode = Literal["off", "optional", "required"]
DEFAULT_HEADER_TIMEOUT: Final = 5.0

_headers: weakref.WeakKeyDictionary[asyncio.BaseTransport, ProxyHeader] = (
    weakref.WeakKeyDictionary()
)


def remember_proxy_header(transport: asyncio.BaseTransport, header: ProxyHeader) -> None:
    _headers[transport] = header


def proxy_info(transport: asyncio.BaseTransport) -> ProxyHeader | None:
    return _headers.get(transport)


def client_address(transport: asyncio.BaseTransport) -> tuple[str, int]:
    header = _headers.get(transport)
    if header is not None and isinstance(header.source, tuple):
        return header.source
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return "", 0


class _ProxyHeaderProtocol(asyncio.Protocol):
    """Reads the PROXY header, then swaps itself out for the inner protocol."""

    __slots__ = (
        "_buf",
        "_factory",
        "_mode",
        "_on_reject",
        "_timeout",
        "_timer",
        "_transport",
        "_trusted",
    )

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        mode: ProxyMode,
        timeout: float,
        on_reject: Callable[[str], None] | None,
        trusted: Callable[[asyncio.BaseTransport], bool] | None = None,
    ) -> None:
        self._trusted = trusted
        self._factory = factory
        self._mode = mode
        self._timeout = timeout
        self._on_reject = on_reject
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses, but quack alike
        self._transport = cast(asyncio.Transport, transport)
        if self._trusted is not None and not self._trusted(transport):
            # a peer outside trusted_sources may not claim another address
            if self._mode == "required":
                self._reject("untrusted")
            else:
                self._hand_over(None, b"")
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout, self._on_timeout)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._buf = self._buf + data if self._buf else data
        if self._mode == "optional":
            kind = detect(self._buf)
            if kind is Detect.NOT_PROXY:
                self._hand_over(None, self._buf)
                return
            if kind is Detect.NEED_DATA:
                return
        try:
            res = parse(self._buf)
        except ProxyProtocolError:
            self._reject("invalid" if detect(self._buf) is not Detect.NOT_PROXY else "missing")
            return
        if res is NEED_DATA:
            return
        assert isinstance(res, tuple)
        header, used = res
        self._hand_over(header, self._buf[used:])

    def eof_received(self) -> bool | None:
        if self._mode == "optional" and detect(self._buf) in (Detect.NEED_DATA, Detect.NOT_PROXY):
            inner = self._hand_over(None, self._buf)
            if inner is not None and isinstance(inner, asyncio.Protocol):
                return inner.eof_received()
            return None
        self._reject("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        if self._mode == "optional" and detect(self._buf) in (Detect.NEED_DATA, Detect.NOT_PROXY):
            self._hand_over(None, self._buf)
            return
        self._reject("timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _reject(self, reason: str) -> None:
        self._cancel_timer()
        transport, self._transport = self._transport, None
        self._buf = b""
        if self._on_reject is not None:
            self._on_reject(reason)
        if transport is not None:
            transport.abort()

    def _hand_over(self, header: ProxyHeader | None, rest: bytes) -> asyncio.BaseProtocol | None:
        self._cancel_timer()
        transport, self._transport = self._transport, None
        self._buf = b""
        if transport is None:
            return None
        if header is not None:
            _headers[transport] = header
        inner = self._factory()
        transport.set_protocol(inner)
        inner.connection_made(transport)
        if rest and not transport.is_closing():
            _feed(inner, rest)
        return inner


def _feed(inner: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(inner, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(inner.get_buffer(len(view)))
            n = min(len(buf), len(view))
            if n == 0:
                raise RuntimeError("BufferedProtocol.get_buffer returned an empty buffer")
            buf[:n] = view[:n]
            inner.buffer_updated(n)
            view = view[n:]
    elif isinstance(inner, asyncio.Protocol):
        inner.data_received(data)


def wrap_proxy_protocol(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    mode: ProxyMode = "optional",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    *,
    on_reject: Callable[[str], None] | None = None,
    trusted_sources: Iterable[str] | None = None,
) -> Callable[[], asyncio.BaseProtocol]:
    """Return a protocol factory that strips a PROXY v1/v2 header before ``protocol_factory``."""
    if mode == "off":
        return protocol_factory
    if mode not in ("optional", "required"):
        raise ValueError(f"unknown PROXY protocol mode {mode!r}")
    trusted = _trust_checker(trusted_sources) if trusted_sources is not None else None

    def factory() -> asyncio.BaseProtocol:
        return _ProxyHeaderProtocol(protocol_factory, mode, header_timeout, on_reject, trusted)

    return factory


def _trust_checker(sources: Iterable[str]) -> Callable[[asyncio.BaseTransport], bool]:
    networks = [ipaddress.ip_network(s, strict=False) for s in sources]

    def trusted(transport: asyncio.BaseTransport) -> bool:
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):
            return True  # AF_UNIX: a local process
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in networks)

    return trusted
