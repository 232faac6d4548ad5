"""CRUD round trips through real HTTP on real Postgres: each write is read back from the API
and from the snapshot the API published to Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

pytestmark = pytest.mark.integration
REDIS_URL = "redis://127.0.0.1:6379/0"


class Published:
    """The snapshots the API stored (``/state/status``) and published to Redis."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.redis = Redis.from_url(REDIS_URL)

    async def versions(self) -> dict[str, int]:
        status, st = await self.api.call("GET", "/api/v1/state/status")
        assert status == 200, st
        return {c["component"]: c["version"] for c in st["components"]}

    async def get(self, comp: str) -> dict[str, Any]:
        """The Redis snapshot of ``comp`` once it carries the version Postgres holds."""
        want = (await self.versions())[comp]
        key = f"{self.api.settings.state_prefix}:state:{comp}"
        async with asyncio.timeout(20):
            while True:
                raw = await self.redis.get(key)
                if raw is not None and (snap := json.loads(raw))["version"] == want:
                    return snap
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.redis.aclose()


@pytest.fixture
async def published(api):
    p = Published(api)
    try:
        yield p
    finally:
        await p.close()


async def _ok(api, method: str, path: str, body: Any = None, want: int = 200) -> Any:
    status, out = await api.call(method, path, body)
    assert status == want, (method, path, out)
    return out


async def _module(api, name: str, type_: str = "ALB", **extra: Any) -> dict[str, Any]:
    return await _ok(api, "POST", "/api/v1/modules", {"name": name, "type": type_, **extra}, 201)


async def test_routes_list_get_disable_delete(api, published) -> None:
    mod = await _module(api, "crud-routes")
    base = f"/api/v1/modules/{mod['id']}/routes"
    one = await _ok(
        api,
        "POST",
        base,
        {
            "name": "one",
            "match_rules": {"host": "one.crud.example", "path": "/a/*", "method": ["GET"]},
            "backend_config": {"target": "http://10.1.0.1:80", "retries": 1},
            "rate_limit": 5,
            "priority": 20,
        },
        201,
    )
    two = await _ok(
        api, "POST", base, {"name": "two", "match_rules": {"host": "two.crud.example"}}, 201
    )

    page = await _ok(api, "GET", base)
    assert [r["name"] for r in page["items"]] == ["one", "two"] and page["total"] == 2
    page = await _ok(api, "GET", base + "?name=two")
    assert [r["id"] for r in page["items"]] == [two["id"]]
    got = await _ok(api, "GET", f"{base}/{one['id']}")
    assert got["match_rules"] == {
        "host": "one.crud.example",
        "path": "/a/*",
        "method": ["GET"],
        "headers": {},
        "query": {},
    }
    assert got["backend_config"]["target"] == "http://10.1.0.1:80"
    assert got["backend_config"]["retries"] == 1 and got["rate_limit"] == 5.0
    assert got["priority"] == 20 and got["enabled"] is True
    status, _ = await api.call("GET", f"/api/v1/modules/{mod['id']}/routes/999999")
    assert status == 404

    before = await published.versions()
    off = await _ok(api, "POST", f"{base}/{one['id']}/disable")
    assert off["enabled"] is False
    assert (await _ok(api, "GET", f"{base}/{one['id']}"))["enabled"] is False
    assert [r["name"] for r in (await _ok(api, "GET", base + "?enabled=false"))["items"]] == ["one"]
    for comp in ("alb", "nlb"):
        snap = await published.get(comp)
        assert snap["version"] > before[comp]
        route = next(r for r in snap["routes"] if r["id"] == one["id"])
        assert route["enabled"] is False and route["module"] == "crud-routes"
        assert route["rate_limit"] == {"requests_per_second": 5.0, "burst": 10}
    assert (await published.versions())["dblb"] == before["dblb"]

    before = await published.versions()
    await _ok(api, "DELETE", f"{base}/{one['id']}", want=204)
    status, _ = await api.call("GET", f"{base}/{one['id']}")
    assert status == 404
    assert [r["name"] for r in (await _ok(api, "GET", base))["items"]] == ["two"]
    snap = await published.get("alb")
    assert snap["version"] > before["alb"]
    assert [r["name"] for r in snap["routes"] if r["module"] == "crud-routes"] == ["two"]
    status, _ = await api.call("DELETE", f"{base}/{one['id']}")
    assert status == 404


