"""Seed 000 route dicts <-> ``marchproxy.v1.Route`` messages, and a default CanHandle matcher."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from typing import Any

from marchproxy.v1 import types_pb2

MAX_ROUTES = 10_000


def route_to_pb(route: Mapping[str, Any], protocol: int = 0) -> types_pb2.Route:
    match = route.get("match_rules") or {}
    rate = route.get("rate_limit") or {}
    if isinstance(rate, int | float):  # seed 000's short form: requests per second
        rate = {"requests_per_second": rate, "burst": max(rate, 1)}
    pb = types_pb2.Route(
        route_id=str(route.get("id", route.get("name", ""))),
        name=str(route.get("name", "")),
        protocol=protocol,  # type: ignore[arg-type]
        destination_pattern=str(match.get("host", "")),
        priority=int(route.get("priority", 0)),
        enabled=bool(route.get("enabled", True)),
        module_id=str(route.get("module", "")),
    )
    for key in ("host", "path", "database", "user", "sni"):
        if isinstance(match.get(key), str):
            pb.match[key] = match[key]
    pb.metadata["match_rules"] = json.dumps(match, sort_keys=True)
    pb.metadata["backend_config"] = json.dumps(route.get("backend_config") or {}, sort_keys=True)
    if rate:
        pb.rate_limit.CopyFrom(
            types_pb2.RateLimit(
                target=pb.name,
                requests_per_second=int(rate.get("requests_per_second", 0)),
                burst_size=int(rate.get("burst", rate.get("burst_size", 0))),
                enabled=True,
            )
        )
    return pb


def route_from_pb(pb: types_pb2.Route, module_id: str) -> dict[str, Any]:
    """The inverse of :func:`route_to_pb`; raises ValueError on malformed JSON metadata."""
    match: dict[str, Any] = {}
    backend: dict[str, Any] = {}
    if pb.metadata.get("match_rules"):
        match = json.loads(pb.metadata["match_rules"])
    if pb.metadata.get("backend_config"):
        backend = json.loads(pb.metadata["backend_config"])
    if not isinstance(match, dict) or not isinstance(backend, dict):
        raise ValueError("match_rules and backend_config must be JSON objects")
    match.update(dict(pb.match))
    if pb.destination_pattern and "host" not in match:
        match["host"] = pb.destination_pattern
    route: dict[str, Any] = {
        "id": pb.route_id or pb.name,
        "module": pb.module_id or module_id,
        "name": pb.name or pb.route_id,
        "priority": pb.priority,
        "enabled": pb.enabled,
        "match_rules": match,
        "backend_config": backend,
    }
    if pb.HasField("rate_limit") and pb.rate_limit.requests_per_second:
        route["rate_limit"] = {
            "requests_per_second": pb.rate_limit.requests_per_second,
            "burst": pb.rate_limit.burst_size or pb.rate_limit.requests_per_second,
        }
    return route


def validate_routes(routes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Structural checks every module shares; modules add their own in apply_config."""
    errors = []
    if len(routes) > MAX_ROUTES:
        errors.append(f"at most {MAX_ROUTES} routes are allowed")
    seen: set[str] = set()
    for i, r in enumerate(routes):
        name = r.get("name")
        if not isinstance(name, str) or not name:
            errors.append(f"routes[{i}].name is required")
            continue
        if name in seen:
            errors.append(f"routes[{i}].name {name!r} is used twice")
        seen.add(name)
        if not isinstance(r.get("match_rules", {}), dict):
            errors.append(f"routes[{i}].match_rules must be an object")
        if not isinstance(r.get("backend_config", {}), dict):
            errors.append(f"routes[{i}].backend_config must be an object")
    return errors


def _host_matches(pattern: str, host: str) -> bool:
    host = host.lower().rsplit(":", 1)[0] if host.count(":") == 1 else host.lower()
    return fnmatch.fnmatchcase(host, pattern.lower())


def _path_matches(pattern: str, path: str) -> bool:
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern or path.startswith(pattern.rstrip("/") + "/")


def best_route(
    routes: Sequence[Mapping[str, Any]], *, host: str = "", path: str = ""
) -> Mapping[str, Any] | None:
    """The enabled route with the highest priority whose host and path rules accept the request."""
    best: Mapping[str, Any] | None = None
    for r in routes:
        if not r.get("enabled", True):
            continue
        rules = r.get("match_rules") or {}
        want_host = rules.get("host")
        if (
            isinstance(want_host, str)
            and want_host
            and (not host or not _host_matches(want_host, host))
        ):
            continue
        want_path = rules.get("path")
        if isinstance(want_path, str) and want_path and path and not _path_matches(want_path, path):
            continue
        if best is None or int(r.get("priority", 0)) > int(best.get("priority", 0)):
            best = r
    return best
