"""Seed 000 routes compiled into an immutable routing table. Pure: no I/O, no clock.

A route matches on host (exact or ``*.suffix`` wildcard), path (exact, prefix, glob such as
``/v1/*``, or regex), methods, headers and query parameters. Among the routes that match, the
highest ``priority`` wins, then the longest (most specific) match, then declaration order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .http.framing import normalize_path

MAX_ROUTES = 10_000
MAX_TARGETS_PER_ROUTE = 1_000
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_RETRIES = 2
DEFAULT_MAX_CONNECTIONS_PER_TARGET = 1024  # Envoy's circuit-breaker default
DEFAULT_TUNNEL_IDLE_TIMEOUT = 3600.0  # WebSocket/Upgrade tunnels with no bytes either way
DEFAULT_MAX_BODY_SIZE = 1 << 40  # effectively unbounded unless a route sets it

LB_POLICIES = frozenset(
    {
        "round_robin",
        "least_connections",
        "least_conn",
        "weighted",
        "weighted_round_robin",
        "random",
        "random_two_choices",
        "p2c",
        "consistent_hash",
        "ip_hash",
    }
)


class RouteConfigError(ValueError):
    """A route or module config that cannot be applied."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str
    port: int
    weight: int = 1
    #: "scheme://host:port", the target's name in metrics and logs (built once)
    key: str = field(init=False, repr=False, compare=False)
    #: b"host:port", the Host header sent upstream unless the route preserves the client's
    authority: bytes = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.scheme}://{self.host}:{self.port}")
        object.__setattr__(self, "authority", f"{self.host}:{self.port}".encode())
        object.__setattr__(self, "_hash", hash((self.scheme, self.host, self.port, self.weight)))

    def __hash__(self) -> int:
        # computed once: a target is a dict key several times per request (pool state, idle
        # connections), and the generated __hash__ built and hashed a tuple each time
        return self._hash


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    enabled: bool = False


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests_per_second: float
    burst: float
    scope: str = "local"  # "cluster": one budget shared by every ALB instance, through Redis


@dataclass(frozen=True, slots=True)
class BackendConfig:
    targets: tuple[Target, ...]
    load_balancing: str = "round_robin"
    hash_header: str | None = None
    hash_cookie: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    header_timeout: float = DEFAULT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    retries: int = DEFAULT_RETRIES
    preserve_host: bool = True
    tunnel_idle_timeout: float = DEFAULT_TUNNEL_IDLE_TIMEOUT
    tls_server_name: str | None = None  # SNI and certificate name for https:// targets
    max_connections: int = DEFAULT_MAX_CONNECTIONS_PER_TARGET
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)

    @property
    def pool_key(self) -> tuple[object, ...]:
        return (self.targets, self.load_balancing, self.health_check, self.outlier)


@dataclass(frozen=True, slots=True)
class HostMatch:
    exact: str | None = None
    suffix: str | None = None  # for "*.example.com": ".example.com"

    def matches(self, host: str) -> bool:
        if self.exact is not None:
            return host == self.exact
        assert self.suffix is not None
        return host.endswith(self.suffix) and len(host) > len(self.suffix)

    @property
    def specificity(self) -> int:
        return len(self.exact) + 1 if self.exact is not None else len(self.suffix or "")


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: str  # exact | prefix | glob | regex
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.value
        if self.kind == "prefix":
            if self.value.endswith("/"):
                return path.startswith(self.value)
            return path == self.value or path.startswith(self.value + "/")
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None

    @property
    def specificity(self) -> int:
        if self.kind == "exact":
            return len(self.value) + 1
        if self.kind in ("prefix", "glob"):
            return len(self.value.split("*", 1)[0])
        return 0


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """Header or query condition: exact value, any value ("*"), or regex."""

    name: str
    exact: str | None = None
    regex: re.Pattern[str] | None = None

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return self.exact is None or value == self.exact


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    route_id: str
    priority: int
    hosts: tuple[HostMatch, ...]
    path: PathMatch | None
    methods: frozenset[str]
    headers: tuple[ValueMatch, ...]
    query: tuple[ValueMatch, ...]
    backend: BackendConfig
    rate_limit: RateLimitConfig | None
    max_body_size: int
    raw: Mapping[str, Any]

    def sort_key(self, index: int) -> tuple[int, int, int, int, int]:
        host_spec = max((h.specificity for h in self.hosts), default=0)
        path_spec = self.path.specificity if self.path else 0
        return (
            -self.priority,
            -path_spec,
            -host_spec,
            -(len(self.headers) + len(self.query) + (1 if self.methods else 0)),
            index,
        )


