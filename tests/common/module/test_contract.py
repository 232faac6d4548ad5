"""The module contract: every module, run as a real process, against a real NLB process.

Parametrised over module implementations; each one must register with the cluster key, keep its
registration with heartbeats, disappear within HEARTBEAT_TIMEOUT when killed, drain and exit 0
on SIGTERM, re-register by itself after an NLB restart, and answer every ModuleService RPC.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marchproxy.v1 import module_pb2, module_pb2_grpc, nlb_pb2, nlb_pb2_grpc, types_pb2
from tests.conftest import ProcessGroup, ServiceProcess, free_port, wait_port

pytestmark = pytest.mark.integration

KEY = "contract-test-key"
META = (("x-cluster-api-key", KEY),)
HEARTBEAT_TIMEOUT = 2.0
HEARTBEAT_INTERVAL = 0.3

# module name -> (python -m target, module_id it registers as)
MODULES = {
    "echo": ("marchproxy_common.module.example", "echo"),
    "alb": ("marchproxy_alb", "alb"),
    "dblb": ("marchproxy_dblb", "dblb"),
    "ailb": ("marchproxy_ailb", "ailb"),
    "rtmp": ("marchproxy_rtmp", "rtmp"),
}
# a route each module accepts in UpdateRoutes (seed 000 form)
SAMPLE_BACKEND = {"alb": '{"target": "http://127.0.0.1:9", "timeout": 5}'}


@dataclass
class Nlb:
    proc: ServiceProcess
    grpc_port: int
    admin_port: int
    stub: nlb_pb2_grpc.NLBServiceStub


def start_nlb(procs: ProcessGroup, grpc_port: int, admin_port: int, **extra: str) -> ServiceProcess:
    env = {
        "CLUSTER_API_KEY": KEY,
        "NLB_GRPC_PORT": str(grpc_port),
        "NLB_ADMIN_PORT": str(admin_port),
        "HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
        "NLB_EXPIRY_INTERVAL": "0.1",
        "DRAIN_TIMEOUT": "2",
        **extra,
    }
    proc = procs.python("nlb", "marchproxy_nlb", env)
    wait_port(grpc_port)
    wait_port(admin_port)
    return proc


def start_module(procs: ProcessGroup, name: str, nlb_port: int, **extra: str) -> ServiceProcess:
    target, _ = MODULES[name]
    env = {
        "CLUSTER_API_KEY": KEY,
        "NLB_ADDR": f"127.0.0.1:{nlb_port}",
        "HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
        "DATA_PORT": "0",
        "GRPC_PORT": "0",
        "ADMIN_PORT": "0",
        "DRAIN_TIMEOUT": "5",
        **extra,
    }
    return procs.python(name, target, env)


@pytest.fixture
async def nlb(procs: ProcessGroup) -> AsyncIterator[Nlb]:
    grpc_port, admin_port = free_port(), free_port()
    proc = start_nlb(procs, grpc_port, admin_port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield Nlb(proc, grpc_port, admin_port, nlb_pb2_grpc.NLBServiceStub(ch))


async def instances(
    stub: nlb_pb2_grpc.NLBServiceStub, module_id: str
) -> list[types_pb2.ModuleInstance]:
    resp = await stub.ListModules(
        nlb_pb2.ListModulesRequest(module_id=module_id, include_draining=True),
        metadata=META,
        timeout=5,
    )
    return list(resp.instances)


async def wait_for(predicate, timeout: float, what: str, procs: ProcessGroup):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{procs.dump()}")


def registered(stub: nlb_pb2_grpc.NLBServiceStub, module_id: str):  # type: ignore[no-untyped-def]
    async def check() -> list[types_pb2.ModuleInstance]:
        return [i for i in await instances(stub, module_id) if not i.draining]

    return check


@pytest.fixture(params=sorted(MODULES))
def module_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_registers_and_heartbeats_keep_it(
    nlb: Nlb, procs: ProcessGroup, module_name: str
) -> None:
    module_id = MODULES[module_name][1]
    start_module(procs, module_name, nlb.grpc_port)
    [inst] = await wait_for(registered(nlb.stub, module_id), 30, "registration", procs)
    assert inst.health == types_pb2.HEALTH_STATUS_HEALTHY
    assert inst.data_address.port > 0 and inst.grpc_address.port > 0
    # Well past HEARTBEAT_TIMEOUT the heartbeats still keep the instance registered.
    await asyncio.sleep(HEARTBEAT_TIMEOUT * 1.5)
    [again] = await instances(nlb.stub, module_id)
    assert again.instance_id == inst.instance_id
    assert again.last_heartbeat.ToNanoseconds() > inst.last_heartbeat.ToNanoseconds()

    # Both gRPC servers answer the standard health service, no key needed.
    for port in (nlb.grpc_port, inst.grpc_address.port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_keys_are_required_everywhere(
    nlb: Nlb, procs: ProcessGroup, module_name: str
) -> None:
    module_id = MODULES[module_name][1]
    start_module(procs, module_name, nlb.grpc_port)
    [inst] = await wait_for(registered(nlb.stub, module_id), 30, "registration", procs)
    req = nlb_pb2.RegisterModuleRequest(
        module_id="intruder",
        module_type=types_pb2.MODULE_TYPE_ALB,
        protocols=[types_pb2.PROTOCOL_HTTP],
        data_address=types_pb2.Address(host="127.0.0.1", port=1),
    )
    for metadata in ((), (("x-cluster-api-key", "wrong"),), (("x-cluster-api-key", ""),)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await nlb.stub.RegisterModule(req, metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await nlb.stub.ListModules(nlb_pb2.ListModulesRequest(), metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{inst.grpc_address.port}") as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetStatus(module_pb2.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetStatus(
                module_pb2.GetStatusRequest(), metadata=(("x-cluster-api-key", "nope"),), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not await instances(nlb.stub, "intruder")


async def test_sigkill_expires_within_heartbeat_timeout(
    nlb: Nlb, procs: ProcessGroup, module_name: str
) -> None:
    module_id = MODULES[module_name][1]
    mod = start_module(procs, module_name, nlb.grpc_port)
    await wait_for(registered(nlb.stub, module_id), 30, "registration", procs)
    mod.signal(signal.SIGKILL)
    killed_at = time.monotonic()

    async def gone() -> bool:
        return not await instances(nlb.stub, module_id)

    # HEARTBEAT_TIMEOUT after the last heartbeat, plus one expiry sweep and scheduling slack.
    await wait_for(gone, HEARTBEAT_TIMEOUT + 1.5, "expiry after SIGKILL", procs)
    assert time.monotonic() - killed_at >= HEARTBEAT_TIMEOUT - HEARTBEAT_INTERVAL - 0.2


async def test_sigterm_unregisters_draining_first_and_exits_zero(
    nlb: Nlb, procs: ProcessGroup, module_name: str
) -> None:
    module_id = MODULES[module_name][1]
    mod = start_module(procs, module_name, nlb.grpc_port)
    [inst] = await wait_for(registered(nlb.stub, module_id), 30, "registration", procs)
    mod.signal(signal.SIGTERM)

    async def gone() -> bool:
        return not await instances(nlb.stub, module_id)

    await wait_for(gone, 20, "unregistration after SIGTERM", procs)
    assert await asyncio.to_thread(mod.wait, 20) == 0
    # The NLB saw the instance drain (no new connections) before it was removed.
    status = await nlb.stub.GetNLBStatus(nlb_pb2.GetNLBStatusRequest(), metadata=META)
    history = json.loads(status.status_json)["status"]["registration_history"]
    events = [h["event"] for h in history if h["instance_id"] == inst.instance_id]
    assert events == ["registered", "draining", "unregistered"], events


async def test_sigterm_waits_for_open_connections(nlb: Nlb, procs: ProcessGroup) -> None:
    module_id = MODULES["echo"][1]
    mod = start_module(procs, "echo", nlb.grpc_port)
    [inst] = await wait_for(registered(nlb.stub, module_id), 30, "registration", procs)
    # An open data connection keeps the module draining until we close it.
    conn = socket.create_connection(("127.0.0.1", inst.data_address.port), timeout=5)
    conn.sendall(b"hello")  # past the optional PROXY header wait: an active connection
    assert await asyncio.to_thread(conn.recv, 5) == b"hello"
    try:
        mod.signal(signal.SIGTERM)

        async def draining() -> list[types_pb2.ModuleInstance]:
            return [i for i in await instances(nlb.stub, module_id) if i.draining]

        [d] = await wait_for(draining, 10, "draining state", procs)
        assert d.health == types_pb2.HEALTH_STATUS_DRAINING
        assert mod.proc.poll() is None, "module exited before its connection finished"
    finally:
        conn.close()

    async def gone() -> bool:
        return not await instances(nlb.stub, module_id)

    await wait_for(gone, 15, "unregistration after drain", procs)
    assert await asyncio.to_thread(mod.wait, 15) == 0


async def test_modules_reregister_after_nlb_restart(
    nlb: Nlb, procs: ProcessGroup, module_name: str
) -> None:
    module_id = MODULES[module_name][1]
    start_module(procs, module_name, nlb.grpc_port)
    [before] = await wait_for(registered(nlb.stub, module_id), 30, "registration", procs)
    nlb.proc.signal(signal.SIGKILL)
    await asyncio.to_thread(nlb.proc.wait, 10)
    start_nlb(procs, nlb.grpc_port, nlb.admin_port)
    [after] = await wait_for(registered(nlb.stub, module_id), 30, "re-registration", procs)
    assert after.instance_id == before.instance_id
    assert after.data_address.port == before.data_address.port


async def test_every_module_rpc_answers(nlb: Nlb, procs: ProcessGroup, module_name: str) -> None:
    module_id = MODULES[module_name][1]
    start_module(procs, module_name, nlb.grpc_port)
    [inst] = await wait_for(registered(nlb.stub, module_id), 30, "registration", procs)
    route = types_pb2.Route(name="contract-route", priority=10, enabled=True)
    route.metadata["match_rules"] = '{"host": "contract.example"}'
    route.metadata["backend_config"] = SAMPLE_BACKEND.get(module_name, "{}")
    calls = {
        "GetStatus": module_pb2.GetStatusRequest(),
        "Reload": module_pb2.ReloadRequest(),
        "CanHandle": module_pb2.CanHandleRequest(host="contract.example"),
        "UpdateRoutes": module_pb2.UpdateRoutesRequest(routes=[route]),
        "GetRoutes": module_pb2.GetRoutesRequest(),
        "SetRateLimit": module_pb2.SetRateLimitRequest(
            rate_limit=types_pb2.RateLimit(
                target="contract-route", requests_per_second=5, burst_size=5
            )
        ),
        "GetRateLimits": module_pb2.GetRateLimitsRequest(),
        "RemoveRateLimit": module_pb2.RemoveRateLimitRequest(target="contract-route"),
        "DeleteRoute": module_pb2.DeleteRouteRequest(route_id="contract-route"),
        "GetMetrics": module_pb2.GetMetricsRequest(),
        "Scale": module_pb2.ScaleRequest(
            config=types_pb2.ScalingConfig(min_instances=1, max_instances=2, desired_instances=1)
        ),
        "GetInstances": module_pb2.GetInstancesRequest(),
        "SetTrafficWeight": module_pb2.SetTrafficWeightRequest(version="2.0.0", weight=10),
        "GetActiveVersion": module_pb2.GetActiveVersionRequest(),
        "PromoteVersion": module_pb2.PromoteVersionRequest(
            version="2.0.0", gradual=True, step_percent=15
        ),
        "Rollback": module_pb2.RollbackRequest(reason="contract"),
        "HealthCheck": module_pb2.HealthCheckRequest(deep=False),
        "GetStats": module_pb2.GetStatsRequest(),
        "GetConfig": module_pb2.GetConfigRequest(),
        "UpdateConfig": module_pb2.UpdateConfigRequest(config_json="{}", validate_only=True),
    }
    async with grpc.aio.insecure_channel(f"127.0.0.1:{inst.grpc_address.port}") as ch:
        stub = module_pb2_grpc.ModuleServiceStub(ch)
        answers = {}
        for name, req in calls.items():
            answers[name] = await getattr(stub, name)(req, metadata=META, timeout=10)
        assert answers["GetStatus"].instance.instance_id == inst.instance_id
        assert answers["CanHandle"].can_handle
        assert answers["UpdateRoutes"].success, answers["UpdateRoutes"].validation_errors
        assert [r.name for r in answers["GetRoutes"].routes] == ["contract-route"]
        assert [r.target for r in answers["GetRateLimits"].rate_limits] == ["contract-route"]
        assert answers["DeleteRoute"].success
        weights = {w.version: w.weight for w in answers["PromoteVersion"].weights}
        assert weights["2.0.0"] == 25
        assert answers["Rollback"].active_version
        assert any(i.instance_id == inst.instance_id for i in answers["GetInstances"].instances)
        assert answers["HealthCheck"].status == types_pb2.HEALTH_STATUS_HEALTHY
        assert answers["UpdateConfig"].success
        stream = stub.StreamMetrics(
            module_pb2.StreamMetricsRequest(interval_seconds=1, max_messages=2),
            metadata=META,
            timeout=10,
        )
        got = [m async for m in stream]
        assert len(got) == 2 and all(m.instance_id == inst.instance_id for m in got)
        # Bad input is INVALID_ARGUMENT or NOT_FOUND, never a crash.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateConfig(
                module_pb2.UpdateConfigRequest(config_json="{not json"), metadata=META, timeout=5
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteRoute(
                module_pb2.DeleteRouteRequest(route_id="missing"), metadata=META, timeout=5
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        shut = await stub.Shutdown(module_pb2.ShutdownRequest(reason="contract"), metadata=META)
        assert shut.success
    proc = procs.procs[-1]
    assert await asyncio.to_thread(proc.wait, 20) == 0


async def test_heartbeats_follow_a_short_nlb_timeout(procs: ProcessGroup) -> None:
    """An NLB with HEARTBEAT_TIMEOUT=1 keeps a module started with a 5 s interval: the module
    paces its heartbeats from the timeout the NLB announced at registration."""
    grpc_port, admin_port = free_port(), free_port()
    start_nlb(procs, grpc_port, admin_port, HEARTBEAT_TIMEOUT="1")
    start_module(procs, "echo", grpc_port, HEARTBEAT_INTERVAL="5")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = nlb_pb2_grpc.NLBServiceStub(ch)
        [first] = await wait_for(registered(stub, "echo"), 30, "registration", procs)
        await asyncio.sleep(3.0)  # three NLB timeouts
        [later] = await instances(stub, "echo")
    assert later.instance_id == first.instance_id, "the instance expired and re-registered"
    assert later.last_heartbeat.ToNanoseconds() > first.last_heartbeat.ToNanoseconds()


async def test_drain_instruction_drains_and_exits(nlb: Nlb, procs: ProcessGroup) -> None:
    """An operator drains an instance on the NLB (UpdateHealth DRAINING): the heartbeat answer
    carries INSTRUCTION_DRAIN and the module finishes the way SIGTERM does, exiting 0."""
    mod = start_module(procs, "echo", nlb.grpc_port)
    [inst] = await wait_for(registered(nlb.stub, "echo"), 30, "registration", procs)
    await nlb.stub.UpdateHealth(
        nlb_pb2.HealthUpdateRequest(
            module_id=inst.instance_id,
            status=types_pb2.HEALTH_STATUS_DRAINING,
            reason="contract test",
        ),
        metadata=META,
        timeout=5,
    )
    assert await asyncio.to_thread(mod.wait, 20) == 0
    assert "nlb drain instruction" in mod.output()

    async def gone() -> bool:
        return not await instances(nlb.stub, "echo")

    await wait_for(gone, 10, "unregistration after the drain", procs)


def test_module_table_covers_packaged_modules() -> None:
    """Every module target in the table can be imported (guards against typos)."""
    import importlib

    for target, _ in MODULES.values():
        main_module = target if target.endswith(".example") else f"{target}.__main__"
        assert callable(importlib.import_module(main_module).main), target