async def test_module_enable_and_delete(api, published) -> None:
    mod = await _module(api, "crud-db", "DBLB", config={"pool_size": 5})
    assert mod["enabled"] is False and mod["status"] == "DISABLED"
    await _ok(
        api,
        "POST",
        f"/api/v1/modules/{mod['id']}/routes",
        {"name": "pg", "match_rules": {"host": "pg.crud.example"}},
        201,
    )
    snap = await published.get("dblb")
    assert next(m for m in snap["modules"] if m["name"] == "crud-db")["enabled"] is False

    on = await _ok(api, "POST", f"/api/v1/modules/{mod['id']}/enable")
    assert on["enabled"] is True and on["status"] == "ENABLED"
    assert (await _ok(api, "GET", f"/api/v1/modules/{mod['id']}"))["status"] == "ENABLED"
    snap = await published.get("dblb")
    got = next(m for m in snap["modules"] if m["name"] == "crud-db")
    assert got["enabled"] is True and got["config"] == {"pool_size": 5}
    hist = await _ok(api, "GET", "/api/v1/modules/registration-history?module=crud-db")
    assert [e["event"] for e in hist["items"]] == ["enabled", "created"]

    before = await published.versions()
    await _ok(api, "DELETE", f"/api/v1/modules/{mod['id']}", want=204)
    status, _ = await api.call("GET", f"/api/v1/modules/{mod['id']}")
    assert status == 404
    status, _ = await api.call("GET", f"/api/v1/modules/{mod['id']}/routes")
    assert status == 404
    for comp in ("dblb", "nlb"):
        snap = await published.get(comp)
        assert snap["version"] > before[comp]
        assert all(m["name"] != "crud-db" for m in snap["modules"])
        assert all(r["module"] != "crud-db" for r in snap["routes"])
        assert all(d["module"] != "crud-db" for d in snap["deployments"])
    hist = await _ok(api, "GET", "/api/v1/modules/registration-history?module=crud-db")
    assert hist["items"][0]["event"] == "deleted"


async def test_scaling_get_put_enable_disable_delete(api, published) -> None:
    mod = await _module(api, "crud-scale")
    path = f"/api/v1/modules/{mod['id']}/scaling"
    status, body = await api.call("GET", path)
    assert status == 404 and body["error"] == "not_found"
    policy = {
        "min_instances": 2,
        "max_instances": 6,
        "scale_up_threshold": 70.0,
        "scale_down_threshold": 10.0,
        "cooldown_seconds": 60,
        "metric": "requests",
        "enabled": True,
    }
    await _ok(api, "POST", path, policy, 201)
    got = await _ok(api, "GET", path)
    assert {k: got[k] for k in policy} == policy and got["module_id"] == mod["id"]

    changed = {**policy, "max_instances": 12, "metric": "connections"}
    put = await _ok(api, "PUT", path, changed)
    assert put["max_instances"] == 12 and put["metric"] == "connections"
    assert (await _ok(api, "GET", path))["max_instances"] == 12

    def nlb_policy(snap: dict[str, Any]) -> dict[str, Any]:
        return next(p for p in snap["scaling_policies"] if p["module"] == "crud-scale")

    snap = await published.get("nlb")
    assert nlb_policy(snap) == {"module": "crud-scale", **{k: changed[k] for k in changed}}

    await _ok(api, "POST", path + "/disable")
    assert (await _ok(api, "GET", path))["enabled"] is False
    assert nlb_policy(await published.get("nlb"))["enabled"] is False
    await _ok(api, "POST", path + "/enable")
    assert (await _ok(api, "GET", path))["enabled"] is True
    assert nlb_policy(await published.get("nlb"))["enabled"] is True

    await _ok(api, "DELETE", path, want=204)
    status, _ = await api.call("GET", path)
    assert status == 404
    snap = await published.get("nlb")
    assert all(p["module"] != "crud-scale" for p in snap["scaling_policies"])
    for method in ("PUT", "DELETE"):
        status, _ = await api.call(method, path, policy if method == "PUT" else None)
        assert status == 404
    status, _ = await api.call("POST", path + "/enable")
    assert status == 404


