"""The NLB control plane in-process: NLBService over real gRPC and the REST admin surface."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import grpc
import pytest

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from marchproxy_nlb.app import NlbApp
from marchproxy_nlb.config import NlbSettings
from tests.conftest import ProxiedEchoBackend

KEY = "cp-test-key"
META = (("x-cluster-api-key", KEY),)

SEED_002_METRICS = [
    "nlb_routed_connections_total",
    "nlb_routing_errors_total",
    "nlb_active_connections",
    "nlb_ratelimit_allowed_total",
    "nlb_ratelimit_denied_total",
    "nlb_ratelimit_tokens_available",
    "nlb_scale_operations_total",
    "nlb_current_replicas",
    "nlb_bluegreen_traffic_split",
]


@pytest.fixture
async def app() -> AsyncIterator[NlbApp]:
    settings = NlbSettings(
        cluster_api_key=KEY,
        nlb_grpc_port=0,
        nlb_admin_port=0,
        heartbeat_timeout=5,
        nlb_max_message_bytes=64 * 1024,
    )
    nlb = NlbApp(settings, with_dataplane=False)
    await nlb.start()
    try:
        yield nlb
    finally:
        await nlb.stop()


@pytest.fixture
async def stub(app: NlbApp) -> AsyncIterator[nlb_pb2_grpc.NLBServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as ch:
        yield nlb_pb2_grpc.NLBServiceStub(ch)


def register_request(**kw: object) -> nlb_pb2.RegisterModuleRequest:
    base: dict[str, object] = {
        "module_id": "alb",
        "instance_id": "alb-1",
        "module_type": types_pb2.MODULE_TYPE_ALB,
        "protocols": [types_pb2.PROTOCOL_HTTP, types_pb2.PROTOCOL_WEBSOCKET],
        "data_address": types_pb2.Address(host="127.0.0.1", port=8080),
        "grpc_address": types_pb2.Address(host="127.0.0.1", port=50061),
        "version": "1.0.0",
        "weight": 100,
        "capacity": 1000,
        "labels": {"zone": "a"},
    }
    base.update(kw)
    return nlb_pb2.RegisterModuleRequest(**base)  # type: ignore[arg-type]


async def test_register_list_info_stats_and_health(stub: nlb_pb2_grpc.NLBServiceStub) -> None:
    resp = await stub.RegisterModule(register_request(), metadata=META)
    assert resp.success and resp.registration_id == "alb-1"
    assert resp.heartbeat_timeout_seconds == 5
    # seed 002 form: one protocol name, "ip" address and port
    seed = nlb_pb2.RegisterModuleRequest(
        module_id="mysql-1", protocol="mysql", address="127.0.0.1", port=3307, version="1"
    )
    assert (await stub.RegisterModule(seed, metadata=META)).success
    dblb = register_request(
        module_id="dblb",
        instance_id="dblb-1",
        module_type=types_pb2.MODULE_TYPE_DBLB,
        protocols=[types_pb2.PROTOCOL_POSTGRESQL, types_pb2.PROTOCOL_MYSQL],
        protocol_addresses=[
            types_pb2.ProtocolAddress(
                protocol=types_pb2.PROTOCOL_MYSQL,
                address=types_pb2.Address(host="127.0.0.1", port=3307),
            )
        ],
    )
    assert (await stub.RegisterModule(dblb, metadata=META)).success
    info = await stub.GetModuleInfo(
        nlb_pb2.GetModuleInfoRequest(instance_id="dblb-1"), metadata=META
    )
    [pa] = info.instance.protocol_addresses
    assert (pa.protocol, pa.address.port) == (types_pb2.PROTOCOL_MYSQL, 3307)
    listed = await stub.ListModules(
        nlb_pb2.ListModulesRequest(protocol=types_pb2.PROTOCOL_HTTP), metadata=META
    )
    assert [i.instance_id for i in listed.instances] == ["alb-1"]
    assert listed.instances[0].labels["zone"] == "a"
    mysql = await stub.ListModules(
        nlb_pb2.ListModulesRequest(protocol=types_pb2.PROTOCOL_MYSQL), metadata=META
    )
    seed_instance = next(i for i in mysql.instances if i.instance_id == "mysql-1")
    assert seed_instance.data_address.port == 3307
    info = await stub.GetModuleInfo(nlb_pb2.GetModuleInfoRequest(module_id="alb"), metadata=META)
    assert info.instance.version == "1.0.0"
    hb = await stub.Heartbeat(
        nlb_pb2.HeartbeatRequest(
            module_id="alb", instance_id="alb-1", active_connections=4, cpu_percent=12.5
        ),
        metadata=META,
    )
    assert hb.success and hb.instruction == nlb_pb2.INSTRUCTION_NONE
    stats = await stub.GetStats(nlb_pb2.StatsRequest(module_id="alb-1"), metadata=META)
    assert stats.cpu_usage_percent == pytest.approx(12.5)
    assert stats.custom_metrics["reported_connections"] == "4"
    health = await stub.CheckHealth(nlb_pb2.CheckHealthRequest(include_modules=True), metadata=META)
    assert health.status == types_pb2.HEALTH_STATUS_HEALTHY
    assert set(health.module_health) == {"alb-1", "mysql-1", "dblb-1"}
    upd = await stub.UpdateHealth(
        nlb_pb2.HealthUpdateRequest(module_id="alb", status=types_pb2.HEALTH_STATUS_UNHEALTHY),
        metadata=META,
    )
    assert upd.success
    listed = await stub.ListModules(
        nlb_pb2.ListModulesRequest(health=types_pb2.HEALTH_STATUS_UNHEALTHY), metadata=META
    )
    assert [i.instance_id for i in listed.instances] == ["alb-1"]


async def test_unknown_heartbeat_asks_to_reregister_and_unregister_drains(
    stub: nlb_pb2_grpc.NLBServiceStub,
) -> None:
    hb = await stub.Heartbeat(
        nlb_pb2.HeartbeatRequest(module_id="alb", instance_id="ghost"), metadata=META
    )
    assert not hb.success and hb.instruction == nlb_pb2.INSTRUCTION_REREGISTER
    await stub.RegisterModule(register_request(), metadata=META)
    out = await stub.UnregisterModule(
        nlb_pb2.UnregisterModuleRequest(instance_id="alb-1", graceful=True), metadata=META
    )
    assert out.success
    hb = await stub.Heartbeat(
        nlb_pb2.HeartbeatRequest(module_id="alb", instance_id="alb-1"), metadata=META
    )
    assert hb.instruction == nlb_pb2.INSTRUCTION_DRAIN
    listed = await stub.ListModules(
        nlb_pb2.ListModulesRequest(include_draining=True), metadata=META
    )
    assert listed.instances[0].draining
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UnregisterModule(
            nlb_pb2.UnregisterModuleRequest(instance_id="ghost"), metadata=META
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"module_id": ""}, "module_id is required"),
        ({"module_id": "bad id with spaces"}, "module_id"),
        ({"module_id": "x" * 500}, "longer than"),
        ({"instance_id": "../../etc"}, "instance_id"),
        ({"protocols": []}, "protocol"),
        ({"protocols": [999]}, "unknown protocol"),
        ({"module_type": 77}, "module type"),
        ({"data_address": types_pb2.Address(host="127.0.0.1", port=70000)}, "port"),
        ({"data_address": types_pb2.Address(host="", port=80)}, "host"),
        ({"weight": 1_000_000}, "weight"),
        ({"labels": {f"k{i}": "v" for i in range(100)}}, "labels"),
        ({"version": "v" * 100}, "version"),
    ],
)
async def test_bad_registration_is_invalid_argument(
    stub: nlb_pb2_grpc.NLBServiceStub, change: dict[str, object], needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RegisterModule(register_request(**change), metadata=META)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


async def test_oversized_message_is_refused_and_server_survives(
    stub: nlb_pb2_grpc.NLBServiceStub,
) -> None:
    huge = register_request(labels={"blob": "x" * 200_000})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RegisterModule(huge, metadata=META)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stub.RegisterModule(register_request(), metadata=META)).success


async def test_config_rpcs_validate_and_apply(
    app: NlbApp, stub: nlb_pb2_grpc.NLBServiceStub
) -> None:
    bad = await stub.UpdateNLBConfig(
        nlb_pb2.UpdateNLBConfigRequest(config_json='{"heartbeat_timeout": 0, "bogus": 1}'),
        metadata=META,
    )
    assert not bad.success and len(bad.validation_errors) == 2
    ok = await stub.UpdateNLBConfig(
        nlb_pb2.UpdateNLBConfigRequest(config_json='{"heartbeat_timeout": 3}'), metadata=META
    )
    assert ok.success and app.registry.heartbeat_timeout == 3
    cfg = json.loads(
        (await stub.GetNLBConfig(nlb_pb2.GetNLBConfigRequest(), metadata=META)).config_json
    )
    assert cfg["dynamic"]["heartbeat_timeout"] == 3
    assert "cluster_api_key" not in cfg["static"]


async def test_metrics_rpcs_and_stream(stub: nlb_pb2_grpc.NLBServiceStub) -> None:
    await stub.RegisterModule(register_request(), metadata=META)
    report = nlb_pb2.ReportMetricsRequest(
        metrics=types_pb2.ModuleMetrics(
            module_id="alb",
            instance_id="alb-1",
            metrics=[types_pb2.MetricDataPoint(name="rps", value=42)],
        )
    )
    assert (await stub.ReportMetrics(report, metadata=META)).success
    mm = await stub.GetModuleMetrics(
        nlb_pb2.GetModuleMetricsRequest(module_id="alb"), metadata=META
    )
    assert mm.metrics[0].metrics[0].value == 42
    nm = await stub.GetNLBMetrics(nlb_pb2.GetNLBMetricsRequest(), metadata=META)
    assert nm.metrics.registered_instances == 1 and nm.metrics.healthy_instances == 1
    got = [
        m
        async for m in stub.StreamNLBMetrics(
            nlb_pb2.StreamNLBMetricsRequest(interval_seconds=1, max_messages=2), metadata=META
        )
    ]
    assert len(got) == 2
    dist = await stub.GetLoadDistribution(nlb_pb2.GetLoadDistributionRequest(), metadata=META)
    assert [i.instance_id for i in dist.instances] == ["alb-1"]


async def test_rest_healthz_metrics_status(app: NlbApp, stub: nlb_pb2_grpc.NLBServiceStub) -> None:
    await stub.RegisterModule(register_request(), metadata=META)
    base = f"http://127.0.0.1:{app.admin.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200 and await r.text() == "OK"
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
        for name in SEED_002_METRICS:
            assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert 'nlb_registered_instances{health="healthy",module="alb"} 1.0' in text
        async with http.get(f"{base}/status") as r:
            body = await r.json()
        status = body["status"]
        for key in (
            "version",
            "uptime",
            "rate_limiting",
            "autoscaling",
            "bluegreen",
            "connection_pooling",
            "router_stats",
            "ratelimit_stats",
            "autoscaler_stats",
            "bluegreen_stats",
            "client_pool_stats",
        ):
            assert key in status, key
        assert status["router_stats"]["protocols"]["http"]["active_modules"] == 1
        assert status["modules"][0]["instance_id"] == "alb-1"
        async with http.get(f"{base}/nope") as r:
            assert r.status == 404
            err = await r.json()
            assert set(err) == {"error", "message", "details"}


async def test_reflection_lists_services_without_a_key(app: NlbApp) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for resp in call:
            names |= {s.name for s in resp.list_services_response.service}
    assert {"marchproxy.v1.NLBService", "grpc.health.v1.Health"} <= names


async def test_list_modules_shows_draining_instances_only_when_asked(
    stub: nlb_pb2_grpc.NLBServiceStub,
) -> None:
    await stub.RegisterModule(register_request(), metadata=META)
    await stub.RegisterModule(register_request(instance_id="alb-2"), metadata=META)
    await stub.UnregisterModule(
        nlb_pb2.UnregisterModuleRequest(instance_id="alb-2", graceful=True), metadata=META
    )

    async def ids(**kw: object) -> list[str]:
        resp = await stub.ListModules(nlb_pb2.ListModulesRequest(**kw), metadata=META)  # type: ignore[arg-type]
        return [i.instance_id for i in resp.instances]

    assert await ids() == ["alb-1"]
    assert await ids(module_id="alb") == ["alb-1"]
    assert await ids(include_draining=True) == ["alb-1", "alb-2"]
    assert await ids(health=types_pb2.HEALTH_STATUS_DRAINING) == ["alb-2"]
    assert await ids(health=types_pb2.HEALTH_STATUS_HEALTHY, include_draining=True) == ["alb-1"]


@pytest.mark.parametrize(("address", "port"), [("::1", 8080), ("[::1]", 8080), ("[::1]:8080", 0)])
async def test_seed_002_registration_with_an_ipv6_address(
    app: NlbApp, stub: nlb_pb2_grpc.NLBServiceStub, address: str, port: int
) -> None:
    seed = nlb_pb2.RegisterModuleRequest(
        module_id="v6-1", protocol="http", address=address, port=port, version="1"
    )
    assert (await stub.RegisterModule(seed, metadata=META)).success
    info = await stub.GetModuleInfo(nlb_pb2.GetModuleInfoRequest(module_id="v6-1"), metadata=META)
    assert (info.instance.data_address.host, info.instance.data_address.port) == ("::1", 8080)
    [view] = app.core.status()["status"]["modules"]
    assert view["data_address"] == "[::1]:8080"


async def test_seed_002_ipv6_address_without_a_port_is_invalid(
    stub: nlb_pb2_grpc.NLBServiceStub,
) -> None:
    seed = nlb_pb2.RegisterModuleRequest(module_id="v6-1", protocol="http", address="::1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RegisterModule(seed, metadata=META)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "port" in (err.value.details() or "")


async def test_stream_errors_are_mapped_and_counted_like_unary_ones(
    app: NlbApp, stub: nlb_pb2_grpc.NLBServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = app.core.nlb_metrics_pb

    def flaky() -> nlb_pb2.NLBMetrics:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(app.core, "nlb_metrics_pb", flaky)
    stream = stub.StreamNLBMetrics(
        nlb_pb2.StreamNLBMetricsRequest(interval_seconds=1, max_messages=5), metadata=META
    )
    got = []

    async def drain() -> None:
        async for m in stream:
            got.append(m)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await drain()
    assert len(got) == 1  # the failure came between two messages
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error in StreamNLBMetrics"

    def count(code: str) -> float:
        labels = {"method": "StreamNLBMetrics", "code": code}
        return app.metrics.registry.get_sample_value("nlb_grpc_requests_total", labels) or 0.0

    async with asyncio.timeout(10):  # counted when the server side ends, maybe after the client
        while count("INTERNAL") < 1:
            await asyncio.sleep(0.02)
    assert count("OK") == 0
    monkeypatch.setattr(app.core, "nlb_metrics_pb", real)
    # a finished stream counts OK once, a stream the client cancels counts CANCELLED
    done = [
        m
        async for m in stub.StreamNLBMetrics(
            nlb_pb2.StreamNLBMetricsRequest(interval_seconds=1, max_messages=1), metadata=META
        )
    ]
    assert len(done) == 1
    async with asyncio.timeout(10):
        while count("OK") < 1:
            await asyncio.sleep(0.02)
    cancelled = stub.StreamNLBMetrics(
        nlb_pb2.StreamNLBMetricsRequest(interval_seconds=1), metadata=META
    )
    await cancelled.read()
    cancelled.cancel()
    async with asyncio.timeout(10):
        while count("CANCELLED") < 1:
            await asyncio.sleep(0.02)
    assert count("OK") == 1


# -- /status: seed 002's nested shape --------------------------------------------------------------


def is_iso(value: object) -> bool:
    return isinstance(value, str) and datetime.fromisoformat(value) is not None


def assert_seed_002_shape(body: dict[str, Any]) -> None:
    """Every object and field of seed 002's /status example, with its JSON type."""
    assert set(body) == {"status"}
    s = body["status"]
    assert isinstance(s["version"], str)
    assert isinstance(s["uptime"], float | int) and s["uptime"] >= 0
    for flag in ("rate_limiting", "autoscaling", "bluegreen", "connection_pooling"):
        assert isinstance(s[flag], bool), flag
    router = s["router_stats"]
    assert isinstance(router["protocols"], dict)
    for entry in router["protocols"].values():
        assert set(entry) >= {"active_modules", "active_connections", "total_routed"}
        assert all(isinstance(entry[k], int) for k in entry)
    for err in router["errors"]:
        assert set(err) >= {"protocol", "error_type", "count"}
        assert isinstance(err["count"], int)
    for bucket in s["ratelimit_stats"]["buckets"].values():
        for key in ("tokens_available", "capacity", "refill_rate"):
            assert isinstance(bucket[key], float | int), key
        for key in ("allowed_total", "denied_total"):
            assert isinstance(bucket[key], int), key
    scaler = s["autoscaler_stats"]
    assert isinstance(scaler["enabled"], bool)
    assert scaler["last_evaluation"] is None or is_iso(scaler["last_evaluation"])
    for h in scaler["recent_scaling_history"]:
        assert is_iso(h["timestamp"])
        assert isinstance(h["protocol"], str) and h["direction"] in ("up", "down")
        assert isinstance(h["previous_replicas"], int) and isinstance(h["new_replicas"], int)
        assert isinstance(h["reason"], str)
    for d in s["bluegreen_stats"]["active_deployments"]:
        for key in ("protocol", "version", "blue_version", "green_version", "status"):
            assert isinstance(d[key], str), key
        assert isinstance(d["traffic_split_percent"], int | float)
    pool = s["client_pool_stats"]
    for key in ("total_connections", "active_connections", "failed_connections"):
        assert isinstance(pool[key], int), key
    assert isinstance(pool["reconnect_attempts"], int)


