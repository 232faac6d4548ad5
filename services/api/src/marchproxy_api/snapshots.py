"""Compile per-component desired-state snapshots (docs/desired-state.md). Pure: no I/O."""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from .schemas import COMPONENTS

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


_dumps = functools.partial(json.dumps, separators=(",", ":"))
#: the stamp ``stamp_text`` puts after the component and ``content_of`` takes off again
_STAMP = re.compile(r'^(\{"component":"[a-z]+",)"version":\d+,"generated_at":"[^"]*",')


def _deployment(d: Any, module_name: str) -> dict[str, Any]:
    return {
        "id": d.id,
        "module": module_name,
        "version": d.version,
        "image": d.image,
        "config": d.config,
        "traffic_weight": d.traffic_weight,
        "status": d.status,
    }


def _nlb_extras(src: dict[str, list[Any]], names: dict[int, str]) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "name": li.name,
                "port": li.port,
                "protocols": li.protocols,
                "default_protocol": li.default_protocol,
                "transport": li.transport,
                "proxy_protocol": li.proxy_protocol,
            }
            for li in src["listeners"]
        ],
        "rate_limits": [
            {
                "target": rl.target,
                "requests_per_second": rl.requests_per_second,
                "burst": rl.burst,
                "scope": rl.scope,
            }
            for rl in src["rate_limits"]
        ],
        "scaling_policies": [
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
            if p.module_id in names
        ],
        "services": [
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
        ],
    }


class SnapshotCompiler:
    """Component -> snapshot *content* (the document without ``version``/``generated_at``) as
    canonical JSON text, exactly ``json.dumps(body, separators=(",", ":"))``.

    Routes dominate a snapshot (1,000 routes are ~300 KB), so the encoded JSON of each route is
    kept and reused while the row's ``updated_at`` and its module's name are unchanged: a write
    re-encodes what it changed and joins strings for the rest. Comparing the texts tells which
    components changed.
    """

    def __init__(self) -> None:
        self._routes: dict[int, tuple[Any, str, str]] = {}

    def _route_json(self, r: Any, module_name: str) -> str:
        stamp_ = getattr(r, "updated_at", None)
        hit = self._routes.get(r.id)
        if hit is not None and stamp_ is not None and hit[0] == stamp_ and hit[1] == module_name:
            return hit[2]
        text = _dumps(_route(r, module_name))
        self._routes[r.id] = (stamp_, module_name, text)
        return text

    def compile(self, src: dict[str, list[Any]]) -> dict[str, str]:
        names = {m.id: m.name for m in src["modules"]}
        comp_of = {m.id: component_of(m.type) for m in src["modules"]}
        live = {r.id for r in src["routes"]}
        if len(self._routes) > len(live):
            for gone in [i for i in self._routes if i not in live]:
                del self._routes[gone]
        routes: dict[str, list[str]] = {comp: [] for comp in COMPONENTS}
        for r in src["routes"]:
            comp = comp_of.get(r.module_id)
            if comp is None:
                continue
            text = self._route_json(r, names[r.module_id])
            routes["nlb"].append(text)
            if comp != "nlb":
                routes[comp].append(text)
        modules: dict[str, list[dict[str, Any]]] = {comp: [] for comp in COMPONENTS}
        for m in src["modules"]:
            body = _module(m)
            modules["nlb"].append(body)
            if comp_of[m.id] != "nlb":
                modules[comp_of[m.id]].append(body)
        deployments: dict[str, list[dict[str, Any]]] = {comp: [] for comp in COMPONENTS}
        for d in src["deployments"]:
            if d.module_id not in names or d.status not in ("ACTIVE", "ROLLING_OUT"):
                continue
            body = _deployment(d, names[d.module_id])
            deployments["nlb"].append(body)
            if comp_of[d.module_id] != "nlb":
                deployments[comp_of[d.module_id]].append(body)
        out = {}
        for comp in COMPONENTS:
            parts = [
                '{"component":',
                _dumps(comp),
                ',"modules":',
                _dumps(modules[comp]),
                ',"routes":[',
                ",".join(routes[comp]),
                '],"deployments":',
                _dumps(deployments[comp]),
            ]
            if comp == "nlb":
                for key, value in _nlb_extras(src, names).items():
                    parts += [f',"{key}":', _dumps(value)]
            parts.append("}")
            out[comp] = "".join(parts)
        return out


def stamp_text(content: str, version: int, now: datetime | None = None) -> str:
    """The stored/published snapshot: ``content`` with version and generated_at after the
    component, the same bytes as dumping ``{"component", "version", "generated_at", ...}``."""
    at = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cut = content.index(",") + 1  # after '{"component":"<name>",'
    return f'{content[:cut]}"version":{version},"generated_at":"{at}",{content[cut:]}'


def content_of(stored: str) -> str:
    """Inverse of :func:`stamp_text`; re-encodes documents that were not stamped by it."""
    m = _STAMP.match(stored)
    if m is not None:
        return m.group(1) + stored[m.end() :]
    doc = json.loads(stored)
    return _dumps({k: v for k, v in doc.items() if k not in VOLATILE_KEYS})