async def test_deployment_patch_and_plain_promote(api, published) -> None:
    mod = await _module(api, "crud-dep", "AILB", version="1.0", image="img:1")
    base = f"/api/v1/modules/{mod['id']}/deployments"
    dep = await _ok(api, "POST", base, {"version": "2.0"}, 201)
    assert dep["status"] == "PENDING" and dep["traffic_weight"] == 0.0

    patched = await _ok(
        api,
        "PATCH",
        f"{base}/{dep['id']}",
        {"image": "img:2", "config": {"feature": True}, "environment": {"ENV": "prod"}},
    )
    assert patched["image"] == "img:2" and patched["version"] == "2.0"
    got = await _ok(api, "GET", f"{base}/{dep['id']}")
    assert got["config"] == {"feature": True} and got["environment"] == {"ENV": "prod"}

    half = await _ok(api, "POST", f"{base}/{dep['id']}/promote", {"traffic_weight": 40})
    assert half["status"] == "ROLLING_OUT" and half["traffic_weight"] == 40.0
    first = (await _ok(api, "GET", base + "?status=ACTIVE"))["items"]
    assert [(d["version"], d["traffic_weight"]) for d in first] == [("1.0", 60.0)]
    snap = await published.get("ailb")
    mine = [d for d in snap["deployments"] if d["module"] == "crud-dep"]
    assert sorted((d["version"], d["traffic_weight"], d["status"]) for d in mine) == [
        ("1.0", 60.0, "ACTIVE"),
        ("2.0", 40.0, "ROLLING_OUT"),
    ]
    assert next(d for d in mine if d["version"] == "2.0")["config"] == {"feature": True}

    full = await _ok(api, "POST", f"{base}/{dep['id']}/promote", {})
    assert full["status"] == "ACTIVE" and full["traffic_weight"] == 100.0
    assert [h["weight"] for h in full["weight_history"]] == [40.0, 100.0]
    old = await _ok(api, "GET", f"{base}/{dep['previous_deployment_id']}")
    assert old["status"] == "INACTIVE" and old["traffic_weight"] == 0.0
    m = await _ok(api, "GET", f"/api/v1/modules/{mod['id']}")
    assert m["version"] == "2.0" and m["image"] == "img:2"
    snap = await published.get("ailb")
    assert [
        (d["version"], d["traffic_weight"])
        for d in snap["deployments"]
        if d["module"] == "crud-dep"
    ] == [("2.0", 100.0)]
    assert next(x for x in snap["modules"] if x["name"] == "crud-dep")["version"] == "2.0"


async def test_reload_xds_republishes_every_component(api, published) -> None:
    svc = await _ok(
        api, "POST", "/api/v1/services", {"name": "xds", "host": "10.2.0.1", "port": 81}, 201
    )
    before = await published.versions()
    out = await _ok(api, "POST", f"/api/v1/services/{svc['id']}/reload-xds")
    assert sorted(out["components"]) == ["ailb", "alb", "dblb", "nlb", "rtmp"]
    assert out["config_version"] > max(before.values())
    for comp in before:
        snap = await published.get(comp)
        assert snap["version"] == out["config_version"] and snap["component"] == comp
    snap = await published.get("nlb")
    assert any(s["name"] == "xds" and s["port"] == 81 for s in snap["services"])
    audit = await _ok(api, "GET", "/api/v1/audit?resource_type=service")
    assert audit["items"][0]["action"] == "reload"
    status, _ = await api.call("POST", "/api/v1/services/999999/reload-xds")
    assert status == 404


