"""Seed 003/004 and the rest of the operator surface through real HTTP on real Postgres."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration
CLUSTER = {"X-Cluster-Api-Key": "test-cluster-key"}


async def _module(api, name: str, type_: str = "ALB", **extra) -> dict:
    status, mod = await api.call("POST", "/api/v1/modules", {"name": name, "type": type_, **extra})
    assert status == 201, mod
    return mod


async def test_route_conflict_409_names_the_clash(api) -> None:
    a = await _module(api, "conf-a")
    b = await _module(api, "conf-b", "L7_HTTP")
    route = {
        "name": "one",
        "match_rules": {"host": "Conf.Example.com", "path": "/v1/*", "method": ["GET", "POST"]},
        "priority": 10,
    }
    status, _ = await api.call("POST", f"/api/v1/modules/{a['id']}/routes", route)
    assert status == 201
    clash = {**route, "name": "two", "match_rules": {**route["match_rules"], "method": "post"}}
    status, body = await api.call("POST", f"/api/v1/modules/{b['id']}/routes", clash)
    assert status == 409 and body["error"] == "route_conflict"
    assert body["details"]["conflicts_with"] == "one" and body["details"]["module"] == "conf-a"
    # different priority or disjoint methods do not clash
    status, _ = await api.call(
        "POST", f"/api/v1/modules/{b['id']}/routes", {**clash, "priority": 11}
    )
    assert status == 201
    other = {**route, "name": "three", "match_rules": {**route["match_rules"], "method": ["PUT"]}}
    status, r3 = await api.call("POST", f"/api/v1/modules/{a['id']}/routes", other)
    assert status == 201
    # a disabled duplicate is allowed; enabling it is the conflict
    dup = {**route, "name": "four", "enabled": False}
    status, r4 = await api.call("POST", f"/api/v1/modules/{a['id']}/routes", dup)
    assert status == 201
    status, body = await api.call("POST", f"/api/v1/modules/{a['id']}/routes/{r4['id']}/enable")
    assert status == 409 and body["details"]["conflicts_with"] == "one"
    status, body = await api.call("GET", "/api/v1/routing/conflicts")
    assert status == 200 and body["conflicts"] == [] and body["checked_routes"] >= 3
    # PATCH into a clash is refused too
    status, body = await api.call(
        "PATCH",
        f"/api/v1/modules/{a['id']}/routes/{r3['id']}",
        {"match_rules": route["match_rules"]},
    )
    assert status == 409


async def test_services_crud_and_reload(api) -> None:
    svc = {"name": "web", "host": "10.0.0.5", "port": 8080, "protocol": "http", "tags": ["a"]}
    status, s = await api.call("POST", "/api/v1/services", svc)
    assert status == 201
    status, _ = await api.call("POST", "/api/v1/services", svc)
    assert status == 409
    status, s2 = await api.call("PUT", f"/api/v1/services/{s['id']}", {**svc, "port": 9090})
    assert status == 200 and s2["port"] == 9090
    status, before = await api.call("GET", "/api/v1/state/status")
    status, rel = await api.call("POST", f"/api/v1/services/{s['id']}/reload")
    assert status == 200 and rel["config_version"] > before["config_version"]
    assert sorted(rel["components"]) == ["ailb", "alb", "dblb", "nlb", "rtmp"]
    status, snap = await api.call(
        "GET", "/api/v1/state/nlb?after=0&timeout=0", token="", headers=CLUSTER
    )
    assert any(x["name"] == "web" and x["port"] == 9090 for x in snap["services"])
    status, page = await api.call("GET", "/api/v1/services?protocol=http")
    assert page["total"] == 1
    status, _ = await api.call("DELETE", f"/api/v1/services/{s['id']}")
    assert status == 204
    status, _ = await api.call("GET", f"/api/v1/services/{s['id']}")
    assert status == 404


async def test_listeners_rate_limits_in_nlb_snapshot(api) -> None:
    status, _ = await api.call(
        "POST",
        "/api/v1/nlb/listeners",
        {"name": "main", "port": 7000, "protocols": ["http", "tls"]},
    )
    assert status == 201
    status, _ = await api.call(
        "POST",
        "/api/v1/nlb/rate-limits",
        {"target": "listener:7000", "requests_per_second": 1000, "burst": 2000},
    )
    assert status == 201
    status, snap = await api.call(
        "GET", "/api/v1/state/nlb?after=0&timeout=0", token="", headers=CLUSTER
    )
    assert snap["listeners"][0]["port"] == 7000
    assert snap["rate_limits"][0] == {
        "target": "listener:7000",
        "requests_per_second": 1000.0,
        "burst": 2000,
        "scope": "local",
    }


async def test_pagination_filter_etag(api) -> None:
    for i in range(3):
        await _module(api, f"page-{i}", "DBLB", enabled=i == 0)
    status, page = await api.call("GET", "/api/v1/modules?type=DBLB&limit=2&offset=0")
    assert status == 200 and page["total"] == 3 and len(page["items"]) == 2
    status, page2 = await api.call("GET", "/api/v1/modules?type=DBLB&limit=2&offset=2")
    assert len(page2["items"]) == 1
    status, enabled = await api.call("GET", "/api/v1/modules?type=DBLB&enabled=true")
    assert [m["name"] for m in enabled["items"]] == ["page-0"]
    async with api.http.get(api.url + "/api/v1/modules?type=DBLB", headers=api.headers()) as resp:
        etag = resp.headers["ETag"]
    async with api.http.get(
        api.url + "/api/v1/modules?type=DBLB", headers={**api.headers(), "If-None-Match": etag}
    ) as resp:
        assert resp.status == 304
    await _module(api, "page-3", "DBLB")
    async with api.http.get(
        api.url + "/api/v1/modules?type=DBLB", headers={**api.headers(), "If-None-Match": etag}
    ) as resp:
        assert resp.status == 200
    status, body = await api.call("GET", "/api/v1/modules?limit=0")
    assert status == 422 and body["details"]["fields"][0]["loc"] == ["query", "limit"]


async def test_errors_have_seed002_shape(api) -> None:
    status, body = await api.call("POST", "/api/v1/modules", {"name": "bad", "type": "NOPE"})
    assert status == 422 and set(body) == {"error", "message", "details"}
    assert body["details"]["fields"][0]["loc"] == ["body", "type"]
    async with api.http.post(
        api.url + "/api/v1/modules",
        data=b"{not json",
        headers={**api.headers(), "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    status, body = await api.call("GET", "/api/v1/modules/999999")
    assert status == 404 and body["error"] == "not_found"
    status, body = await api.call("GET", "/api/v1/modules/99999999999999")
    assert status == 404
    status, body = await api.call("GET", "/api/v1/nope")
    assert status == 404 and body["error"] == "not_found"
    status, body = await api.call(
        "POST", "/api/v1/modules", {"name": "nul", "type": "ALB", "description": "a\x00b"}
    )
    assert status == 422
    mod = await _module(api, "dup-mod")
    status, body = await api.call("POST", "/api/v1/modules", {"name": "dup-mod", "type": "ALB"})
    assert status == 409
    bad_policy = {"min_instances": 5, "max_instances": 2}
    status, body = await api.call("POST", f"/api/v1/modules/{mod['id']}/scaling", bad_policy)
    assert status == 422 and body["error"] == "validation_error"
    assert body["details"]["fields"][0]["loc"] == ["body"]
    assert "min_instances must not exceed max_instances" in body["details"]["fields"][0]["msg"]
    # the body is validated before the module is looked up: a valid one for no module is 404
    status, body = await api.call("POST", "/api/v1/modules/999999/scaling", {"max_instances": 2})
    assert status == 404 and body["error"] == "not_found"


async def test_incremental_promote_rolls_back_on_failed_health(api, module_server) -> None:
    fake, port = module_server
    mod = await _module(api, "canary", "AILB", version="1.0", grpc_host="127.0.0.1", grpc_port=port)
    status, dep = await api.call(
        "POST", f"/api/v1/modules/{mod['id']}/deployments", {"version": "2.0"}
    )
    assert status == 201
    fake.fail_after = fake.calls + 2  # healthy before step 10 and after it, then unhealthy
    status, body = await api.call(
        "POST",
        f"/api/v1/modules/{mod['id']}/deployments/{dep['id']}/promote",
        {"traffic_weight": 100, "incremental": True},
    )
    assert status == 409 and body["error"] == "promotion_failed"
    assert body["details"]["failed_at_weight"] == 25.0
    status, dep = await api.call("GET", f"/api/v1/modules/{mod['id']}/deployments/{dep['id']}")
    assert dep["status"] == "FAILED" and dep["traffic_weight"] == 0.0
    assert [h["weight"] for h in dep["weight_history"]] == [10.0, 25.0, 0.0]
    status, deps = await api.call("GET", f"/api/v1/modules/{mod['id']}/deployments?status=ACTIVE")
    assert [d["version"] for d in deps["items"]] == ["1.0"]
    status, snap = await api.call(
        "GET", "/api/v1/state/ailb?after=0&timeout=0", token="", headers=CLUSTER
    )
    assert [(d["version"], d["traffic_weight"]) for d in snap["deployments"]] == [("1.0", 100.0)]
    # module health over gRPC, recorded on the module
    fake.fail_after = None
    status, h = await api.call("POST", f"/api/v1/modules/{mod['id']}/health")
    assert status == 200 and h["healthy"] is True and h["checks"] == {"upstream": "ok"}
    status, m = await api.call("GET", f"/api/v1/modules/{mod['id']}")
    assert m["health"] == "HEALTHY"


async def test_partial_promote_splits_weight(api) -> None:
    mod = await _module(api, "split", "RTMP", version="a")
    status, dep = await api.call(
        "POST", f"/api/v1/modules/{mod['id']}/deployments", {"version": "b", "traffic_weight": 30}
    )
    assert status == 201 and dep["status"] == "ROLLING_OUT"
    status, snap = await api.call(
        "GET", "/api/v1/state/rtmp?after=0&timeout=0", token="", headers=CLUSTER
    )
    weights = {
        d["version"]: d["traffic_weight"] for d in snap["deployments"] if d["module"] == "split"
    }
    assert weights == {"a": 70.0, "b": 30.0}


async def test_history_metrics_system(api) -> None:
    mod = await _module(api, "hist")
    await api.call("POST", f"/api/v1/modules/{mod['id']}/disable")
    status, hist = await api.call("GET", "/api/v1/modules/registration-history?module=hist")
    assert status == 200 and [e["event"] for e in hist["items"]] == ["disabled", "created"]
    report = {
        "instance_id": "alb-1",
        "module": "hist",
        "routes": {"r": {"call_count": 10, "error_count": 1, "total_duration_ms": 50.0}},
    }
    status, _ = await api.call("POST", "/api/v1/state/metrics", report, token="", headers=CLUSTER)
    assert status == 200
    status, metrics = await api.call("GET", "/api/v1/modules/metrics")
    assert metrics["hist:r"] == {
        "call_count": 10,
        "total_duration_ms": 50.0,
        "error_count": 1,
        "avg_duration_ms": 5.0,
        "success_rate": 0.9,
    }
    status, sh = await api.call("GET", "/api/v1/system/health")
    assert status == 200 and sh["database"] == "up" and sh["redis"] == "up"
    status, text = await api.call("GET", "/metrics", token="")
    assert status == 200 and "marchproxy_api_requests_total" in text
    status, html = await api.call("GET", "/api/docs", token="")
    assert status == 200 and "swagger-ui" in html


async def test_embedded_sqlite_mode(tmp_path, api_factory) -> None:
    async with api_factory("", sqlite_path=str(tmp_path / "mp.sqlite3"), redis_url="") as api:
        mod = await _module(api, "lite")
        status, _ = await api.call("POST", f"/api/v1/modules/{mod['id']}/routes", {"name": "r"})
        assert status == 201
        status, snap = await api.call(
            "GET", "/api/v1/state/alb?after=0&timeout=0", token="", headers=CLUSTER
        )
        assert status == 200 and snap["routes"][0]["name"] == "r"


async def test_feature_flags_crud(api) -> None:
    status, flag = await api.call(
        "POST", "/api/v1/feature-flags", {"name": "new-ui", "enabled": True}
    )
    assert status == 201 and flag["enabled"] is True
    status, flag = await api.call(
        "PUT", f"/api/v1/feature-flags/{flag['id']}", {"name": "new-ui", "enabled": False}
    )
    assert status == 200 and flag["enabled"] is False
    status, page = await api.call("GET", "/api/v1/feature-flags")
    assert [f["name"] for f in page["items"]] == ["new-ui"]
    status, _ = await api.call("DELETE", f"/api/v1/feature-flags/{flag['id']}")
    assert status == 204
