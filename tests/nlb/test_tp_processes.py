"""The NLB as real processes: limits shared by two NLBs through Redis, SIGKILLed instances
under load, and a plain SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from tests.conftest import ProcessGroup, ProxiedEchoBackend, ServiceProcess, free_port, wait_port

pytestmark = pytest.mark.integration

KEY = "nlb-process-key"
META = (("x-cluster-api-key", KEY),)
REQUEST = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def start_nlb(procs: ProcessGroup, name: str, **env: str) -> tuple[ServiceProcess, int, int, int]:
    listen, grpc_port, admin = free_port(), free_port(), free_port()
    proc = procs.python(
        name,
        "marchproxy_nlb",
        {
            "CLUSTER_API_KEY": KEY,
            "NLB_LISTENERS": f"{listen}=http",
            "NLB_GRPC_PORT": str(grpc_port),
            "NLB_ADMIN_PORT": str(admin),
            **env,
        },
    )
    # not wait_port(listen): a probe connection would be a client (rate limits, counters);
    # listeners are up before the admin server starts
    wait_port(grpc_port)
    wait_port(admin)
    return proc, listen, grpc_port, admin


async def register(grpc_port: int, instance_id: str, port: int, module: str = "web") -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        resp = await nlb_pb2_grpc.NLBServiceStub(ch).RegisterModule(
            nlb_pb2.RegisterModuleRequest(
                module_id=module,
                instance_id=instance_id,
                module_type=types_pb2.MODULE_TYPE_ALB,
                protocols=[types_pb2.PROTOCOL_HTTP],
                data_address=types_pb2.Address(host="127.0.0.1", port=port),
            ),
            metadata=META,
            timeout=10,
        )
        assert resp.success


async def who(port: int) -> str:
    """The name of the instance that answered one request; "" if the NLB refused it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return ""
    try:
        writer.write(REQUEST)
        async with asyncio.timeout(10):
            return (await reader.readuntil(b"|")).decode().rstrip("|")
    except (OSError, asyncio.IncompleteReadError):
        return ""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def metric(admin: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_a_cluster_rate_limit_is_shared_by_two_nlb_processes_through_redis(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    config = tmp_path / "nlb.json"
    # as the API compiles it: scope "global" means shared by every NLB replica
    limit = {"target": "global", "requests_per_second": 0.01, "burst": 4, "scope": "global"}
    config.write_text(json.dumps({"version": 1, "rate_limits": [limit]}))
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        # a unique key prefix keeps parallel runs apart in the machine's shared Redis
        "NLB_RATELIMIT_PREFIX": f"mp-test:{uuid.uuid4().hex}:",
        "CONFIG_FILE": str(config),
    }
    backend = await ProxiedEchoBackend("web").start()
    try:
        a = start_nlb(procs, "nlb-a", **env)
        b = start_nlb(procs, "nlb-b", **env)
        for _, _, grpc_port, _ in (a, b):
            await register(grpc_port, "web-1", backend.port)
        answers = [await who(nlb[1]) for nlb in (a, b, a, b, a, b, a, b)]
        assert answers.count("web") == 4, answers
        allowed = sum(metric(n[3], "nlb_ratelimit_allowed_total", bucket="global") for n in (a, b))
        denied = sum(metric(n[3], "nlb_ratelimit_denied_total", bucket="global") for n in (a, b))
        assert (allowed, denied) == (4, 4)
        # each process decided some of them: the budget really was shared
        assert metric(a[3], "nlb_ratelimit_allowed_total", bucket="global") >= 1
        assert metric(b[3], "nlb_ratelimit_allowed_total", bucket="global") >= 1
    finally:
        await backend.stop()


async def echo(port: int, payload: bytes) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(payload)
        async with asyncio.timeout(5):
            return await reader.readexactly(len(payload)) == payload
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def instances(grpc_port: int) -> list[types_pb2.ModuleInstance]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        resp = await nlb_pb2_grpc.NLBServiceStub(ch).ListModules(
            nlb_pb2.ListModulesRequest(include_draining=True), metadata=META, timeout=5
        )
    return list(resp.instances)


async def test_sigkilled_instance_under_load_gets_no_connection_after_the_heartbeat_timeout(
    procs: ProcessGroup,
) -> None:
    timeout = 2.0
    listen, grpc_port, admin = free_port(), free_port(), free_port()
    procs.python(
        "nlb",
        "marchproxy_nlb",
        {
            "CLUSTER_API_KEY": KEY,
            "NLB_LISTENERS": f"{listen}=tcp",
            "NLB_GRPC_PORT": str(grpc_port),
            "NLB_ADMIN_PORT": str(admin),
            "HEARTBEAT_TIMEOUT": str(timeout),
            "NLB_EXPIRY_INTERVAL": "0.1",
            # one attempt: a connection the NLB sends to the dead instance fails visibly
            "NLB_CONNECT_ATTEMPTS": "1",
        },
    )
    wait_port(grpc_port)
    modules = [
        procs.python(
            f"echo-{i}",
            "marchproxy_common.module.example",
            {
                "CLUSTER_API_KEY": KEY,
                "NLB_ADDR": f"127.0.0.1:{grpc_port}",
                "HEARTBEAT_INTERVAL": "0.3",
                "INSTANCE_ID": f"echo-{i}",
                "DATA_PORT": "0",
                "GRPC_PORT": "0",
                "ADMIN_PORT": "0",
            },
        )
        for i in (1, 2)
    ]
    async with asyncio.timeout(30):
        while len(await instances(grpc_port)) < 2:
            await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    outcomes: list[tuple[float, float, bool]] = []  # (started, ended, echoed)
    stop = asyncio.Event()

    async def client() -> None:
        for i in range(20_000):  # bounded in count and time
            if stop.is_set():
                return
            started = loop.time()
            ok = await echo(listen, f"n{i}".encode())
            outcomes.append((started, loop.time(), ok))
            if not ok:
                # a refusal takes well under a millisecond: without a pause the count bound
                # could run out while the dead instance is still listed
                await asyncio.sleep(0.01)

    load = asyncio.gather(client(), client())
    try:
        await asyncio.sleep(1.0)
        killed_at = loop.time()
        modules[0].signal(signal.SIGKILL)
        await asyncio.sleep(timeout + 2.0)
        stop.set()
        await load
    finally:
        stop.set()
        await load
    before = [ok for _, ended, ok in outcomes if ended < killed_at]
    # the NLB expires it within HEARTBEAT_TIMEOUT (+ its 0.1 s expiry sweep)
    after = [ok for started, _, ok in outcomes if started > killed_at + timeout + 0.3]
    assert before and all(before)
    failed_at = [round(t - killed_at, 2) for t, _, ok in outcomes if not ok]
    assert len(after) >= 10 and all(after), failed_at
    assert [i.instance_id for i in await instances(grpc_port)] == ["echo-2"]


async def test_sigterm_drains_open_connections_refuses_new_ones_and_exits_zero(
    procs: ProcessGroup,
) -> None:
    backend = await ProxiedEchoBackend("web").start()
    try:
        nlb, listen, grpc_port, _ = start_nlb(procs, "nlb", DRAIN_TIMEOUT="30")
        await register(grpc_port, "web-1", backend.port)
        held = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", listen)
            writer.write(REQUEST)
            async with asyncio.timeout(10):
                await reader.readuntil(b"|")
                await reader.readuntil(b"|")
            held.append((reader, writer))
        nlb.signal(signal.SIGTERM)
        async with asyncio.timeout(10):  # the listener closes...
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", listen)
                except ConnectionRefusedError:
                    break
                w.close()
                await asyncio.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):  # ...and stays closed
            await asyncio.open_connection("127.0.0.1", listen)
        assert nlb.proc.poll() is None  # still draining the three
        for i, (reader, writer) in enumerate(held):  # they work to their natural end
            writer.write(f"after SIGTERM {i}".encode())
            async with asyncio.timeout(10):
                got = b""
                while f"after SIGTERM {i}".encode() not in got:
                    got += await reader.read(1024)
            writer.write_eof()
            async with asyncio.timeout(10):
                await reader.read()
            writer.close()
        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        assert await asyncio.to_thread(nlb.wait, 20) == 0
        assert loop.time() - closed_at < 10  # it left when the last one ended, not at 30 s
    finally:
        await backend.stop()