@dataclass(frozen=True, slots=True)
class RequestView:
    """What routing looks at; built once per request by the I/O side."""

    host: str
    path: str
    method: str
    headers: Mapping[str, str]  # lower-cased names
    query: str = ""


def normalize_host(raw: str) -> str:
    h = raw.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end > 0 else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


@dataclass(frozen=True, slots=True)
class RoutingTable:
    routes: tuple[Route, ...] = ()

    @property
    def needs_headers(self) -> bool:
        """Whether any route looks at headers (else the I/O side may skip building them)."""
        return any(r.headers or r.backend.hash_header or r.backend.hash_cookie for r in self.routes)

    @property
    def cacheable(self) -> bool:
        """Whether host, path and method alone decide the match (no header or query rules),
        so the I/O side may remember matches."""
        return not any(r.headers or r.query for r in self.routes)

    def match(self, req: RequestView) -> Route | None:
        host = normalize_host(req.host)
        qs: dict[str, str] | None = None
        for r in self.routes:
            if r.hosts and not any(h.matches(host) for h in r.hosts):
                continue
            if r.path is not None and not r.path.matches(req.path):
                continue
            if r.methods and req.method not in r.methods:
                continue
            if r.headers and not all(c.matches(req.headers.get(c.name)) for c in r.headers):
                continue
            if r.query:
                if qs is None:
                    qs = dict(parse_qsl(req.query, keep_blank_values=True))
                if not all(c.matches(qs.get(c.name)) for c in r.query):
                    continue
            return r
        return None


# ---------------------------------------------------------------------------------- compile


def _glob_to_regex(glob: str) -> re.Pattern[str]:
    out = []
    for ch in glob:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out))


def _compile_path(match: Mapping[str, Any]) -> PathMatch | None:
    if match.get("path_regex"):
        return PathMatch("regex", str(match["path_regex"]), re.compile(str(match["path_regex"])))
    path = match.get("path")
    if path in (None, "", "/", "/*", "*"):
        return None
    if not isinstance(path, str):
        raise RouteConfigError("match_rules.path must be a string")
    kind = str(match.get("path_type", "")).lower()
    if not kind:
        if path.startswith("~"):
            kind, path = "regex", path[1:].strip()
        elif "*" in path or "?" in path:
            kind = "glob"
        else:
            kind = "prefix"
    if kind == "regex":
        return PathMatch("regex", path, re.compile(path))
    if not path.startswith("/"):
        raise RouteConfigError(f"path {path!r} must start with '/'")
    if kind == "glob":
        if path.endswith("/*") and "*" not in path[:-2] and "?" not in path:
            return PathMatch("prefix", path[:-1])  # "/v1/*" == everything under "/v1/"
        return PathMatch("glob", path, _glob_to_regex(path))
    if kind in ("exact", "prefix"):
        # compare like with like: request paths are normalized the same way before matching
        return PathMatch(kind, normalize_path(path))
    raise RouteConfigError(f"unknown path_type {kind!r}")


def _compile_hosts(value: Any) -> tuple[HostMatch, ...]:
    if value in (None, "", "*"):
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise RouteConfigError("match_rules.host must be a string or a list of strings")
    out = []
    for h in items:
        h = h.strip().lower().rstrip(".")
        if h in ("", "*"):
            return ()
        if h.startswith("*."):
            out.append(HostMatch(suffix=h[1:]))
        elif "*" in h:
            raise RouteConfigError(f"host wildcard only as a leading '*.' label: {h!r}")
        else:
            out.append(HostMatch(exact=normalize_host(h)))
    return tuple(out)


