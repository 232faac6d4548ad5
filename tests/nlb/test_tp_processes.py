"""The NLB as real processes: limits shared by two NLBs through Redis, SIGKILLed instances
under load, and a plain SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
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
