"""Route rules for new connections (pure): which module may take a connection.

A connection is described by :class:`ConnInfo` (protocol, listener port, SNI or Host, database,
ALPN, client IP). Rules come from desired state (module routes whose ``match_rules`` name a
host, database or ports) and from ``UpdateRouting``. The enabled rule with the highest priority
whose every condition holds names the module; with no matching rule every module that serves the
protocol is a candidate.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_RULES = 10_000
MAX_PATTERN = 255


class RuleError(ValueError):
    """A route rule is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class ConnInfo:
    protocol: int
    listener_port: int = 0
    host: str = ""  # SNI for TLS, Host for HTTP/1
    database: str = ""
    user: str = ""
    alpn: tuple[str, ...] = ()
    client_ip: str = ""


@dataclass(frozen=True, slots=True)
class RouteRule:
    name: str
    module: str
    priority: int = 0
    protocol: int = 0  # 0: any
    host: str = ""  # glob, case-insensitive ("*.example.com")
    database: str = ""
    user: str = ""
    ports: frozenset[int] = frozenset()
    source: str = ""  # client CIDR
    enabled: bool = True
    origin: str = "state"  # "state" (desired state) or "rpc" (UpdateRouting)
    _net: Any = field(default=None, compare=False, repr=False)

    def matches(self, c: ConnInfo) -> bool:
        if not self.enabled:
            return False
        if self.protocol and self.protocol != c.protocol:
            return False
        if self.ports and c.listener_port not in self.ports:
            return False
        if self.host and not fnmatch.fnmatchcase(c.host.lower(), self.host):
            return False
        if self.database and self.database != c.database:
            return False
        if self.user and self.user != c.user:
            return False
        if self._net is not None:
            try:
                return ipaddress.ip_address(c.client_ip) in self._net
            except ValueError:
                return False
        return True

    @property
    def is_specific(self) -> bool:
        """A rule with no condition at all would capture every connection of its protocol."""
        return bool(self.host or self.database or self.user or self.ports or self.source)


def host_without_port(host: str) -> str:
    """An HTTP Host value (RFC 9110 section 7.2: uri-host [":" port]) without its port, with an
    IPv6 literal unbracketed: "a.example:8080" -> "a.example", "[::1]:8080" and "[::1]" ->
    "::1". A value with several colons and no brackets is no valid Host; it is kept whole."""
    host = host.strip()
    if host.startswith("["):
        inner, sep, _ = host[1:].partition("]")
        return inner if sep else host
    name, sep, port = host.rpartition(":")
    if sep and ":" not in name and port.isdigit():
        return name
    return host


def make_rule(
    *,
    name: str,
    module: str,
    priority: int = 0,
    protocol: int = 0,
    host: str = "",
    database: str = "",
    user: str = "",
    ports: Iterable[int] = (),
    source: str = "",
    enabled: bool = True,
    origin: str = "state",
) -> RouteRule:
    if not name or len(name) > MAX_PATTERN:
        raise RuleError("route name is required (at most 255 characters)")
    if not module:
        raise RuleError(f"route {name!r}: module is required")
    if len(host) > MAX_PATTERN:
        raise RuleError(f"route {name!r}: host pattern is too long")
    port_set = frozenset(int(p) for p in ports)
    if any(not 1 <= p <= 65535 for p in port_set):
        raise RuleError(f"route {name!r}: ports must be 1-65535")
    net = None
    if source:
        try:
            net = ipaddress.ip_network(source, strict=False)
        except ValueError:
            raise RuleError(f"route {name!r}: source {source!r} is not a CIDR") from None
    if host.startswith("[") and host.endswith("]"):  # an IPv6 literal, matched unbracketed
        host = host[1:-1]
    return RouteRule(
        name=name,
        module=module,
        priority=int(priority),
        protocol=int(protocol),
        host=host.lower(),
        database=database,
        user=user,
        ports=port_set,
        source=source,
        enabled=enabled,
        origin=origin,
        _net=net,
    )


def rules_from_snapshot(routes: Sequence[Mapping[str, Any]]) -> list[RouteRule]:
    """Module routes (seed 000 form) that constrain L4 routing: those naming a host, database,
    user, ports or source. Path/method rules are the ALB's business, not the NLB's."""
    out = []
    for r in routes:
        m = r.get("match_rules") or {}
        host = m.get("host") if isinstance(m.get("host"), str) else ""
        rule = make_rule(
            name=str(r.get("name") or r.get("id") or ""),
            module=str(r.get("module") or ""),
            priority=int(r.get("priority") or 0),
            host=host or str(m.get("sni") or ""),
            database=str(m.get("database") or ""),
            user=str(m.get("user") or ""),
            ports=[int(p) for p in m.get("ports") or []],
            source=str(m.get("source") or ""),
            enabled=bool(r.get("enabled", True)),
        )
        if rule.is_specific:
            out.append(rule)
    return out


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """An immutable set of rules, swapped whole on every change (one assignment)."""

    rules: tuple[RouteRule, ...] = ()

    @classmethod
    def build(cls, rules: Iterable[RouteRule]) -> RoutingTable:
        ordered = sorted(rules, key=lambda r: (-r.priority, r.name))
        if len(ordered) > MAX_RULES:
            raise RuleError(f"at most {MAX_RULES} route rules")
        return cls(tuple(ordered))

    @property
    def needs_details(self) -> bool:
        """Some enabled rule matches on SNI/Host, database or user (first-byte facts)."""
        return any(r.enabled and (r.host or r.database or r.user) for r in self.rules)

    def match(self, c: ConnInfo) -> RouteRule | None:
        for rule in self.rules:
            if rule.matches(c):
                return rule
        return None