def _compile_values(value: Any, what: str, lower_names: bool) -> tuple[ValueMatch, ...]:
    if not value:
        return ()
    if not isinstance(value, Mapping):
        raise RouteConfigError(f"match_rules.{what} must be an object")
    out = []
    for name, cond in value.items():
        n = str(name).lower() if lower_names else str(name)
        if isinstance(cond, Mapping) and "regex" in cond:
            out.append(ValueMatch(n, regex=re.compile(str(cond["regex"]))))
        elif cond in (None, "*", True):
            out.append(ValueMatch(n))
        else:
            out.append(ValueMatch(n, exact=str(cond)))
    return tuple(out)


def parse_target(spec: Any) -> Target:
    weight = 1
    if isinstance(spec, Mapping):
        weight = int(spec.get("weight", 1))
        spec = spec.get("target") or spec.get("url") or spec.get("address")
    if not isinstance(spec, str) or not spec:
        raise RouteConfigError(f"invalid target {spec!r}")
    if "://" not in spec:
        spec = "http://" + spec
    parts = urlsplit(spec)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RouteConfigError(f"invalid target {spec!r}: need http(s)://host:port")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RouteConfigError(f"invalid target port in {spec!r}") from exc
    if weight < 0 or weight > 10_000:
        raise RouteConfigError(f"target weight out of range in {spec!r}")
    return Target(parts.scheme, parts.hostname, port, weight)


