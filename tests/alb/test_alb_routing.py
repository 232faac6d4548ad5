"""Routing table: pure, no loop. Priority first, then the longest match, then order."""

from __future__ import annotations

from typing import Any

import pytest

from marchproxy_alb.routing import RequestView, RouteConfigError, compile_route, compile_table


def r(name: str, match: dict[str, Any], priority: int = 0, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match_rules": match,
        "priority": priority,
        "backend_config": {"target": "http://127.0.0.1:9"},
        **kw,
    }


def pick(
    routes: list[dict[str, Any]],
    host: str = "a.example.com",
    path: str = "/",
    method="GET",
    headers: dict[str, str] | None = None,
    query: str = "",
) -> str | None:
    table, errors = compile_table(routes)
    assert errors == []
    got = table.match(RequestView(host, path, method, headers or {}, query))
    return got.name if got else None


ROUTES = [
    r("seed", {"host": "api.example.com", "path": "/v1/*", "method": ["GET", "POST"]}, 100),
    r("wild", {"host": "*.example.com", "path": "/v1/*"}, 100),
    r("exact", {"path": "/health", "path_type": "exact"}),
    r("prefix", {"path": "/static"}),
    r("longer", {"path": "/static/img"}),
    r("regex", {"path_regex": r"/u/[0-9]+"}),
    r("glob", {"path": "/files/*.txt"}),
    r("hdr", {"path": "/h", "headers": {"x-tenant": "a"}}),
    r("hdr-any", {"path": "/h", "headers": {"x-tenant": "*"}}),
    r("qry", {"path": "/q", "query": {"v": "2"}}),
    r("catch", {}, -10),
]

CASES = [
    ("api.example.com", "/v1/users", "GET", {}, "", "seed"),
    ("api.example.com:8080", "/v1/users", "POST", {}, "", "seed"),
    ("API.example.com", "/v1/x", "GET", {}, "", "seed"),
    ("api.example.com", "/v1/users", "DELETE", {}, "", "wild"),  # method excludes seed
    ("x.example.com", "/v1/", "GET", {}, "", "wild"),
    ("example.com", "/v1/a", "GET", {}, "", "catch"),  # "*.example.com" needs a label
    ("h", "/health", "GET", {}, "", "exact"),
    ("h", "/health/x", "GET", {}, "", "catch"),
    ("h", "/static", "GET", {}, "", "prefix"),
    ("h", "/static/css/a.css", "GET", {}, "", "prefix"),
    ("h", "/staticfoo", "GET", {}, "", "catch"),  # prefix is segment-aware
    ("h", "/static/img/a.png", "GET", {}, "", "longer"),  # longest prefix wins
    ("h", "/u/42", "GET", {}, "", "regex"),
    ("h", "/u/abc", "GET", {}, "", "catch"),
    ("h", "/files/a/b.txt", "GET", {}, "", "glob"),
    ("h", "/files/a.bin", "GET", {}, "", "catch"),
    ("h", "/h", "GET", {"x-tenant": "a"}, "", "hdr"),
    ("h", "/h", "GET", {"x-tenant": "b"}, "", "hdr-any"),
    ("h", "/h", "GET", {}, "", "catch"),
    ("h", "/q", "GET", {}, "v=2&x=1", "qry"),
    ("h", "/q", "GET", {}, "v=3", "catch"),
]


@pytest.mark.parametrize(("host", "path", "method", "headers", "query", "want"), CASES)
def test_routing_matrix(host, path, method, headers, query, want) -> None:
    assert pick(ROUTES, host, path, method, headers, query) == want


def test_priority_beats_length() -> None:
    routes = [r("long", {"path": "/a/b/c"}, 1), r("short", {"path": "/a"}, 5)]
    assert pick(routes, path="/a/b/c/d") == "short"
    routes = [r("long", {"path": "/a/b/c"}, 5), r("short", {"path": "/a"}, 5)]
    assert pick(routes, path="/a/b/c/d") == "long"


def test_disabled_routes_are_skipped() -> None:
    assert pick([r("off", {}, enabled=False)]) is None


def test_rate_limit_forms() -> None:
    assert compile_route(r("a", {}, rate_limit=1000.0)).rate_limit.requests_per_second == 1000
    rl = compile_route(r("a", {}, rate_limit={"requests_per_second": 5, "burst": 9})).rate_limit
    assert (rl.requests_per_second, rl.burst) == (5, 9)
    assert compile_route(r("a", {}, rate_limit=None)).rate_limit is None


def test_seed_000_route_compiles() -> None:
    seed = {
        "name": "api-route",
        "match_rules": {"host": "api.example.com", "path": "/v1/*", "method": ["GET", "POST"]},
        "backend_config": {
            "target": "http://backend:8080",
            "timeout": 30,
            "retries": 3,
            "load_balancing": "round_robin",
        },
        "rate_limit": 1000.0,
        "priority": 100,
        "enabled": True,
    }
    route = compile_route(seed)
    assert route.backend.targets[0].key == "http://backend:8080"
    assert route.backend.retries == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "x", "match_rules": {}, "backend_config": {}},
        {"name": "x", "backend_config": {"target": "ftp://a"}},
        {"name": "x", "backend_config": {"target": "http://a", "load_balancing": "magic"}},
        {"name": "x", "backend_config": {"target": "http://a", "timeout": -1}},
        {"name": "x", "match_rules": {"path_regex": "("}, "backend_config": {"target": "a:1"}},
        {"name": "x", "match_rules": {"host": "a.*.com"}, "backend_config": {"target": "a:1"}},
        {"name": "x", "backend_config": {"target": "http://a"}, "rate_limit": "fast"},
    ],
)
def test_invalid_routes_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(RouteConfigError):
        compile_route(bad)
    _, errors = compile_table([bad])
    assert errors


def test_duplicate_names_rejected() -> None:
    _, errors = compile_table([r("a", {}), r("a", {})])
    assert errors
