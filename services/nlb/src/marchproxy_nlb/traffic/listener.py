"""Client-facing sockets: accept, sniff the first bytes under a deadline, hand over to the relay.

``TcpListener`` accepts from its socket directly (``loop.add_reader``); a ``Sniffer`` reads a
connection's first bytes, with nothing but the sniff buffer and timer of its own. The decision
(route, rate limit, pick, connect: ``DataPlane.forward``) runs in callbacks, with a task only
to wait for a Redis rate limit or a hand-over, and then gives the client's socket and the
upstream's to the relay engine (``net.fdrelay``). Raw sockets, not transports, and no task per
connection: a short connection spent most of its CPU building and tearing down asyncio
transports, the accept task and its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from marchproxy_common.listeners import LISTENER_PROTOCOLS, PROXY_HEADER_MODES
from marchproxy_common.net.accept import Acceptor
from marchproxy_common.wire.sniff import MAX_SNIFF_BYTES, NeedMore, Verdict, classify

if TYPE_CHECKING:
    from .plane import DataPlane

DEFAULT_SNIFF_TIMEOUT = 0.1  # seconds: server-speaks-first protocols wait this long
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


@dataclass(eq=False, slots=True)
class Connection:
    """One accepted client connection while it is sniffed and routed."""

    spec: ListenerSpec
    sock: socket.socket
    peer: tuple[str, int]
    local: tuple[str, int]
    conn_id: int = field(default_factory=lambda: next(_conn_ids))
    sniffed: bytearray = field(default_factory=bytearray)
    started: float = 0.0
    eof: bool = False  # the client half-closed while sniffed

    def close(self) -> None:
        self.sock.close()


async def listen_tcp(host: str, port: int, *, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket on ``host:port`` (an address or a name; SO_REUSEADDR)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    return socket.create_server(address[:2], family=family, backlog=backlog)


class TcpListener:
    """Accepts from a listening socket (``net.accept.Acceptor``: ``loop.add_reader``, no
    transport, no task per connection) and gives each connection to a ``Sniffer``. After the
    routing decision nothing is read from the client until the relay engine has both sockets:
    what it sends meanwhile waits in the kernel's buffer, which bounds it."""

    def __init__(self, plane: DataPlane, spec: ListenerSpec, sock: socket.socket) -> None:
        self._plane = plane
        self._spec = spec
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._acceptor = Acceptor([sock], self._accepted, name=spec.name)
        host, port = sock.getsockname()[:2]
        # a listener on one address knows every connection's local address without asking
        wildcard = ipaddress.ip_address(host).is_unspecified
        self._local: tuple[str, int] | None = None if wildcard else (host, port)

    def start(self) -> None:
        self._acceptor.start()

    def close(self) -> None:
        """Stop accepting and close the socket (every connection accepted so far is already
        the plane's: nothing accepted is dropped)."""
        self._acceptor.close()

    def _accepted(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        plane, spec = self._plane, self._spec
        try:
            local = self._local or sock.getsockname()[:2]
        except OSError:
            sock.close()
            return
        conn = Connection(spec, sock, (peer[0], peer[1]), local, started=self._loop.time())
        plane.accept(conn)
        if plane.should_sniff(spec):
            Sniffer(plane, conn, self._loop)
        else:
            decide(plane, conn, None)


class Sniffer:
    """Reads a connection's first bytes (at most MAX_SNIFF_BYTES) until ``classify`` decides or
    the sniff timeout runs out, then starts the routing decision (``DataPlane.forward``). The
    socket is watched on the relay engine's epoll, which keeps it registered for the relay."""

    __slots__ = ("_conn", "_engine", "_plane", "_timer")

    def __init__(self, plane: DataPlane, conn: Connection, loop: asyncio.AbstractEventLoop):
        self._plane = plane
        self._conn = conn
        self._engine = plane.engine
        self._engine.watch(conn.sock, self._readable)
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            plane.settings.nlb_sniff_timeout, self._deadline
        )

    def _readable(self) -> None:
        conn = self._conn
        while True:  # edge-triggered: until the socket is empty or we know enough
            try:
                data = conn.sock.recv(MAX_SNIFF_BYTES - len(conn.sniffed))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop()
                return
            if not data:
                conn.eof = True
                if not conn.sniffed:
                    self._drop()  # nothing to route
                    return
                self._decide(classify(conn.sniffed, final=True))
                return
            conn.sniffed += data
            verdict = classify(conn.sniffed, final=len(conn.sniffed) >= MAX_SNIFF_BYTES)
            if not isinstance(verdict, NeedMore):
                self._decide(verdict)
                return

    def _deadline(self) -> None:
        self._timer = None
        self._decide(classify(self._conn.sniffed, final=True))

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drop(self) -> None:
        self._stop()
        self._plane.drop(self._conn)

    def _decide(self, verdict: Verdict) -> None:
        self._stop()
        self._engine.unwatch(self._conn.sock)  # still registered: the relay takes it from here
        decide(self._plane, self._conn, verdict)


def decide(plane: DataPlane, conn: Connection, verdict: Verdict | None) -> None:
    """Route ``conn`` (``verdict``: what sniffing found; None when it was not sniffed)."""
    plane.forward(conn, verdict)
