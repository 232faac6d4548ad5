"""The ALB on the shared module runtime: static config file, admin /metrics and /status, gRPC
GetRoutes; and the packaged entry point as a real process under a short wrk run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml

from marchproxy.v1 import module_pb2, module_pb2_grpc, types_pb2
from marchproxy_alb.module import AlbHooks
from marchproxy_common.module.routes import route_to_pb
from marchproxy_common.module.runtime import run_module
from tests.alb.alb_support import alb_settings, make_cert, route
from tests.conftest import ProcessGroup, free_port, wait_port

KEY = "alb-runtime-test-key"


def write_config(path: Path, backend_url: str, tls: dict | None = None) -> str:
    config: dict = {"limits": {"max_headers": 50}}
    if tls:
        config["tls"] = tls
    snapshot = {
        "component": "alb",
        "version": 7,
        "modules": [{"name": "alb", "type": "ALB", "config": config}],
        "routes": [route("r1", backend_url, match={"path": "/echo"}, priority=10)],
    }
    path.write_text(yaml.safe_dump(snapshot))
    return str(path)


async def test_alb_through_module_runtime(backends, tmp_path: Path) -> None:
    b = await backends()
    cfg = write_config(tmp_path / "alb.yaml", b.url)
    settings = alb_settings(
        config_file=cfg, grpc_port=0, admin_port=0, cluster_api_key=KEY, alb_access_log=True
    )
    hooks = AlbHooks(settings)
    async with run_module(settings, hooks) as rt, aiohttp.ClientSession() as s:
        data = f"http://127.0.0.1:{rt.data_address.port}"
        admin = f"http://127.0.0.1:{rt.admin_address.port}"
        for _ in range(3):
            async with s.get(data + "/echo/x") as r:
                assert r.status == 200
                assert (await r.json())["path"] == "/echo/x"
        async with s.get(admin + "/metrics") as r:
            text = await r.text()
        assert 'marchproxy_alb_requests_total{route="r1",status_class="2xx"} 3.0' in text
        assert "marchproxy_alb_request_duration_seconds_bucket" in text
        async with s.get(admin + "/status") as r:
            status = await r.json()
        assert status["config"]["applied_version"] == 7
        assert status["routes"] == ["r1"]
        # `make test` runs tests/alb a second time on the compiled build (make native)
        assert status["build"] == os.environ.get("MARCHPROXY_EXPECT_BUILD", "interpreted")
        assert status["load"]["requests_total"] == 3
        assert hooks.plane.limits.max_headers == 50
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc_address.port}") as ch:
            stub = module_pb2_grpc.ModuleServiceStub(ch)
            resp = await stub.GetRoutes(
                module_pb2.GetRoutesRequest(), metadata=(("x-cluster-api-key", KEY),), timeout=10
            )
            assert [r.name for r in resp.routes] == ["r1"]
            # UpdateRoutes over gRPC changes live routing (seed 000 route form in metadata)
            b2 = await backends("b2")
            new = route("r2", b2.url, match={"path": "/who"}, priority=20)
            up = await stub.UpdateRoutes(
                module_pb2.UpdateRoutesRequest(routes=[route_to_pb(new)]),
                metadata=(("x-cluster-api-key", KEY),),
                timeout=10,
            )
            assert up.success, up.validation_errors
            async with s.get(data + "/who") as r:
                assert await r.text() == "b2"
            bad = route("r3", "ftp://nowhere", match={"path": "/bad"})
            up = await stub.UpdateRoutes(
                module_pb2.UpdateRoutesRequest(routes=[route_to_pb(bad)]),
                metadata=(("x-cluster-api-key", KEY),),
                timeout=10,
            )
            assert not up.success and up.validation_errors
            async with s.get(data + "/who") as r:
                assert await r.text() == "b2"  # the rejected set left the old one in force
            # SetRateLimit over gRPC attaches a token bucket to the route
            rl = await stub.SetRateLimit(
                module_pb2.SetRateLimitRequest(
                    rate_limit=types_pb2.RateLimit(
                        target="r2", requests_per_second=1, burst_size=2, enabled=True
                    )
                ),
                metadata=(("x-cluster-api-key", KEY),),
                timeout=10,
            )
            assert rl.success, rl.message
            codes = []
            for _ in range(3):
                async with s.get(data + "/who") as r:
                    codes.append(r.status)
            assert codes == [200, 200, 429]


@pytest.mark.integration
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_packaged_alb_process_under_wrk(backends, tmp_path: Path, loop: str) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is required for the smoke run")
    b = await backends()
    cert, key = make_cert(tmp_path, "tls.example.com")
    tls = {
        "certificates": [{"server_names": ["tls.example.com"], "cert_file": cert, "key_file": key}]
    }
    cfg = write_config(tmp_path / "alb.yaml", b.url, tls)
    data_port, admin_port, tls_port = free_port(), free_port(), free_port()
    procs = ProcessGroup(tmp_path)
    try:
        procs.start(
            "alb",
            [sys.executable, "-m", "marchproxy_alb", "--config", cfg],
            {
                "DATA_PORT": str(data_port),
                "ADMIN_PORT": str(admin_port),
                "ALB_TLS_PORT": str(tls_port),
                "GRPC_PORT": "0",
                "REGISTER_WITH_NLB": "false",
                "ALB_ACCESS_LOG": "false",
                "LOG_LEVEL": "WARNING",
                "MARCHPROXY_LOOP": loop,
            },
        )
        await asyncio.to_thread(wait_port, data_port)
        wrk = await asyncio.create_subprocess_exec(
            "wrk",
            "-t1",
            "-c8",
            "-d3s",
            f"http://127.0.0.1:{data_port}/echo/wrk",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(30):
                out, _ = await wrk.communicate()
        finally:
            if wrk.returncode is None:
                wrk.kill()
                await wrk.wait()
        text = out.decode()
        assert wrk.returncode == 0, text
        m = re.search(r"(\d+) requests in", text)
        assert m and int(m.group(1)) > 0, text
        assert "Non-2xx" not in text, text
        assert "Socket errors" not in text, text
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{admin_port}/status") as r,
        ):
            status = json.loads(await r.text())
        assert status["load"]["requests_total"] >= int(m.group(1))
        # TLS termination on the same loop (SNI picks the certificate curl verifies)
        curl = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "--cacert",
            cert,
            "--resolve",
            f"tls.example.com:{tls_port}:127.0.0.1",
            f"https://tls.example.com:{tls_port}/echo/tls",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(20):
                body, _ = await curl.communicate()
        finally:
            if curl.returncode is None:
                curl.kill()
                await curl.wait()
        assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "https"
    finally:
        procs.stop_all()