def _num(cfg: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = cfg.get(key, default)
    if v is None:
        return default
    try:
        f = float(v)
    except (TypeError, ValueError) as exc:
        raise RouteConfigError(f"{key} must be a number") from exc
    if not lo <= f <= hi:
        raise RouteConfigError(f"{key}={f} out of range [{lo}, {hi}]")
    return f


def _compile_backend(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> BackendConfig:
    specs: list[Any] = []
    if cfg.get("target"):
        specs.append(cfg["target"])
    specs.extend(cfg.get("targets") or [])
    if not specs:
        raise RouteConfigError("backend_config needs target or targets")
    if len(specs) > MAX_TARGETS_PER_ROUTE:
        raise RouteConfigError("too many targets")
    targets = tuple(dict.fromkeys(parse_target(s) for s in specs))
    lb = str(cfg.get("load_balancing", "round_robin")).lower()
    if lb not in LB_POLICIES:
        raise RouteConfigError(f"unknown load_balancing {lb!r}")
    hash_on = cfg.get("hash_on") or {}
    hash_header = hash_cookie = None
    if isinstance(hash_on, Mapping):
        hash_header = str(hash_on["header"]).lower() if hash_on.get("header") else None
        hash_cookie = str(hash_on["cookie"]) if hash_on.get("cookie") else None
    hc_raw = {**(defaults.get("health_check") or {}), **(cfg.get("health_check") or {})}
    hc = HealthCheckConfig(
        path=str(hc_raw.get("path", "/healthz")),
        interval=_num(hc_raw, "interval", 5.0, 0.05, 3600),
        timeout=_num(hc_raw, "timeout", 2.0, 0.05, 600),
        healthy_threshold=int(_num(hc_raw, "healthy_threshold", 2, 1, 100)),
        unhealthy_threshold=int(_num(hc_raw, "unhealthy_threshold", 3, 1, 100)),
        enabled=bool(hc_raw.get("enabled", bool(cfg.get("health_check")))),
    )
    od_raw = {**(defaults.get("outlier_detection") or {}), **(cfg.get("outlier_detection") or {})}
    od = OutlierConfig(
        consecutive_failures=int(_num(od_raw, "consecutive_failures", 5, 1, 10_000)),
        base_ejection_time=_num(od_raw, "base_ejection_time", 30.0, 0.01, 86_400),
        max_ejection_percent=_num(od_raw, "max_ejection_percent", 100.0, 0, 100),
    )
    timeout = _num(cfg, "timeout", DEFAULT_TIMEOUT, 0.001, 86_400)
    return BackendConfig(
        targets=targets,
        load_balancing=lb,
        hash_header=hash_header,
        hash_cookie=hash_cookie,
        timeout=timeout,
        connect_timeout=_num(cfg, "connect_timeout", DEFAULT_CONNECT_TIMEOUT, 0.001, 600),
        header_timeout=_num(cfg, "header_timeout", timeout, 0.001, 86_400),
        idle_timeout=_num(cfg, "idle_timeout", DEFAULT_IDLE_TIMEOUT, 0.001, 86_400),
        retries=int(_num(cfg, "retries", DEFAULT_RETRIES, 0, 10)),
        preserve_host=bool(cfg.get("preserve_host", True)),
        tls_server_name=str(cfg["tls_server_name"]) if cfg.get("tls_server_name") else None,
        max_connections=int(
            _num(cfg, "max_connections", DEFAULT_MAX_CONNECTIONS_PER_TARGET, 1, 1_000_000)
        ),
        tunnel_idle_timeout=_num(
            cfg, "tunnel_idle_timeout", DEFAULT_TUNNEL_IDLE_TIMEOUT, 0.001, 86_400 * 7
        ),
        health_check=hc,
        outlier=od,
    )


def _compile_rate_limit(value: Any) -> RateLimitConfig | None:
    if value in (None, 0, 0.0, {}):
        return None
    if isinstance(value, int | float):
        if value < 0:
            raise RouteConfigError("rate_limit must be >= 0")
        return RateLimitConfig(float(value), float(max(value, 1)))
    if isinstance(value, Mapping):
        rps = _num(value, "requests_per_second", 0, 0, 1e9)
        if rps == 0:
            return None
        burst = _num(value, "burst", max(rps, 1.0), 1, 1e9)
        scope = str(value.get("scope") or "local")
        if scope not in ("local", "cluster"):
            raise RouteConfigError("rate_limit.scope must be local or cluster")
        return RateLimitConfig(rps, burst, scope)
    raise RouteConfigError("rate_limit must be a number or an object")


def compile_route(raw: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Route:
    defaults = defaults or {}
    name = str(raw.get("name") or raw.get("id") or "")
    if not name:
        raise RouteConfigError("route needs a name")
    match = raw.get("match_rules") or {}
    if not isinstance(match, Mapping):
        raise RouteConfigError(f"route {name}: match_rules must be an object")
    backend_raw = raw.get("backend_config") or {}
    if not isinstance(backend_raw, Mapping):
        raise RouteConfigError(f"route {name}: backend_config must be an object")
    try:
        methods_raw = match.get("method") or match.get("methods") or []
        if isinstance(methods_raw, str):
            methods_raw = [methods_raw]
        max_body = raw.get("max_body_size", backend_raw.get("max_body_size"))
        if max_body is None:
            max_body = defaults.get("max_body_size", DEFAULT_MAX_BODY_SIZE)
        return Route(
            name=name,
            route_id=str(raw.get("id", name)),
            priority=int(raw.get("priority", 0)),
            hosts=_compile_hosts(match.get("host")),
            path=_compile_path(match),
            methods=frozenset(str(m).upper() for m in methods_raw if str(m) != "*"),
            headers=_compile_values(match.get("headers"), "headers", lower_names=True),
            query=_compile_values(match.get("query"), "query", lower_names=False),
            backend=_compile_backend(backend_raw, defaults),
            rate_limit=_compile_rate_limit(raw.get("rate_limit")),
            max_body_size=int(max_body),
            raw=raw,
        )
    except (RouteConfigError, re.error, TypeError, ValueError, KeyError) as exc:
        raise RouteConfigError(f"route {name}: {exc}") from None


def compile_table(
    routes: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any] | None = None
) -> tuple[RoutingTable, list[str]]:
    """Compile every enabled route; returns (table, errors). Errors mean: reject the whole set."""
    if len(routes) > MAX_ROUTES:
        return RoutingTable(), [f"too many routes ({len(routes)} > {MAX_ROUTES})"]
    errors: list[str] = []
    compiled: list[tuple[tuple[int, int, int, int, int], Route]] = []
    seen: set[str] = set()
    for i, raw in enumerate(routes):
        if not isinstance(raw, Mapping):
            errors.append(f"routes[{i}] is not an object")
            continue
        if raw.get("enabled", True) is False:
            continue
        try:
            r = compile_route(raw, defaults)
        except RouteConfigError as exc:
            errors.append(str(exc))
            continue
        if r.name in seen:
            errors.append(f"duplicate route name {r.name!r}")
            continue
        seen.add(r.name)
        compiled.append((r.sort_key(i), r))
    compiled.sort(key=lambda kv: kv[0])
    return RoutingTable(tuple(r for _, r in compiled)), errors
