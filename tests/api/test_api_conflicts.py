"""Seed 004 route conflicts under concurrency, after module type changes, and rows written
behind the API's back."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

pytestmark = pytest.mark.integration
SAME = {"host": "race.example.com", "path": "/api/*", "method": ["GET"]}


async def _module(api, name: str, type_: str) -> dict:
    status, mod = await api.call("POST", "/api/v1/modules", {"name": name, "type": type_})
    assert status == 201, mod
    return mod


async def test_concurrent_conflicting_creates_admit_exactly_one(api) -> None:
    mods = [await _module(api, f"race-{i}", "ALB") for i in range(6)]
    results = await asyncio.gather(
        *[
            api.call(
                "POST",
                f"/api/v1/modules/{m['id']}/routes",
                {"name": "same", "match_rules": SAME, "priority": 5},
            )
            for m in mods
        ]
    )
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [409] * 5, results
    assert all(b["error"] == "route_conflict" for s, b in results if s == 409)
    status, body = await api.call("GET", "/api/v1/routing/conflicts")
    assert status == 200 and body["conflicts"] == []


async def test_type_change_into_a_clash_is_refused(api) -> None:
    alb = await _module(api, "move-alb", "ALB")
    dblb = await _module(api, "move-dblb", "DBLB")
    rule = {"name": "r", "match_rules": {"host": "move.example.com", "path": "/x"}}
    for m in (alb, dblb):  # different components: no clash yet
        status, body = await api.call("POST", f"/api/v1/modules/{m['id']}/routes", rule)
        assert status == 201, body
    status, body = await api.call("PATCH", f"/api/v1/modules/{dblb['id']}", {"type": "L7_HTTP"})
    assert status == 409 and body["error"] == "route_conflict", body
    assert body["details"]["conflicts_with"] == "r" and body["details"]["module"] == "move-alb"
    status, mod = await api.call("GET", f"/api/v1/modules/{dblb['id']}")
    assert mod["type"] == "DBLB"
    # a type change within the same component, or into a free one, is fine
    status, _ = await api.call("PATCH", f"/api/v1/modules/{dblb['id']}", {"type": "RTMP"})
    assert status == 200
    status, _ = await api.call("PATCH", f"/api/v1/modules/{alb['id']}", {"type": "L7_HTTP"})
    assert status == 200


async def test_conflicts_lists_a_clash_written_behind_the_api(api, pg_url) -> None:
    a = await _module(api, "side-a", "ALB")
    b = await _module(api, "side-b", "L7_HTTP")
    rule = {"name": "front", "match_rules": {"host": "side.example.com", "path": "/"}}
    status, _ = await api.call("POST", f"/api/v1/modules/{a['id']}/routes", rule)
    assert status == 201
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO module_routes (module_id, name, match_rules, backend_config, priority,"
            " enabled, created_at, updated_at) VALUES (%s, 'sneaky',"
            ' \'{"host": "SIDE.example.com", "path": "/"}\', \'{}\', 100, true, now(), now())',
            (b["id"],),
        )
    status, body = await api.call("GET", "/api/v1/routing/conflicts")
    assert status == 200
    pairs = [
        {c["route"], c["conflicts_with"]} for c in body["conflicts"] if c["component"] == "alb"
    ]
    assert {"front", "sneaky"} in pairs, body
    found = next(
        c for c in body["conflicts"] if {c["route"], c["conflicts_with"]} == {"front", "sneaky"}
    )
    assert {found["module"], found["conflicts_with_module"]} == {"side-a", "side-b"}
    # and the API refuses to add a third route that clashes with them
    status, body = await api.call(
        "POST", f"/api/v1/modules/{b['id']}/routes", {**rule, "name": "third"}
    )
    assert status == 409 and body["details"]["conflicts_with"] in ("front", "sneaky")
