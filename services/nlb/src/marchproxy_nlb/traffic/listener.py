"""Client-facing sockets: accept, sniff the first bytes under a deadline, hand over to the relay.

``SniffingProtocol`` is the protocol of every accepted TCP connection until a decision is made;
it owns only the sniff buffer and timer. The decision (route, rate limit, pick, connect) runs in
one task per connection (``DataPlane.forward``), which then moves the transport to a ``Relay``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from marchproxy_common.listeners import LISTENER_PROTOCOLS, PROXY_HEADER_MODES
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.sniff import MAX_SNIFF_BYTES, NeedMore, Verdict, classify

if TYPE_CHECKING:
    from .plane import DataPlane

DEFAULT_SNIFF_TIMEOUT = 0.1  # seconds: server-speaks-first protocols wait this long
# Bytes a client may send after the routing decision, while the upstream connects. Reading is
# paused at MAX_EARLY_BYTES (asyncio honours the pause made at the decision; uvloop ignores a
# pause made inside connection_made, so the decision of a one-protocol listener does not stop
# it); a client that gets past MAX_EARLY_BYTES_HARD anyway is cut off and counted.
MAX_EARLY_BYTES = 256 * 1024
MAX_EARLY_BYTES_HARD = 4 * MAX_EARLY_BYTES
# Protocols whose server talks first: the client sends nothing until it hears the greeting.
SERVER_FIRST = frozenset({"mysql"})
# Protocols whose first bytes carry what route rules match on (SNI, Host, database, user).
DESCRIBED_BY_FIRST_BYTES = frozenset(
    {"http", "https", "tls", "http2", "grpc", "websocket", "postgresql"}
)
KNOWN_PROTOCOLS = LISTENER_PROTOCOLS

_conn_ids = itertools.count(1)


class ListenerSpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    name: str
    port: int
    protocols: frozenset[str]
    default_protocol: str = ""
    transport: str = "tcp"
    host: str = ""  # empty: the NLB's data host
    #: what the NLB writes to an instance before the client's bytes: a PROXY protocol v2
    #: header (modules), v1, or nothing ("none": passthrough to a plain backend, seed 000's
    #: L4_TCP modules). UDP is always relayed as is.
    proxy_protocol: str = "v2"

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.host, self.port, self.transport)

    @property
    def sniff(self) -> bool:
        """Only listeners with more than one protocol (or no default) need to look at bytes
        to know the protocol (a route rule on SNI, Host or database may still need them:
        ``DataPlane.should_sniff``)."""
        return not (len(self.protocols) == 1 and self.default_protocol in self.protocols)


PROXY_PROTOCOLS = PROXY_HEADER_MODES


def make_listener(
    name: str,
    port: int,
    protocols: Sequence[str],
    default_protocol: str = "",
    transport: str = "tcp",
    host: str = "",
    proxy_protocol: str = "v2",
) -> ListenerSpec:
    protos = frozenset(p.strip().lower() for p in protocols if p.strip())
    unknown = protos - KNOWN_PROTOCOLS
    if unknown:
        raise ListenerSpecError(f"listener {name!r}: unknown protocols {sorted(unknown)}")
    if not protos:
        raise ListenerSpecError(f"listener {name!r}: at least one protocol is required")
    if not 0 <= port <= 65535:
        raise ListenerSpecError(f"listener {name!r}: port must be 0-65535")
    if transport not in ("tcp", "udp"):
        raise ListenerSpecError(f"listener {name!r}: transport must be tcp or udp")
    default = default_protocol.lower()
    if not default:
        server_first = sorted(protos & SERVER_FIRST)
        if server_first:
            default = server_first[0]
        elif len(protos) == 1:
            default = next(iter(protos))
    if default and default not in protos:
        raise ListenerSpecError(f"listener {name!r}: default protocol {default!r} not listed")
    if proxy_protocol not in PROXY_PROTOCOLS:
        raise ListenerSpecError(
            f"listener {name!r}: proxy_protocol must be one of {', '.join(PROXY_PROTOCOLS)}"
        )
    return ListenerSpec(name, port, protos, default, transport, host, proxy_protocol)


LISTENER_OPTIONS = ("proxy_protocol",)


def parse_listeners_env(text: str) -> list[ListenerSpec]:
    """``NLB_LISTENERS``: ``;``-separated ``PORT[/udp]=PROTO[,PROTO...][?OPTION=VALUE[&...]]``,
    e.g. ``"7000=http,tls,postgresql,rtmp;3307=mysql;5353/udp=udp;5201=tcp?proxy_protocol=none"``.
    Options: ``proxy_protocol=v2|v1|none`` (default v2)."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        where, _, rest = part.partition("=")
        protos, _, query = rest.partition("?")
        port_text, _, transport = where.partition("/")
        port_text = port_text.strip()
        if not (port_text.isascii() and port_text.isdigit()) or not protos.strip():
            raise ListenerSpecError(
                f"NLB_LISTENERS entry {part!r} is not PORT[/udp]=PROTO,...[?option=value]"
            )
        options: dict[str, str] = {}
        for item in filter(None, query.split("&")):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in LISTENER_OPTIONS or key in options:
                raise ListenerSpecError(
                    f"NLB_LISTENERS entry {part!r}: unknown or repeated option {item!r} "
                    f"(known: {', '.join(LISTENER_OPTIONS)})"
                )
            options[key] = value.strip().lower()
        port = int(port_text)
        specs.append(
            make_listener(
                f"{port}/{transport or 'tcp'}",
                port,
                protos.split(","),
                transport=transport.strip().lower() or "tcp",
                proxy_protocol=options.get("proxy_protocol", "v2"),
            )
        )
    return specs


