"""Seed 000 route dicts <-> marchproxy.v1.Route, and the default CanHandle matcher."""

from __future__ import annotations

from marchproxy_common.module.routes import best_route, route_from_pb, route_to_pb, validate_routes

SEED_ROUTE = {
    "name": "api-route",
    "module": "alb",
    "priority": 100,
    "match_rules": {"host": "api.example.com", "path": "/v1/*", "method": ["GET", "POST"]},
    "backend_config": {"target": "http://backend:8080", "timeout": 30, "retries": 3},
    "rate_limit": 1000.0,  # seed 000's short form
    "enabled": True,
}


def test_round_trip_keeps_rules_and_reads_the_short_rate_limit() -> None:
    pb = route_to_pb(SEED_ROUTE)
    assert pb.rate_limit.requests_per_second == 1000
    back = route_from_pb(pb, "alb")
    assert back["match_rules"]["path"] == "/v1/*"
    assert back["backend_config"]["target"] == "http://backend:8080"
    assert back["rate_limit"] == {"requests_per_second": 1000, "burst": 1000}


def test_best_route_prefers_priority_and_checks_host_and_path() -> None:
    low = {**SEED_ROUTE, "name": "low", "priority": 1, "match_rules": {"path": "/*"}}
    assert best_route([low, SEED_ROUTE], host="api.example.com", path="/v1/x") is SEED_ROUTE
    assert best_route([low, SEED_ROUTE], host="other.example", path="/v1/x") is low
    assert best_route([SEED_ROUTE], host="api.example.com", path="/v2") is None


def test_validation_names_the_problem() -> None:
    errors = validate_routes([{"name": "a"}, {"name": "a"}, {"match_rules": []}])
    assert errors == ["routes[1].name 'a' is used twice", "routes[2].name is required"]