async def get_status(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/status") as r:
        assert r.status == 200
        body: dict[str, Any] = json.loads(await r.text())
        return body


async def test_status_has_seed_002_shape_without_a_data_plane(
    app: NlbApp, stub: nlb_pb2_grpc.NLBServiceStub
) -> None:
    await stub.RegisterModule(register_request(), metadata=META)
    body = await get_status(app.admin.port)
    assert_seed_002_shape(body)
    assert body["status"]["router_stats"]["protocols"]["http"] == {
        "active_modules": 1,
        "active_connections": 0,
        "total_routed": 0,
    }


async def test_status_has_seed_002_shape_with_every_subsystem_in_use() -> None:
    settings = NlbSettings(
        cluster_api_key=KEY,
        nlb_grpc_port=0,
        nlb_admin_port=0,
        nlb_listeners="0=http,tls",
        nlb_scaler="process",
        nlb_scaler_commands={"web": [sys.executable, "-c", "pass"]},
        nlb_autoscale_interval=3600,
    )
    nlb = NlbApp(settings)
    await nlb.start()
    backend = await ProxiedEchoBackend("web").start()
    try:
        assert nlb.dataplane is not None
        port = nlb.dataplane.listener_addresses()[0][1]
        for version in ("1.0.0", "1.1.0"):
            nlb.registry.register(
                module_id="web",
                module_type=types_pb2.MODULE_TYPE_ALB,
                protocols=[types_pb2.PROTOCOL_HTTP],
                data_host="127.0.0.1",
                data_port=backend.port,
                instance_id=f"web-{version}",
                version=version,
            )
        errors = await nlb.dataplane.apply_config(
            {
                "rate_limits": [
                    {"target": f"listener:{port}", "requests_per_second": 100, "burst": 50}
                ],
                "deployments": [
                    {"module": "web", "version": "1.0.0", "traffic_weight": 80},
                    {"module": "web", "version": "1.1.0", "traffic_weight": 20},
                ],
                "scaling_policies": [{"module": "web", "min_instances": 0, "max_instances": 5}],
            }
        )
        assert errors == []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"|") == b"web|"
        writer.close()
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"\x16\x03\x01\x00\x05hello")  # TLS, but no TLS module: no_module
        async with asyncio.timeout(10):
            assert await r2.read() == b""
        w2.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nlb.grpc.port}") as ch:
            scaled = await nlb_pb2_grpc.NLBServiceStub(ch).TriggerScaling(
                nlb_pb2.TriggerScalingRequest(module_id="web", target_instances=3), metadata=META
            )
        assert scaled.success, scaled.message
        body = await get_status(nlb.admin.port)
        assert_seed_002_shape(body)
        s = body["status"]
        assert s["rate_limiting"] and s["bluegreen"] and s["autoscaling"]
        assert s["router_stats"]["protocols"]["http"]["total_routed"] == 1
        assert {"protocol": "tls", "error_type": "no_module", "count": 1} in s["router_stats"][
            "errors"
        ]
        assert s["ratelimit_stats"]["buckets"][f"listener:{port}"]["allowed_total"] == 2
        [dep] = s["bluegreen_stats"]["active_deployments"]
        assert (dep["protocol"], dep["green_version"], dep["traffic_split_percent"]) == (
            "http",
            "1.1.0",
            20,
        )
        [h] = s["autoscaler_stats"]["recent_scaling_history"]
        assert (h["direction"], h["previous_replicas"], h["new_replicas"]) == ("up", 2, 3)
        assert s["client_pool_stats"]["total_connections"] == 1
    finally:
        await backend.stop()
        await nlb.stop()
