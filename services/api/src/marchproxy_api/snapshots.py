"""Compile per-component desired-state snapshots (docs/desired-state.md). Pure: no I/O."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from marchproxy_api.schemas import COMPONENTS

#: module type -> component whose data plane runs it; the NLB snapshot carries every module
TYPE_COMPONENT = {
    "ALB": "alb",
    "L7_HTTP": "alb",
    "DBLB": "dblb",
    "AILB": "ailb",
    "RTMP": "rtmp",
    "L4_TCP": "nlb",
    "L4_UDP": "nlb",
    "L3_NETWORK": "nlb",
    "OBSERVABILITY": "nlb",
    "ZERO_TRUST": "nlb",
    "MULTI_CLOUD": "nlb",
}
VOLATILE_KEYS = ("version", "generated_at")


def component_of(module_type: str) -> str:
    return TYPE_COMPONENT.get(module_type, "nlb")


def route_rate_limit(rate: float | None, burst: int | None) -> dict[str, Any] | None:
    if rate is None:
        return None
    return {"requests_per_second": rate, "burst": burst or max(1, math.ceil(rate * 2))}


def _module(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "name": m.name,
        "type": m.type,
        "enabled": m.enabled,
        "version": m.version,
        "config": m.config,
        "replicas": m.replicas,
        "grpc_host": m.grpc_host,
        "grpc_port": m.grpc_port,
    }


def _route(r: Any, module_name: str) -> dict[str, Any]:
    mr = dict(r.match_rules or {})
    match_rules = {
        "host": mr.get("host"),
        "path": mr.get("path"),
        "method": mr.get("method") or [],
        "headers": mr.get("headers") or {},
        "query": mr.get("query") or {},
    }
    backend: dict[str, Any] = {
        "target": None,
        "targets": [],
        "timeout": 30,
        "retries": 3,
        "load_balancing": "round_robin",
    }
    backend.update(r.backend_config or {})
    return {
        "id": r.id,
        "module": module_name,
        "name": r.name,
        "priority": r.priority,
        "enabled": r.enabled,
        "match_rules": match_rules,
        "backend_config": backend,
        "rate_limit": route_rate_limit(r.rate_limit, r.rate_limit_burst),
    }


RouteMemo = dict[int, tuple[Any, str, dict[str, Any]]]


def _route_cached(r: Any, module_name: str, memo: RouteMemo) -> dict[str, Any]:
    """Compiled route dict, reused while the row's ``updated_at`` and module name are unchanged."""
    hit = memo.get(r.id)
    stamp_ = getattr(r, "updated_at", None)
    if hit is not None and hit[0] == stamp_ and hit[1] == module_name and stamp_ is not None:
        return hit[2]
    out = _route(r, module_name)
    memo[r.id] = (stamp_, module_name, out)
    return out


def compile_snapshots(
    src: dict[str, list[Any]], memo: RouteMemo | None = None
) -> dict[str, dict[str, Any]]:
    """Component -> snapshot body without ``version``/``generated_at``.

    ``memo`` (kept by the caller across calls) avoids rebuilding unchanged route dicts; the
    returned structures share those dicts, so callers must treat them as read-only.
    """
    memo = {} if memo is None else memo
    live_ids = {r.id for r in src["routes"]}
    for stale in [i for i in memo if i not in live_ids]:
        del memo[stale]
    names = {m.id: m.name for m in src["modules"]}
    compiled_routes = [
        (r.module_id, _route_cached(r, names[r.module_id], memo))
        for r in src["routes"]
        if r.module_id in names
    ]
    comp_of_module = {m.id: component_of(m.type) for m in src["modules"]}
    out: dict[str, dict[str, Any]] = {}
    for comp in COMPONENTS:
        if comp == "nlb":
            wanted = set(names)
        else:
            wanted = {mid for mid, c in comp_of_module.items() if c == comp}
        body: dict[str, Any] = {
            "component": comp,
            "modules": [_module(m) for m in src["modules"] if m.id in wanted],
            "routes": [route for mid, route in compiled_routes if mid in wanted],
            "deployments": [
                {
                    "id": d.id,
                    "module": names[d.module_id],
                    "version": d.version,
                    "image": d.image,
                    "config": d.config,
                    "traffic_weight": d.traffic_weight,
                    "status": d.status,
                }
                for d in src["deployments"]
                if d.module_id in wanted and d.status in ("ACTIVE", "ROLLING_OUT")
            ],
        }
        if comp == "nlb":
            body["listeners"] = [
                {
                    "name": li.name,
                    "port": li.port,
                    "protocols": li.protocols,
                    "default_protocol": li.default_protocol,
                    "transport": li.transport,
                }
                for li in src["listeners"]
            ]
            body["rate_limits"] = [
                {
                    "target": rl.target,
                    "requests_per_second": rl.requests_per_second,
                    "burst": rl.burst,
                    "scope": rl.scope,
                }
                for rl in src["rate_limits"]
            ]
            body["scaling_policies"] = [
                {
                    "module": names[p.module_id],
                    "min_instances": p.min_instances,
                    "max_instances": p.max_instances,
                    "scale_up_threshold": p.scale_up_threshold,
                    "scale_down_threshold": p.scale_down_threshold,
                    "cooldown_seconds": p.cooldown_seconds,
                    "metric": p.metric,
                    "enabled": p.enabled,
                }
                for p in src["policies"]
            ]
            body["services"] = [
                {
                    "name": s.name,
                    "host": s.host,
                    "port": s.port,
                    "protocol": s.protocol,
                    "module": s.module,
                    "tls_enabled": s.tls_enabled,
                    "health_check_path": s.health_check_path,
                    "enabled": s.enabled,
                    "tags": s.tags,
                }
                for s in src["services"]
            ]
        out[comp] = body
    return out


def content(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snapshot.items() if k not in VOLATILE_KEYS}


def stamp(body: dict[str, Any], version: int) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"component": body["component"], "version": version, "generated_at": now, **body}
