"""Autoscaler: the pure rule, the process executor scaling real module processes 1 → 3 → 1
under a real connection load, and the docker and kubernetes executors against local servers
that speak the few endpoints they call (as the Docker Engine and Kubernetes API documents)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import web

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc
from marchproxy_nlb.app import NlbApp
from marchproxy_nlb.config import NlbSettings
from marchproxy_nlb.registry.table import Instance
from marchproxy_nlb.traffic.autoscaler import Autoscaler, Policy, decide, parse_policies
from marchproxy_nlb.traffic.executors import DockerExecutor, KubernetesExecutor, ProcessExecutor


def inst(i: int, cpu: float = 0.0, conns: int = 0) -> Instance:
    return Instance(
        instance_id=f"i{i}",
        module_id="alb",
        module_type=1,
        protocols=frozenset({3}),
        data_host="127.0.0.1",
        data_port=1,
        cpu_percent=cpu,
        active_connections=conns,
    )


POLICY = Policy(
    module="alb",
    min_instances=1,
    max_instances=3,
    scale_up_threshold=80,
    scale_down_threshold=20,
    cooldown_seconds=60,
)


def test_rule_corrects_bounds_then_steps_once_per_cooldown() -> None:
    assert decide(POLICY, [], 0, None).target == 1  # type: ignore[union-attr]
    assert decide(POLICY, [inst(i) for i in range(5)], 0, 100).target == 3  # type: ignore[union-attr]
    hot = [inst(1, cpu=95), inst(2, cpu=85)]
    up = decide(POLICY, hot, now=1000, last_action=None)
    assert up is not None
    assert (up.target, up.direction, up.reason) == (3, "up", "high_cpu")
    assert decide(POLICY, hot, now=1030, last_action=1000) is None  # cooling down
    assert decide(POLICY, hot, now=1061, last_action=1000) is not None
    cold = [inst(1, cpu=5), inst(2, cpu=5)]
    down = decide(POLICY, cold, now=2000, last_action=None)
    assert down is not None
    assert (down.target, down.direction) == (1, "down")
    assert decide(POLICY, [inst(1, cpu=5)], now=2000, last_action=None) is None  # at min
    assert decide(POLICY, [inst(i, cpu=99) for i in range(3)], 0, None) is None  # at max


def test_policies_are_validated() -> None:
    _, errors = parse_policies(
        [
            {"module": "a", "min_instances": 3, "max_instances": 1},
            {"module": "b", "metric": "disk"},
            {"module": "c", "scale_up_threshold": 10, "scale_down_threshold": 50},
            {"min_instances": 1},
        ]
    )
    assert len(errors) == 4


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.integration
async def test_process_executor_scales_real_modules_one_to_three_and_back() -> None:
    app = NlbApp(
        NlbSettings(
            cluster_api_key="scale-key",
            nlb_grpc_port=0,
            nlb_admin_port=0,
            nlb_listeners="0=tcp",
            heartbeat_interval=0.3,
            drain_timeout=2,
        )
    )
    await app.start()
    clock = Clock()
    executor = ProcessExecutor(
        {"echo": [sys.executable, "-m", "marchproxy_common.module.example"]},
        {
            "NLB_ADDR": f"127.0.0.1:{app.grpc.port}",
            "CLUSTER_API_KEY": "scale-key",
            "HEARTBEAT_INTERVAL": "0.3",
            "DRAIN_TIMEOUT": "2",
            "LOG_LEVEL": "WARNING",
        },
        is_registered=lambda iid: app.registry.get(iid) is not None,
    )
    scaler = Autoscaler(app.registry, app.metrics, executor, clock=clock)
    assert app.dataplane is not None
    app.dataplane.autoscaler = scaler
    errors = await app.dataplane.apply_config(
        {
            "scaling_policies": [
                {
                    "module": "echo",
                    "min_instances": 1,
                    "max_instances": 3,
                    "metric": "connections",
                    "scale_up_threshold": 2,
                    "scale_down_threshold": 1,
                    "cooldown_seconds": 10,
                }
            ]
        }
    )
    assert errors == []
    port = app.dataplane.listener_addresses()[0][1]
    conns: list[socket.socket] = []

    async def live(n: int) -> None:
        async with asyncio.timeout(60):
            while len(scaler.live("echo")) != n:
                await asyncio.sleep(0.05)

    async def step(at: float) -> str | None:
        clock.now = at
        done = await scaler.evaluate()
        return done[0].direction if done else None

    try:
        assert await step(0) == "up"  # below min
        await live(1)
        for _ in range(6):  # the synthetic load: six open connections through the NLB
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"ping")
            assert await asyncio.to_thread(s.recv, 4) == b"ping"
            conns.append(s)
        assert await step(10) == "up"  # 6 connections on 1 instance
        await live(2)
        assert await step(11) is None  # cooldown
        assert await step(20) == "up"  # still 3 per instance
        await live(3)
        assert await step(30) is None  # at max
        for s in conns:
            s.close()
        async with asyncio.timeout(20):  # the NLB's count and the modules' heartbeats agree
            while any(i.active_connections or i.reported_connections for i in app.registry.all()):
                await asyncio.sleep(0.05)
        assert await step(40) == "down"
        await live(2)
        assert await step(45) is None  # cooldown
        assert await step(50) == "down"
        await live(1)
        assert await step(60) is None  # at min
        ups = app.metrics.registry.get_sample_value(
            "nlb_scale_operations_total", {"module": "echo", "direction": "up"}
        )
        downs = app.metrics.registry.get_sample_value(
            "nlb_scale_operations_total", {"module": "echo", "direction": "down"}
        )
        assert (ups, downs) == (3, 2)
        history = scaler.status()["recent_scaling_history"]
        assert [h["new_replicas"] for h in history] == [1, 2, 3, 2, 1]
    finally:
        for s in conns:
            s.close()
        await scaler.stop()
        await app.stop()


@pytest.fixture
async def fake_docker() -> AsyncIterator[tuple[str, list[str], dict[str, dict]]]:
    calls: list[str] = []
    containers: dict[str, dict] = {}

    async def list_(r: web.Request) -> web.Response:
        calls.append(f"GET /containers/json {r.query.get('filters')}")
        label = json.loads(r.query["filters"])["label"][0]
        key, _, value = label.partition("=")
        found = [c for c in containers.values() if c["Labels"].get(key) == value]
        return web.json_response(found)

    async def create(r: web.Request) -> web.Response:
        body = await r.json()
        cid = f"c{len(containers) + 1}"
        containers[cid] = {
            "Env": body.get("Env", []),
            "Id": cid,
            "Names": [f"/{r.query['name']}"],
            "Image": body["Image"],
            "Labels": body["Labels"],
            "Created": len(containers),
            "State": "created",
        }
        calls.append(f"POST /containers/create {body['Image']}")
        return web.json_response({"Id": cid, "Warnings": []}, status=201)

    async def start(r: web.Request) -> web.Response:
        containers[r.match_info["id"]]["State"] = "running"
        calls.append(f"POST start {r.match_info['id']}")
        return web.Response(status=204)

    async def stop(r: web.Request) -> web.Response:
        calls.append(f"POST stop {r.match_info['id']} t={r.query.get('t')}")
        return web.Response(status=204)

    async def delete(r: web.Request) -> web.Response:
        containers.pop(r.match_info["id"])
        calls.append(f"DELETE {r.match_info['id']}")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/containers/json", list_)
    app.router.add_post("/containers/create", create)
    app.router.add_post("/containers/{id}/start", start)
    app.router.add_post("/containers/{id}/stop", stop)
    app.router.add_delete("/containers/{id}", delete)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", calls, containers
    finally:
        await runner.cleanup()


async def test_docker_executor_creates_and_removes_labelled_containers(
    fake_docker: tuple[str, list[str], dict[str, dict]],
) -> None:
    url, calls, containers = fake_docker
    ex = DockerExecutor(url, {"alb": "marchproxy/alb:1.2"}, stop_timeout=5)
    try:
        await ex.scale("alb", 0, 2)
        assert sorted(c["State"] for c in containers.values()) == ["running", "running"]
        assert all(c["Labels"] == {"marchproxy.module": "alb"} for c in containers.values())
        await ex.scale("alb", 2, 1)
        assert list(containers) == ["c1"]  # the newest one went
        assert "POST stop c2 t=5" in calls
        with pytest.raises(Exception, match="no image"):
            await ex.scale("dblb", 0, 1)
    finally:
        await ex.close()


async def test_kubernetes_executor_patches_the_scale_subresource() -> None:
    seen: list[tuple[str, str, str, dict]] = []
    replicas = {"marchproxy-alb": 1}

    async def scale(r: web.Request) -> web.Response:
        name = r.match_info["name"]
        if r.method == "PATCH":
            assert r.content_type == "application/merge-patch+json"
            body = await r.json()
            seen.append((r.method, r.match_info["ns"], r.headers["Authorization"], body))
            replicas[name] = body["spec"]["replicas"]
        return web.json_response(
            {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": r.match_info["ns"]},
                "spec": {"replicas": replicas[name]},
                "status": {"replicas": replicas[name]},
            }
        )

    app = web.Application()
    app.router.add_route("*", "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", scale)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    ex = KubernetesExecutor(f"http://127.0.0.1:{runner.addresses[0][1]}", "proxy", token="sa-token")
    try:
        assert await ex.replicas("alb") == 1
        detail = await ex.scale("alb", 1, 3)
        assert detail == "deployment marchproxy-alb replicas=3"
        assert seen == [("PATCH", "proxy", "Bearer sa-token", {"spec": {"replicas": 3}})]
        assert await ex.replicas("alb") == 3
    finally:
        await ex.close()
        await runner.cleanup()


async def test_nlb_passes_its_address_and_key_to_docker_containers(
    fake_docker: tuple[str, list[str], dict[str, dict]],
) -> None:
    url, _, containers = fake_docker
    app = NlbApp(
        NlbSettings(
            cluster_api_key="docker-key",
            nlb_grpc_port=0,
            nlb_admin_port=0,
            nlb_scaler="docker",
            nlb_docker_url=url,
            nlb_docker_images={"alb": "marchproxy/alb:1.2"},
            nlb_scaler_nlb_addr="nlb:50051",
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as ch:
            resp = await nlb_pb2_grpc.NLBServiceStub(ch).TriggerScaling(
                nlb_pb2.TriggerScalingRequest(module_id="alb", target_instances=1),
                metadata=(("x-cluster-api-key", "docker-key"),),
            )
        assert resp.success, resp.message
        [c] = containers.values()
        env = dict(e.split("=", 1) for e in c["Env"])
        assert env == {"NLB_ADDR": "nlb:50051", "CLUSTER_API_KEY": "docker-key", "MODULE_ID": "alb"}
    finally:
        await app.stop()


@pytest.mark.integration
async def test_a_module_that_is_still_starting_is_not_started_again() -> None:
    app = NlbApp(NlbSettings(cluster_api_key="scale-key", nlb_grpc_port=0, nlb_admin_port=0))
    await app.start()
    clock = Clock()
    executor = ProcessExecutor(
        {"echo": [sys.executable, "-m", "marchproxy_common.module.example"]},
        {
            "NLB_ADDR": f"127.0.0.1:{app.grpc.port}",
            "CLUSTER_API_KEY": "scale-key",
            "HEARTBEAT_INTERVAL": "0.3",
            "LOG_LEVEL": "WARNING",
        },
        is_registered=lambda iid: app.registry.get(iid) is not None,
        clock=clock,
    )
    scaler = Autoscaler(app.registry, app.metrics, executor, clock=clock)
    scaler.load([{"module": "echo", "min_instances": 1, "max_instances": 3}])
    try:
        for step in range(10):  # evaluations while the first process boots
            clock.now = step
            await scaler.evaluate()
            if scaler.live("echo"):
                break
            await asyncio.sleep(0.1)
        async with asyncio.timeout(30):
            while not scaler.live("echo"):
                await asyncio.sleep(0.05)
        for step in range(10, 15):
            clock.now = step
            assert await scaler.evaluate() == []
        assert executor.started_total == 1
        assert executor.pending("echo") == 0
        assert scaler.status()["policies"][0]["current_replicas"] == 1
    finally:
        await scaler.stop()
        await app.stop()


@pytest.mark.integration
async def test_a_module_that_crashes_at_start_is_retried_with_backoff() -> None:
    registry_app = NlbApp(
        NlbSettings(cluster_api_key="scale-key", nlb_grpc_port=0, nlb_admin_port=0),
        with_dataplane=False,
    )
    clock = Clock()
    executor = ProcessExecutor(
        {"bad": [sys.executable, "-c", "raise SystemExit(3)"]},
        is_registered=lambda iid: registry_app.registry.get(iid) is not None,
        backoff_base=2.0,
        clock=clock,
    )
    scaler = Autoscaler(registry_app.registry, registry_app.metrics, executor, clock=clock)
    scaler.load([{"module": "bad", "min_instances": 1, "max_instances": 2}])
    try:
        for step in range(20):
            clock.now = step
            await scaler.evaluate()
            async with asyncio.timeout(20):  # let a crashed start be reaped at this time
                while executor.pending("bad") or any(
                    t.get_name().startswith("reap bad") for t in asyncio.all_tasks()
                ):
                    await asyncio.sleep(0.01)
        # starts at t=0, then after 2, 4 and 8 s of backoff: 0, 2, 6, 14
        assert executor.started_total == 4
        assert executor.failed_starts["bad"] == 4
        assert [h["reason"] for h in scaler.history] == ["below_min"] * 4
        assert executor.backoff("bad") == pytest.approx(14 + 16 - 19)
    finally:
        await scaler.stop()