async def test_nlb_listeners_list_get_put_delete(api, published) -> None:
    base = "/api/v1/nlb/listeners"
    made = await _ok(
        api,
        "POST",
        base,
        {"name": "edge", "port": 7443, "protocols": ["tls", "http"], "default_protocol": "tls"},
        201,
    )
    dns = {"name": "dns", "port": 7053, "protocols": ["udp"], "transport": "udp"}
    await _ok(api, "POST", base, dns, 201)
    # what the NLB would refuse (and with it the whole snapshot) is refused here
    for bad in (
        {"protocols": []},
        {"protocols": ["gopher"]},
        {"protocols": ["http"], "default_protocol": "tls"},
        {"proxy_protocol": "v3"},
    ):
        status, body = await api.call("POST", base, {**dns, "name": "x", "port": 7202, **bad})
        assert status == 422, (bad, body)
    raw = {"name": "raw", "port": 7201, "protocols": ["tcp"], "proxy_protocol": "none"}
    raw_made = await _ok(api, "POST", base, raw, 201)
    page = await _ok(api, "GET", base + "?limit=1")
    assert page["total"] == 3 and len(page["items"]) == 1
    got = await _ok(api, "GET", f"{base}/{made['id']}")
    assert got["protocols"] == ["tls", "http"] and got["transport"] == "tcp"
    assert got["proxy_protocol"] == "v2"  # modules expect the client address first
    snap = await published.get("nlb")
    assert {li["name"]: li["proxy_protocol"] for li in snap["listeners"]} == {
        "edge": "v2",
        "dns": "v2",
        "raw": "none",
    }
    await _ok(api, "DELETE", f"{base}/{raw_made['id']}", want=204)

    new = {"name": "edge", "port": 8443, "protocols": ["tls"], "default_protocol": "tls"}
    put = await _ok(api, "PUT", f"{base}/{made['id']}", new)
    assert put["port"] == 8443 and put["protocols"] == ["tls"]
    assert (await _ok(api, "GET", f"{base}/{made['id']}"))["port"] == 8443
    status, body = await api.call("PUT", f"{base}/{made['id']}", {**new, "port": 7053})
    assert status == 409 and body["error"] == "conflict"
    snap = await published.get("nlb")
    assert {(li["name"], li["port"], li["transport"]) for li in snap["listeners"]} == {
        ("edge", 8443, "tcp"),
        ("dns", 7053, "udp"),
    }

    await _ok(api, "DELETE", f"{base}/{made['id']}", want=204)
    status, _ = await api.call("GET", f"{base}/{made['id']}")
    assert status == 404
    assert [li["name"] for li in (await _ok(api, "GET", base))["items"]] == ["dns"]
    snap = await published.get("nlb")
    assert [li["name"] for li in snap["listeners"]] == ["dns"]


async def test_nlb_rate_limits_list_get_put_delete(api, published) -> None:
    base = "/api/v1/nlb/rate-limits"
    made = await _ok(
        api,
        "POST",
        base,
        {"target": "module:alb", "requests_per_second": 100, "burst": 150, "scope": "global"},
        201,
    )
    page = await _ok(api, "GET", base)
    assert [r["target"] for r in page["items"]] == ["module:alb"]
    got = await _ok(api, "GET", f"{base}/{made['id']}")
    assert got["requests_per_second"] == 100.0 and got["scope"] == "global"

    put = await _ok(
        api,
        "PUT",
        f"{base}/{made['id']}",
        {"target": "module:alb", "requests_per_second": 25.5, "burst": 30},
    )
    assert put["requests_per_second"] == 25.5 and put["scope"] == "local"
    snap = await published.get("nlb")
    assert snap["rate_limits"] == [
        {"target": "module:alb", "requests_per_second": 25.5, "burst": 30, "scope": "local"}
    ]

    await _ok(api, "DELETE", f"{base}/{made['id']}", want=204)
    status, _ = await api.call("GET", f"{base}/{made['id']}")
    assert status == 404
    assert (await _ok(api, "GET", base))["total"] == 0
    assert (await published.get("nlb"))["rate_limits"] == []


async def test_feature_flag_get_by_id(api) -> None:
    made = await _ok(
        api,
        "POST",
        "/api/v1/feature-flags",
        {"name": "beta-ui", "enabled": True, "description": "new dashboard"},
        201,
    )
    got = await _ok(api, "GET", f"/api/v1/feature-flags/{made['id']}")
    assert {k: got[k] for k in ("id", "name", "enabled", "description")} == {
        "id": made["id"],
        "name": "beta-ui",
        "enabled": True,
        "description": "new dashboard",
    }
    await _ok(api, "DELETE", f"/api/v1/feature-flags/{made['id']}", want=204)
    status, body = await api.call("GET", f"/api/v1/feature-flags/{made['id']}")
    assert status == 404 and body["error"] == "not_found"