@dataclass(eq=False)
class Connection:
    """One accepted client connection while it is sniffed and routed."""

    spec: ListenerSpec
    transport: asyncio.Transport
    peer: tuple[str, int]
    local: tuple[str, int]
    conn_id: int = field(default_factory=lambda: next(_conn_ids))
    sniffed: bytearray = field(default_factory=bytearray)
    extra: bytearray = field(default_factory=bytearray)  # bytes read after the decision
    started: float = 0.0
    lost: bool = False
    eof: bool = False


class SniffingProtocol(asyncio.Protocol):
    def __init__(self, plane: DataPlane, spec: ListenerSpec, sniff_timeout: float) -> None:
        self._plane = plane
        self._spec = spec
        self._timeout = sniff_timeout
        self._conn: Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._decided = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both behave as one
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        loop = asyncio.get_running_loop()
        self._conn = Connection(
            self._spec, transport, (peer[0], peer[1]), (local[0], local[1]), started=loop.time()
        )
        self._plane.accept(self._conn)
        if not self._plane.should_sniff(self._spec):
            self._decide(None)
            return
        self._timer = loop.call_later(self._timeout, self._deadline)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        if self._decided:
            conn.extra += data
            if len(conn.extra) >= MAX_EARLY_BYTES:
                conn.transport.pause_reading()  # the relay resumes it once attached
                if len(conn.extra) > MAX_EARLY_BYTES_HARD and not conn.lost:
                    self._plane.overflow(conn)
            return
        conn.sniffed += data
        verdict = classify(conn.sniffed, final=len(conn.sniffed) >= MAX_SNIFF_BYTES)
        if not isinstance(verdict, NeedMore):
            self._decide(verdict)

    def eof_received(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        conn.eof = True
        if not self._decided:
            if not conn.sniffed:
                return False  # nothing to route: close
            self._decide(classify(conn.sniffed, final=True))
        return True  # keep our write side open; the relay passes the EOF on

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._conn is not None:
            self._conn.lost = True
            if not self._decided:
                self._plane.release(self._conn)

    def _deadline(self) -> None:
        self._timer = None
        if not self._decided and self._conn is not None:
            self._decide(classify(self._conn.sniffed, final=True))

    def _decide(self, verdict: Verdict | None) -> None:
        conn = self._conn
        assert conn is not None
        self._decided = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn.transport.pause_reading()
        spawn(
            self._plane.forward(conn, verdict),
            name=f"nlb conn {conn.conn_id} {conn.peer[0]}:{conn.peer[1]}",
        )
