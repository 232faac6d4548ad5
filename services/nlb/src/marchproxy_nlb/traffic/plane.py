"""``DataPlane``: the NLB's traffic path and the RPCs that read or steer it.

accept → sniff (``listener``) → describe the connection (protocol, SNI/Host, database, port)
→ route rule (``routing``) → rate limits (``limits``) → blue/green version (``bluegreen``) →
instance (``balancer``) → connect with a PROXY v2 header and the sniffed bytes (retrying on
another instance while nothing was relayed) → both sockets to the ``FdRelayEngine`` (one epoll of
its own, edge-triggered) with flow control both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog

from marchproxy.v1 import nlb_pb2, types_pb2
from marchproxy_common.net.fdpass import FdPassError
from marchproxy_common.net.fdrelay import FdRelay, FdRelayEngine
from marchproxy_common.net.handoff import HANDOFF_LABEL, MAX_FIRST_BYTES, ConnectionHandoff
from marchproxy_common.net.udp import UdpRelay
from marchproxy_common.ratelimit import Decision
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.proxy_protocol import build_v1, build_v2
from marchproxy_common.wire.sniff import (
    HttpDetails,
    Match,
    PostgresDetails,
    TlsDetails,
    Unknown,
    Verdict,
)
from marchproxy_nlb.config import NlbSettings
from marchproxy_nlb.grpc.convert import balance_score, instance_pb, load_info_pb
from marchproxy_nlb.grpc.validate import protocol_name
from marchproxy_nlb.metrics import NlbMetrics
from marchproxy_nlb.registry.table import Instance, InstanceRegistry

from .balancer import Balancer, is_strategy
from .bluegreen import BlueGreen
from .limits import ConnectionLimits, LimitRule, parse_rules
from .listener import (
    DESCRIBED_BY_FIRST_BYTES,
    Connection,
    ListenerSpec,
    ListenerSpecError,
    TcpListener,
    listen_tcp,
    make_listener,
    parse_listeners_env,
)
from .routing import (
    ConnInfo,
    RouteRule,
    RoutingTable,
    RuleError,
    host_without_port,
    make_rule,
    rules_from_snapshot,
)

_log = structlog.get_logger("marchproxy.nlb.traffic")

P = types_pb2
#: Seconds before a module's hand-over socket is tried again after a failure (relayed meanwhile).
HANDOFF_RETRY_AFTER = 5.0
# A sniffed protocol → the registered protocols that may take it, in order of preference.
ACCEPTORS: dict[str, tuple[P.Protocol.ValueType, ...]] = {
    "http": (P.PROTOCOL_HTTP,),
    "tls": (P.PROTOCOL_TLS, P.PROTOCOL_HTTPS),
    "https": (P.PROTOCOL_HTTPS, P.PROTOCOL_TLS),
    "http2": (P.PROTOCOL_HTTP2, P.PROTOCOL_GRPC),
    "grpc": (P.PROTOCOL_GRPC, P.PROTOCOL_HTTP2),
    "postgresql": (P.PROTOCOL_POSTGRESQL,),
    "mysql": (P.PROTOCOL_MYSQL,),
    "rtmp": (P.PROTOCOL_RTMP,),
    "redis": (P.PROTOCOL_REDIS,),
    "websocket": (P.PROTOCOL_WEBSOCKET, P.PROTOCOL_HTTP),
    "mongodb": (P.PROTOCOL_MONGODB,),
    "rtsp": (P.PROTOCOL_RTSP,),
    "tcp": (P.PROTOCOL_TCP,),
    "udp": (P.PROTOCOL_UDP,),
}
# With no route rule naming a module, a protocol goes to its owning module type when one is
# registered (HTTP to the ALB, not to the AILB that also speaks HTTP but is reached by rule).
OWNER_TYPE: dict[str, P.ModuleType.ValueType] = {
    "http": P.MODULE_TYPE_ALB,
    "tls": P.MODULE_TYPE_ALB,
    "https": P.MODULE_TYPE_ALB,
    "http2": P.MODULE_TYPE_ALB,
    "websocket": P.MODULE_TYPE_ALB,
    "postgresql": P.MODULE_TYPE_DBLB,
    "mysql": P.MODULE_TYPE_DBLB,
    "rtmp": P.MODULE_TYPE_RTMP,
}


def proxy_header(conn: Connection) -> bytes:
    """What goes to the instance before the client's bytes (the listener's proxy_protocol)."""
    mode = conn.spec.proxy_protocol
    if mode == "none":
        return b""
    if mode == "v1":
        return build_v1(conn.peer, conn.local)
    return build_v2(conn.peer, conn.local)


@dataclass(eq=False, slots=True)
class _Route:
    """A connection on its way to an instance: what it is, and the instances tried."""

    conn: Connection
    name: str
    info: ConnInfo
    rule: RouteRule | None
    tried: set[str] = field(default_factory=set)


class DataPlane:
    def __init__(
        self, settings: NlbSettings, registry: InstanceRegistry, metrics: NlbMetrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        strategy = settings.nlb_balance if is_strategy(settings.nlb_balance) else "least_conn"
        self.balancer = Balancer(strategy)
        self.bluegreen = BlueGreen(rollback_error_rate=settings.nlb_rollback_error_rate)
        self.limits = ConnectionLimits(
            settings.redis_url,
            settings.nlb_ratelimit_prefix,
            max_client_buckets=settings.nlb_ratelimit_max_client_buckets,
        )
        self.limits.on_decision = self._record_tokens
        self.static_specs = parse_listeners_env(settings.nlb_listeners)
        self.state_rules: tuple[RouteRule, ...] = ()
        self.rpc_rules: dict[str, RouteRule] = {}
        self.table = RoutingTable()
        self.rule_hits: dict[str, tuple[int, float]] = {}
        self._servers: dict[tuple[str, int, str], tuple[ListenerSpec, Any]] = {}
        self._bound: dict[tuple[str, int, str], tuple[str, int]] = {}
        self._relays: dict[FdRelay, Instance] = {}
        self._engine: FdRelayEngine | None = None  # made on first use, on the running loop
        self._pending: set[Connection] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.failed_connections = 0
        self.retried_connections = 0
        #: hand-over channels to co-located instances, by (socket path, instance id); one that
        #: failed is not tried again before the time in ``_handoff_down``
        self._handoffs: dict[tuple[str, str], ConnectionHandoff] = {}
        self._handoff_down: dict[tuple[str, str], float] = {}
        self.handed_off = 0
        self.autoscaler: Any = None
        self.inherited: dict[str, socket.socket] = {}
        # field -> value: from the last applied snapshot, and set by UpdateNLBConfig
        self._state_values: dict[str, list[Any]] = {}
        self._rpc_values: dict[str, list[Any]] = {}
        #: after a hand-over: the desired-state version the old process's RPC values were set
        #: on top of (see keep_rpc_values_over)
        self._carried_version: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        for spec in self.static_specs:
            await self._open(spec)

    async def _open(self, spec: ListenerSpec) -> None:
        host = spec.host or self.settings.nlb_data_host
        name = f"{spec.transport}:{host}:{spec.port}"
        sock = self.inherited.pop(name, None)
        if spec.transport == "udp":
            relay = UdpRelay(
                partial(self._pick_udp, spec), idle_timeout=self.settings.nlb_udp_idle_timeout
            )
            bound = await relay.start(host, spec.port, sock=sock)
            self._servers[spec.key] = (spec, relay)
        else:
            if sock is None:
                sock = await listen_tcp(host, spec.port)
            listener = TcpListener(self, spec, sock)
            listener.start()
            sockname = sock.getsockname()
            bound = (str(sockname[0]), int(sockname[1]))
            self._servers[spec.key] = (spec, listener)
        self._bound[spec.key] = bound
        _log.info("listener_started", listener=spec.name, address=f"{bound[0]}:{bound[1]}",
                  protocols=sorted(spec.protocols), default=spec.default_protocol)  # fmt: skip

    async def _close(self, key: tuple[str, int, str]) -> None:
        spec, server = self._servers.pop(key)
        self._bound.pop(key, None)
        server.close()
        _log.info("listener_stopped", listener=spec.name)

    def listener_addresses(self) -> list[tuple[str, int]]:
        return list(self._bound.values())

    def listening_sockets(self) -> list[tuple[str, socket.socket]]:
        """(name, socket) of every listener, TCP and UDP, for a hitless hand-over."""
        out = []
        for spec, server in self._servers.values():
            name = f"{spec.transport}:{spec.host or self.settings.nlb_data_host}:{spec.port}"
            sock = server.listening_socket if spec.transport == "udp" else server.sock
            if sock is not None:
                out.append((name, sock))
        return out

    async def stop_accepting(self) -> None:
        # every connection accepted so far is already in _pending: drain serves it
        for key in list(self._servers):
            await self._close(key)

    async def drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
        for relay in list(self._relays):
            relay.abort("drain deadline")
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        for channel in self._handoffs.values():
            await channel.close()
        await self.limits.close()

    # -- desired state -------------------------------------------------------------------------

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        """Validate the whole nlb snapshot, then swap everything at once.

        ``rate_limits`` and ``deployments`` set by UpdateNLBConfig (see :meth:`apply_dynamic`)
        hold until a snapshot changes that field: one that carries the same value as the
        snapshot before it leaves the RPC's value in force."""
        errors: list[str] = []
        specs: list[ListenerSpec] = []
        listeners = snapshot.get("listeners") or []
        if not isinstance(listeners, list):
            errors.append("listeners must be a list of objects")
            listeners = []
        for i, li in enumerate(listeners):
            if not isinstance(li, Mapping):
                errors.append(f"listeners[{i}] must be an object")
                continue
            try:
                specs.append(
                    make_listener(
                        str(li.get("name") or f"listener-{i}"),
                        int(li.get("port", -1)),
                        list(li.get("protocols") or []),
                        str(li.get("default_protocol") or ""),
                        str(li.get("transport") or "tcp"),
                        proxy_protocol=str(li.get("proxy_protocol") or "v2").lower(),
                    )
                )
            except (ListenerSpecError, TypeError, ValueError) as exc:
                errors.append(f"listeners[{i}]: {exc}")
        try:
            rules = rules_from_snapshot(snapshot.get("routes") or [])
        except (RuleError, TypeError, ValueError, AttributeError) as exc:
            errors.append(f"routes: {exc}")
            rules = []
        state_limits = snapshot.get("rate_limits") or []
        errors += parse_rules(state_limits)[1]
        state_deployments = snapshot.get("deployments") or []
        errors += BlueGreen.validate(state_deployments)
        policies = snapshot.get("scaling_policies") or []
        if self.autoscaler is not None:
            errors += self.autoscaler.validate(policies)
        if errors:
            return errors
        if self._carried_version is not None:
            if int(snapshot.get("version", -1)) == self._carried_version:
                # the very snapshot the old process's RPC values were set on top of: not a
                # change, so they stay in force
                self._state_values.update(rate_limits=state_limits, deployments=state_deployments)
            self._carried_version = None
        self.state_rules = tuple(rules)
        self._rebuild_table()
        self._set_limit_rules(parse_rules(self._from_state("rate_limits", state_limits))[0])
        self.bluegreen.load(self._from_state("deployments", state_deployments))
        self._publish_split_metrics()
        if self.autoscaler is not None:
            self.autoscaler.load(policies)
        await self._reconcile_listeners(specs)
        return []

    def _from_state(self, field: str, value: list[Any]) -> list[Any]:
        """The value of ``field`` in force after a snapshot carrying ``value``: the RPC's, unless
        this snapshot changed the field since the one before (no snapshot counts as [])."""
        if self._state_values.get(field, []) != value:
            self._rpc_values.pop(field, None)
        self._state_values[field] = value
        return self._rpc_values.get(field, value)

    def validate_dynamic(self, update: Mapping[str, Any]) -> list[str]:
        """UpdateNLBConfig's data-plane keys, with the snapshot's own validation."""
        errors: list[str] = []
        if "rate_limits" in update:
            errors += parse_rules(update["rate_limits"])[1]
        if "traffic_split" in update:
            errors += BlueGreen.validate(update["traffic_split"], "traffic_split")
        return errors

    def apply_dynamic(self, update: Mapping[str, Any]) -> None:
        """Apply validated ``rate_limits`` / ``traffic_split`` (deployments) from the RPC. Open
        connections are never touched: limits and splits apply to new connections only."""
        if "rate_limits" in update:
            self._rpc_values["rate_limits"] = list(update["rate_limits"])
            self._set_limit_rules(parse_rules(update["rate_limits"])[0])
        if "traffic_split" in update:
            self._rpc_values["deployments"] = list(update["traffic_split"])
            self.bluegreen.load(update["traffic_split"], keep_rollbacks=False)
            self._publish_split_metrics()

    def keep_rpc_values_over(self, config_version: int) -> None:
        """After a hand-over: the RPC values in force were set by the old process on top of
        desired state ``config_version``, so they outlast this process's first snapshot if that
        is the same version (a different one may have changed the fields: the usual rule)."""
        self._carried_version = config_version

    def rpc_overrides(self) -> dict[str, Any]:
        """UpdateNLBConfig values still in force, under their RPC names."""
        names = {"rate_limits": "rate_limits", "deployments": "traffic_split"}
        return {names[k]: v for k, v in self._rpc_values.items()}

    async def _reconcile_listeners(self, dynamic: Sequence[ListenerSpec]) -> None:
        wanted = {s.key: s for s in (*self.static_specs, *dynamic)}
        for key in [k for k in self._servers if k not in wanted]:
            await self._close(key)
        for key, spec in wanted.items():
            current = self._servers.get(key)
            if current is not None and current[0] == spec:
                continue
            if current is not None:
                await self._close(key)
            try:
                await self._open(spec)
            except OSError as exc:
                _log.error("listener_failed", listener=spec.name, error=str(exc))

    def _rebuild_table(self) -> None:
        self.table = RoutingTable.build((*self.state_rules, *self.rpc_rules.values()))

    def _publish_split_metrics(self) -> None:
        self.metrics.bluegreen_split.clear()
        for module, split in self.bluegreen.splits.items():
            for version, weight in split.weights.items():
                self.metrics.bluegreen_split.labels(module, version).set(weight)

    # -- the connection path -------------------------------------------------------------------

    def should_sniff(self, spec: ListenerSpec) -> bool:
        """A one-protocol listener skips sniffing, unless a route rule matches on something
        only the first bytes tell (SNI, Host, database, user) and its protocol has them."""
        if spec.sniff:
            return True
        return self.table.needs_details and spec.default_protocol in DESCRIBED_BY_FIRST_BYTES

    def accept(self, conn: Connection) -> None:
        # Connections the kernel accepted for us are served even while we stop accepting (a
        # hand-over or drain): refusing them would reset a client that did nothing wrong.
        self.metrics.child(self.metrics.connections_total, conn.spec.name).inc()
        self._pending.add(conn)
        self._idle.clear()

    def release(self, conn: Connection) -> None:
        self._pending.discard(conn)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._pending and not self._relays:
            self._idle.set()

    def describe(self, conn: Connection, verdict: Verdict | None) -> tuple[str, ConnInfo]:
        """The protocol name and routing facts of a sniffed connection."""
        name = ""
        host = database = user = ""
        alpn: tuple[str, ...] = ()
        if isinstance(verdict, Match):
            name = str(verdict.protocol.value)
            d = verdict.details
            if isinstance(d, TlsDetails):
                host, alpn = d.sni or "", tuple(d.alpn)
            elif isinstance(d, HttpDetails):
                host = host_without_port(d.host) if d.host else ""
            elif isinstance(d, PostgresDetails):
                database, user = d.database or "", d.user or ""
        if (not name or isinstance(verdict, Unknown)) and conn.spec.default_protocol:
            name = conn.spec.default_protocol
        protocol = ACCEPTORS.get(name, (P.PROTOCOL_UNSPECIFIED,))[0]
        info = ConnInfo(
            protocol=protocol,
            listener_port=conn.local[1],
            host=host.lower(),
            database=database,
            user=user,
            alpn=alpn,
            client_ip=conn.peer[0],
        )
        return name, info

    def forward(self, conn: Connection, verdict: Verdict | None) -> None:
        """Route a sniffed connection and connect it. Without rate-limit rules or a hand-over
        this runs in callbacks (no task per connection); ``release(conn)`` ends every path."""
        try:
            self.metrics.sniff_seconds.observe(self.engine.loop.time() - conn.started)
            name, info = self.describe(conn, verdict)
            if not name or name not in conn.spec.protocols:
                self._refuse(conn, name or "unknown", "unknown_protocol")
                return
            rule = self.table.match(info)
            if rule is not None:
                self.rule_hits[rule.name] = (
                    self.rule_hits.get(rule.name, (0, 0.0))[0] + 1,
                    time.time(),
                )
            route = _Route(conn, name, info, rule)
            if self.limits.rules:
                spawn(self._admit(route), name=f"nlb conn {conn.conn_id} rate limits")
            else:
                self._try_next(route)
        except Exception:
            self._abandon(conn)

    async def _admit(self, route: _Route) -> None:
        conn = route.conn
        try:
            rule_name = route.rule.name if route.rule else None
            denied, allowed = await self.limits.admit(route.info, route.name, rule_name)
            for bucket in allowed:
                self.metrics.ratelimit_allowed.labels(bucket).inc()
            if denied is not None:
                self.metrics.ratelimit_denied.labels(denied).inc()
                self._refuse(conn, route.name, "rate_limited")
                return
            self._try_next(route)
        except Exception:
            self._abandon(conn)

    def _try_next(self, route: _Route) -> None:
        """Pick an instance not tried yet and connect (or hand over) to it."""
        conn, name = route.conn, route.name
        if len(route.tried) >= self.settings.nlb_connect_attempts:
            self._refuse(conn, name, "connect_failed")
            return
        inst, version = self._pick(name, route.info, route.rule, route.tried)
        if inst is None:
            self._refuse(conn, name, "connect_failed" if route.tried else "no_module")
            return
        route.tried.add(inst.instance_id)
        host, port = inst.address_for(ACCEPTORS.get(name, ()))
        if HANDOFF_LABEL in inst.labels and self.settings.nlb_module_handoff:
            spawn(
                self._hand_off_or_connect(route, inst, version, host, port),
                name=f"nlb conn {conn.conn_id} hand-over",
            )
            return
        self._connect(route, inst, version, host, port)

    async def _hand_off_or_connect(
        self, route: _Route, inst: Instance, version: str | None, host: str, port: int
    ) -> None:
        try:
            if await self._hand_off(route.conn, inst, version, route.name, port):
                self.release(route.conn)
                return
            self._connect(route, inst, version, host, port)
        except Exception:
            self._abandon(route.conn)

    def _connect(
        self, route: _Route, inst: Instance, version: str | None, host: str, port: int
    ) -> None:
        loop = self.engine.loop  # not get_running_loop(): on 3.11 that is a getpid() call
        started = loop.time()

        def connected(upstream: socket.socket | None, exc: BaseException | None) -> None:
            conn = route.conn
            try:
                if upstream is None:
                    self.retried_connections += 1
                    self._record_version(inst, version, failed=True)
                    _log.warning(
                        "upstream_connect_failed", instance_id=inst.instance_id, error=repr(exc)
                    )
                    self._try_next(route)
                    return
                self.metrics.connect_seconds.observe(loop.time() - started)
                self._attach(conn, upstream, proxy_header(conn), inst, version, route.name)
                self.release(conn)
            except Exception:
                self._abandon(conn)

        self.engine.start_connect(
            host, port, connect_timeout=self.settings.nlb_connect_timeout, callback=connected
        )

    def _abandon(self, conn: Connection) -> None:
        """A bug on the connection path (it runs in engine callbacks, which must not raise):
        logged, and the client is closed rather than left hanging."""
        _log.exception("connection_path_failed", client=f"{conn.peer[0]}:{conn.peer[1]}")
        if conn in self._pending:
            self.drop(conn)

    def drop(self, conn: Connection) -> None:
        """Close a client we will not relay (refused, gone while sniffed) and forget it."""
        self.engine.unwatch(conn.sock, forget=True)
        conn.close()
        self.release(conn)

    @property
    def engine(self) -> FdRelayEngine:
        if self._engine is None:
            self._engine = FdRelayEngine(asyncio.get_running_loop())
        return self._engine

    def _attach(
        self,
        conn: Connection,
        upstream: socket.socket,
        header: bytes,
        inst: Instance,
        version: str | None,
        name: str,
    ) -> None:
        """Both sockets go to the relay engine (what the client sent after its sniffed bytes
        is still in the kernel's buffer: the engine reads it from there)."""
        inst.active_connections += 1
        inst.routed_total += 1
        self.metrics.child(self.metrics.active_connections, inst.module_id).inc()
        self.metrics.child(self.metrics.routed_connections, name, inst.module_id).inc()
        self._record_version(inst, version, failed=False)
        relayed_before = len(conn.sniffed)

        def closed(relay: FdRelay) -> None:
            self._relay_closed(relay, inst, relayed_before)

        relay = self.engine.join(
            conn.sock,
            upstream,
            first=header + bytes(conn.sniffed),
            client_eof=conn.eof,
            idle_timeout=self.settings.nlb_idle_timeout or None,
            on_close=closed,
        )
        if not relay.closed:
            self._relays[relay] = inst
        else:
            self._relay_closed(relay, inst, relayed_before, attached=False)

    async def _hand_off(
        self, conn: Connection, inst: Instance, version: str | None, name: str, port: int
    ) -> bool:
        """Pass the client socket to ``inst`` when it is co-located and takes hand-overs (it
        then talks to the client directly); False when it does not or the hand-over failed,
        and the caller relays as usual."""
        path = inst.labels.get(HANDOFF_LABEL)
        if not path or not self.settings.nlb_module_handoff:
            return False
        key = (path, inst.instance_id)
        first = bytes(conn.sniffed)
        loop = asyncio.get_running_loop()
        if len(first) > MAX_FIRST_BYTES or self._handoff_down.get(key, 0.0) > loop.time():
            return False
        channel = self._handoffs.get(key)
        if channel is None:
            self._forget_handoffs()
            # the path is on our host: the module answering there must be this instance (another
            # host's instance may advertise the same path)
            channel = self._handoffs[key] = ConnectionHandoff(path, expect=inst.instance_id)
        # out of our epoll first: the descriptor lives on in the module, and a registration
        # of it would outlive our close (a stale entry under a reused descriptor number)
        self.engine.unwatch(conn.sock, forget=True)
        try:
            async with asyncio.timeout(self.settings.nlb_connect_timeout):
                await channel.send(
                    conn.sock,
                    first_bytes=first,
                    client=conn.peer,
                    port=port,
                )
        except (OSError, FdPassError, TimeoutError) as exc:
            self._handoff_down[key] = loop.time() + HANDOFF_RETRY_AFTER
            self.metrics.child(self.metrics.handoffs, inst.module_id, "failed").inc()
            _log.warning("handoff_failed", instance_id=inst.instance_id, path=path, error=repr(exc))
            return False
        self._handoff_down.pop(key, None)
        self.handed_off += 1
        inst.routed_total += 1
        self.metrics.child(self.metrics.handoffs, inst.module_id, "ok").inc()
        self.metrics.child(self.metrics.routed_connections, name, inst.module_id).inc()
        self.metrics.child(self.metrics.bytes, "up").inc(len(first))
        self._record_version(inst, version, failed=False)
        conn.close()  # our descriptor only: the module holds the connection now
        return True

    def _forget_handoffs(self) -> None:
        """Close the channels of instances that left the registry (restarted, removed)."""
        live = {i.instance_id for i in self.registry.all()}
        for key in [k for k in self._handoffs if k[1] not in live]:
            self._handoff_down.pop(key, None)
            spawn(self._handoffs.pop(key).close(), name=f"handoff-close {key[0]}")

    def _relay_closed(
        self, relay: FdRelay, inst: Instance, relayed_before: int, *, attached: bool = True
    ) -> None:
        """``relayed_before``: client bytes read before the relay (sniffed, early data)."""
        if attached and self._relays.pop(relay, None) is None:
            return  # closed inside join: counted by _attach
        stats = relay.stats()
        inst.active_connections = max(0, inst.active_connections - 1)
        self.metrics.child(self.metrics.active_connections, inst.module_id).dec()
        self.metrics.child(self.metrics.bytes, "up").inc(stats.bytes_up + relayed_before)
        self.metrics.child(self.metrics.bytes, "down").inc(stats.bytes_down)
        self._maybe_idle()

    def _refuse(self, conn: Connection, name: str, error_type: str) -> None:
        self.drop(conn)
        self.failed_connections += 1
        self.metrics.routing_errors.labels(name, error_type).inc()
        _log.info(
            "connection_refused",
            reason=error_type,
            protocol=name,
            client=f"{conn.peer[0]}:{conn.peer[1]}",
            listener=conn.spec.name,
        )

    def _record_version(self, inst: Instance, version: str | None, *, failed: bool) -> None:
        if version is None:
            return
        event = self.bluegreen.record(inst.module_id, version, failed=failed)
        if event is not None:
            _log.warning("bluegreen_auto_rollback", **event)
            self._publish_split_metrics()

    def _candidates(self, name: str, info: ConnInfo, rule: RouteRule | None) -> list[Instance]:
        for protocol in ACCEPTORS.get(name, ()):
            found = self.registry.candidates(protocol)
            if rule is not None:
                found = [i for i in found if i.module_id == rule.module]
            found = [i for i in found if not i.capacity or i.active_connections < i.capacity]
            if rule is None and len({i.module_id for i in found}) > 1:
                owned = [i for i in found if i.module_type == OWNER_TYPE.get(name)]
                found = owned or found
            if found:
                return found
        return []

    def _pick(
        self, name: str, info: ConnInfo, rule: RouteRule | None, exclude: set[str]
    ) -> tuple[Instance | None, str | None]:
        candidates = [i for i in self._candidates(name, info, rule) if i.instance_id not in exclude]
        if not candidates:
            return None, None
        version = None
        modules = {i.module_id for i in candidates}
        if len(modules) == 1:
            module = next(iter(modules))
            version = self.bluegreen.choose(module, {i.version for i in candidates})
            if version is not None:
                candidates = [i for i in candidates if i.version == version]
        chosen = self.balancer.pick(candidates, info.client_ip)
        return chosen, version

    def _pick_udp(self, spec: ListenerSpec, client: tuple[str, int]) -> tuple[str, int] | None:
        info = ConnInfo(protocol=P.PROTOCOL_UDP, listener_port=spec.port, client_ip=client[0])
        inst, _ = self._pick(spec.default_protocol or "udp", info, self.table.match(info), set())
        if inst is None:
            self.metrics.routing_errors.labels("udp", "no_module").inc()
            return None
        inst.routed_total += 1
        address: tuple[str, int] = inst.address_for((P.PROTOCOL_UDP,))
        return address

    # -- status --------------------------------------------------------------------------------

    def _set_limit_rules(self, rules: Sequence[LimitRule]) -> None:
        gone = {r.target for r in self.limits.rules} - {r.target for r in rules}
        self.limits.rules = tuple(rules)
        for target in gone:
            self.metrics.forget(self.metrics.ratelimit_tokens, target)
            self.limits.remaining.pop(target, None)

    def _record_tokens(self, bucket: str, decision: Decision) -> None:
        # bucket is a rule target: bounded labels (one per rule, client_ip as one)
        self.metrics.child(self.metrics.ratelimit_tokens, bucket).set(decision.remaining)

    def status(self) -> dict[str, Any]:
        rl = self.limits.status()
        return {
            "rate_limiting": bool(self.limits.rules),
            "autoscaling": bool(self.autoscaler is not None and self.autoscaler.enabled),
            "bluegreen": bool(self.bluegreen.splits),
            "connection_pooling": False,
            "ratelimit_stats": rl,
            "bluegreen_stats": {
                "active_deployments": [
                    {"protocol": self._module_protocol(d["module"]), **d}
                    for d in self.bluegreen.status()
                ],
                "rollbacks": list(self.bluegreen.events),
            },
            "autoscaler_stats": self.autoscaler.status()
            if self.autoscaler is not None
            else {"enabled": False, "last_evaluation": None, "recent_scaling_history": []},
            "client_pool_stats": {
                "total_connections": sum(i.routed_total for i in self.registry.all()),
                "active_connections": len(self._relays),
                "failed_connections": self.failed_connections,
                "reconnect_attempts": self.retried_connections,
            },
            "listeners": [
                {
                    "name": spec.name,
                    "address": f"{self._bound[key][0]}:{self._bound[key][1]}",
                    "transport": spec.transport,
                    "protocols": sorted(spec.protocols),
                    "default_protocol": spec.default_protocol,
                    "proxy_protocol": spec.proxy_protocol,
                }
                for key, (spec, _) in self._servers.items()
            ],
            "routing_rules": len(self.table.rules),
            "balance_strategy": self.balancer.strategy,
        }

    def _module_protocol(self, module: str) -> str:
        """Seed 002 reports splits per protocol; ours are per module: name the protocol its
        instances serve (the first, by name), or the module itself when none is registered."""
        names = sorted(
            protocol_name(p) for i in self.registry.by_module(module) for p in i.protocols
        )
        return names[0] if names else module

    # -- RPCs ----------------------------------------------------------------------------------

    async def route_request(self, req: nlb_pb2.RouteRequestRequest) -> nlb_pb2.RouteRequestResponse:
        name = protocol_name(req.protocol)
        attrs = dict(req.attributes)
        info = ConnInfo(
            protocol=req.protocol,
            listener_port=req.listener_port,
            host=req.host.lower(),
            database=attrs.get("database", ""),
            user=attrs.get("user", ""),
            client_ip=req.client_ip,
        )
        rule = self.table.match(info)
        inst, _ = self._pick(name, info, rule, set())
        if inst is None:
            self.metrics.routing_errors.labels(name, "no_module").inc()
            return nlb_pb2.RouteRequestResponse(success=False, message="no module instance")
        return nlb_pb2.RouteRequestResponse(
            success=True,
            message=f"routed to {inst.instance_id}",
            instance=instance_pb(inst, self.registry_now()),
            route_id=rule.name if rule else "",
        )

    def registry_now(self) -> float:
        return time.monotonic()

    def _rule_from_pb(self, route: types_pb2.Route) -> RouteRule:
        return make_rule(
            name=route.name or route.route_id,
            module=route.module_id,
            priority=route.priority,
            protocol=route.protocol,
            host=route.match.get("host") or route.match.get("sni") or route.destination_pattern,
            database=route.match.get("database", ""),
            user=route.match.get("user", ""),
            ports=list(route.ports),
            source=route.source_pattern,
            enabled=route.enabled,
            origin="rpc",
        )

    async def validate_route(
        self, req: nlb_pb2.ValidateRouteRequest
    ) -> nlb_pb2.ValidateRouteResponse:
        try:
            rule = self._rule_from_pb(req.route)
        except RuleError as exc:
            return nlb_pb2.ValidateRouteResponse(valid=False, errors=[str(exc)])
        capable = [
            i
            for i in self.registry.all()
            if i.module_id == rule.module
            and i.routable
            and (not rule.protocol or rule.protocol in i.protocols)
        ]
        errors = [] if capable else [f"no routable instance of module {rule.module!r}"]
        now = self.registry_now()
        return nlb_pb2.ValidateRouteResponse(
            valid=not errors,
            errors=errors,
            capable_instances=[instance_pb(i, now) for i in capable],
        )

    def _rules_from_pb(
        self, routes: Sequence[types_pb2.Route]
    ) -> tuple[list[RouteRule], list[str]]:
        errors: list[str] = []
        rules: list[RouteRule] = []
        for i, route in enumerate(routes):
            try:
                rules.append(self._rule_from_pb(route))
            except RuleError as exc:
                errors.append(f"routes[{i}]: {exc}")
        return rules, errors

    def carry_rpc_routes(self, routes: Sequence[types_pb2.Route]) -> list[str]:
        """After a hand-over: the old process's UpdateRouting rules, all or (errors) none."""
        rules, errors = self._rules_from_pb(routes)
        if not errors:
            self.rpc_rules = {r.name: r for r in rules}
            self._rebuild_table()
        return errors

    async def update_routing(
        self, req: nlb_pb2.UpdateRoutingRequest
    ) -> nlb_pb2.UpdateRoutingResponse:
        rules, errors = self._rules_from_pb(req.routes)
        if errors:
            return nlb_pb2.UpdateRoutingResponse(
                success=False, message="rejected", validation_errors=errors
            )
        if req.validate_only:
            return nlb_pb2.UpdateRoutingResponse(success=True, message="valid")
        new = {} if req.replace else dict(self.rpc_rules)
        new.update({r.name: r for r in rules})
        self.rpc_rules = new
        self._rebuild_table()
        return nlb_pb2.UpdateRoutingResponse(
            success=True, message="applied", routes_applied=len(rules)
        )

    async def get_routing_table(
        self, req: nlb_pb2.GetRoutingTableRequest
    ) -> nlb_pb2.GetRoutingTableResponse:
        entries = []
        for rule in self.table.rules:
            if req.module_id and rule.module != req.module_id:
                continue
            if req.protocol and rule.protocol and rule.protocol != req.protocol:
                continue
            pb = types_pb2.Route(
                route_id=rule.name,
                name=rule.name,
                protocol=P.Protocol.ValueType(rule.protocol),  # a Route.protocol, or 0 (any)
                destination_pattern=rule.host,
                ports=sorted(rule.ports),
                priority=rule.priority,
                enabled=rule.enabled,
                module_id=rule.module,
                source_pattern=rule.source,
            )
            if rule.database:
                pb.match["database"] = rule.database
            if rule.user:
                pb.match["user"] = rule.user
            pb.metadata["origin"] = rule.origin
            hits, last = self.rule_hits.get(rule.name, (0, 0.0))
            entry = nlb_pb2.RoutingEntry(
                route=pb,
                target_instance_ids=[
                    i.instance_id for i in self.registry.all() if i.module_id == rule.module
                ],
                connections_routed=hits,
            )
            if last:
                entry.last_used.FromNanoseconds(int(last * 1e9))
            entries.append(entry)
        return nlb_pb2.GetRoutingTableResponse(entries=entries)

    def _load(self, module_id: str = "", module_type: int = 0) -> list[nlb_pb2.LoadInfo]:
        instances = [
            i
            for i in self.registry.all()
            if (not module_id or i.module_id == module_id)
            and (not module_type or i.module_type == module_type)
        ]
        total = sum(i.active_connections for i in instances)
        return [load_info_pb(i, total) for i in instances]

    async def get_load_distribution(
        self, req: nlb_pb2.GetLoadDistributionRequest
    ) -> nlb_pb2.GetLoadDistributionResponse:
        infos = self._load(req.module_id, req.module_type)
        return nlb_pb2.GetLoadDistributionResponse(
            instances=infos, balance_score=balance_score([i.active_connections for i in infos])
        )

    async def rebalance_load(
        self, req: nlb_pb2.RebalanceLoadRequest
    ) -> nlb_pb2.RebalanceLoadResponse:
        # L4 connections cannot move between instances; new connections already go to the
        # least-loaded instance. Report the distribution both ways and say so.
        before = self._load(req.module_id)
        return nlb_pb2.RebalanceLoadResponse(
            success=True,
            message="open connections stay where they are; new ones follow "
            f"{self.balancer.strategy}",
            before=before,
            after=before,
        )

    async def trigger_scaling(
        self, req: nlb_pb2.TriggerScalingRequest
    ) -> nlb_pb2.TriggerScalingResponse:
        current = len([i for i in self.registry.by_module(req.module_id) if not i.draining])
        if self.autoscaler is None:
            return nlb_pb2.TriggerScalingResponse(
                success=False,
                message="no scaling executor is configured (NLB_SCALER)",
                current_instances=current,
                target_instances=req.target_instances or current,
            )
        result: nlb_pb2.TriggerScalingResponse = await self.autoscaler.trigger(
            req.module_id, req.target_instances, req.reason or "TriggerScaling RPC", req.dry_run
        )
        return result
