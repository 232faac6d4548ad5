"""Route conflict detection (seed 004): two enabled routes served by the same data plane that
match exactly the same requests at the same priority are ambiguous. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALL_METHODS = frozenset({"*"})


@dataclass(frozen=True, slots=True)
class RouteKey:
    id: int
    name: str
    module: str
    component: str
    host: str
    path: str
    methods: frozenset[str]
    headers: tuple[tuple[str, str], ...]
    query: tuple[tuple[str, str], ...]
    priority: int


def route_key(
    *,
    ident: int,
    name: str,
    module: str,
    component: str,
    match_rules: dict[str, Any],
    priority: int,
) -> RouteKey:
    methods = match_rules.get("method") or []
    if isinstance(methods, str):
        methods = [methods]
    return RouteKey(
        id=ident,
        name=name,
        module=module,
        component=component,
        host=(match_rules.get("host") or "*").lower(),
        path=match_rules.get("path") or "/*",
        methods=frozenset(m.upper() for m in methods) or ALL_METHODS,
        headers=tuple(
            sorted((k.lower(), v) for k, v in (match_rules.get("headers") or {}).items())
        ),
        query=tuple(sorted((match_rules.get("query") or {}).items())),
        priority=priority,
    )


def clash(a: RouteKey, b: RouteKey) -> str | None:
    """Why ``a`` and ``b`` conflict, or None."""
    if a.id == b.id or a.component != b.component or a.priority != b.priority:
        return None
    if (a.host, a.path, a.headers, a.query) != (b.host, b.path, b.headers, b.query):
        return None
    if a.methods is not ALL_METHODS and b.methods is not ALL_METHODS:
        common = a.methods & b.methods
        if not common and "*" not in a.methods and "*" not in b.methods:
            return None
        shown = ",".join(sorted(common))
    else:
        shown = "*"
    return f"same host {a.host!r}, path {a.path!r}, priority {a.priority} and methods {shown}"


def find_conflicts(keys: list[RouteKey]) -> list[tuple[RouteKey, RouteKey, str]]:
    buckets: dict[tuple[str, str, str, int], list[RouteKey]] = {}
    for k in keys:
        buckets.setdefault((k.component, k.host, k.path, k.priority), []).append(k)
    out = []
    for group in buckets.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                reason = clash(a, b)
                if reason:
                    out.append((a, b, reason))
    return out


def first_clash(new: RouteKey, existing: list[RouteKey]) -> tuple[RouteKey, str] | None:
    for other in existing:
        reason = clash(new, other)
        if reason:
            return other, reason
    return None
