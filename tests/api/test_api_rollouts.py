"""Promote and rollback of one module never interleave (per-module lock, across replicas too);
long incremental promotes run in the background (202) and a rollback stops them."""

from __future__ import annotations

import asyncio

import pytest

from marchproxy_api.keys import rollouts_key

pytestmark = pytest.mark.integration


async def _module_with_deployment(api, name: str, port: int) -> tuple[dict, dict]:
    status, mod = await api.call(
        "POST",
        "/api/v1/modules",
        {
            "name": name,
            "type": "ALB",
            "version": "1.0",
            "grpc_host": "127.0.0.1",
            "grpc_port": port,
        },
    )
    assert status == 201, mod
    status, dep = await api.call(
        "POST", f"/api/v1/modules/{mod['id']}/deployments", {"version": "2.0"}
    )
    assert status == 201, dep
    return mod, dep


def _weights(dep: dict) -> list[float]:
    return [h["weight"] for h in dep["weight_history"]]


async def _wait_status(api, path: str, want: str) -> dict:
    async with asyncio.timeout(30):
        while True:
            status, dep = await api.call("GET", path)
            assert status == 200, dep
            if dep["status"] == want:
                return dep
            await asyncio.sleep(0.05)


async def test_two_incremental_promotes_do_not_interleave(
    pg_url, api_factory, module_server
) -> None:
    _, port = module_server
    async with api_factory(pg_url, promote_step_seconds=0.3, module_lock_wait=0.2) as api:
        mod, dep = await _module_with_deployment(api, "twice", port)
        path = f"/api/v1/modules/{mod['id']}/deployments/{dep['id']}"
        body = {"traffic_weight": 100, "incremental": True}
        first, second = await asyncio.gather(
            api.call("POST", path + "/promote", body), api.call("POST", path + "/promote", body)
        )
        statuses = sorted([first[0], second[0]])
        assert statuses == [200, 409], (first, second)
        refused = first[1] if first[0] == 409 else second[1]
        assert refused["error"] == "rollout_in_progress"
        _, done = await api.call("GET", path)
        assert done["status"] == "ACTIVE" and _weights(done) == [10.0, 25.0, 50.0, 100.0]


async def test_long_promote_answers_202_and_finishes_in_background(
    pg_url, api_factory, module_server
) -> None:
    _, port = module_server
    async with api_factory(pg_url, promote_step_seconds=0.2, promote_wait_seconds=0) as api:
        mod, dep = await _module_with_deployment(api, "bg", port)
        path = f"/api/v1/modules/{mod['id']}/deployments/{dep['id']}"
        async with api.http.post(
            api.url + path + "/promote",
            json={"traffic_weight": 100, "incremental": True},
            headers=api.headers(),
        ) as resp:
            assert resp.status == 202, await resp.text()
            assert resp.headers["Location"] == path
            started = await resp.json()
        assert started["id"] == dep["id"] and started["status"] in ("PENDING", "ROLLING_OUT")
        done = await _wait_status(api, path, "ACTIVE")
        assert _weights(done) == [10.0, 25.0, 50.0, 100.0]
        _, m = await api.call("GET", f"/api/v1/modules/{mod['id']}")
        assert m["version"] == "2.0"


async def test_rollback_stops_a_running_promote(pg_url, api_factory, module_server) -> None:
    _, port = module_server
    async with api_factory(pg_url, promote_step_seconds=1.0, promote_wait_seconds=0) as api:
        mod, dep = await _module_with_deployment(api, "stopme", port)
        path = f"/api/v1/modules/{mod['id']}/deployments/{dep['id']}"
        status, _ = await api.call(
            "POST", path + "/promote", {"traffic_weight": 100, "incremental": True}
        )
        assert status == 202
        await _wait_status(api, path, "ROLLING_OUT")
        status, rolled = await api.call("POST", path + "/rollback", {"reason": "stop"})
        assert status == 200, rolled
        assert rolled["status"] == "ROLLED_BACK" and rolled["traffic_weight"] == 0.0
        await asyncio.sleep(1.5)  # longer than a step: the rollout must not move on
        status, after = await api.call("GET", path)
        assert after["status"] == "ROLLED_BACK" and _weights(after) == [10.0, 0.0]
        status, first = await api.call(
            "GET", f"/api/v1/modules/{mod['id']}/deployments/{dep['previous_deployment_id']}"
        )
        assert first["status"] == "ACTIVE" and first["traffic_weight"] == 100.0


async def test_lock_holds_across_api_replicas(pg_url, api_factory, module_server) -> None:
    _, port = module_server
    async with (
        api_factory(pg_url, promote_step_seconds=1.0, promote_wait_seconds=0) as a,
        api_factory(pg_url, module_lock_wait=0.3) as b,
    ):
        mod, dep = await _module_with_deployment(a, "replicas", port)
        path = f"/api/v1/modules/{mod['id']}/deployments/{dep['id']}"
        status, _ = await a.call(
            "POST", path + "/promote", {"traffic_weight": 100, "incremental": True}
        )
        assert status == 202
        # replica b cannot stop a's rollout: its rollback waits for the module lock, then 409
        status, body = await b.call("POST", path + "/rollback", {"reason": "from b"})
        assert status == 409 and body["error"] == "rollout_in_progress", body
        async with asyncio.timeout(30):  # the last step's health check holds the lock too
            while a.app[rollouts_key].running:
                await asyncio.sleep(0.05)
        _, done = await a.call("GET", path)
        assert done["status"] == "ACTIVE" and _weights(done) == [10.0, 25.0, 50.0, 100.0]
        status, body = await b.call("POST", path + "/rollback", {"reason": "from b"})
        assert status == 200 and body["status"] == "ROLLED_BACK"
