"""The compose stack's configuration runs: every service started as its image starts it.

The environment of each service is the one `docker-compose config` renders from
deploy/docker-compose.yml and deploy/.env.example (MARCHPROXY_ENV=production, the cluster key,
module ids), with only what a single machine forces changed: ports become free ports, service
DNS names become 127.0.0.1, Redis is a private redis-server and the API's Postgres database is a
throwaway one on the machine's Postgres. Then the checks the orchestrators make: each
Dockerfile's own HEALTHCHECK command, the gRPC health check Kubernetes probes call, the API's
readiness path, every module registered with the NLB, HTTP, PostgreSQL and RTMP clients routed
through the NLB listeners to the ALB, DBLB and RTMP, and SIGTERM ends each process with exit 0
(the drain compose's stop_grace_period and Kubernetes' terminationGracePeriodSeconds allow).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import PrivateRedis, ProcessGroup, free_port
from tests.deploy.conftest import ROOT

pytestmark = pytest.mark.integration

MODULES = ("alb", "dblb", "ailb", "rtmp")
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
RTMP_HANDSHAKE_SIZE = 1536  # C1/S1 (RTMP spec 5.2.3)
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# the port variable each Dockerfile's HEALTHCHECK reads
HEALTH_PORT_VAR = {"nlb": "NLB_ADMIN_PORT", "api": "API_PORT"} | {m: "ADMIN_PORT" for m in MODULES}


@pytest.fixture
def api_database() -> Iterator[str]:
    """A database of the test's own, so the API's migrations touch nothing shared."""
    name = f"marchproxy_deploy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _healthcheck_code(service: str) -> str:
    text = (ROOT / "services" / service / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"^\s+CMD (\[.*\])$", text, re.M)
    assert match, f"{service}: no exec-form HEALTHCHECK CMD"
    argv = json.loads(match.group(1))
    assert argv[:2] == ["python", "-c"], argv
    return str(argv[2])


def _healthcheck_passes(service: str, port: int) -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", _healthcheck_code(service)],
        env={HEALTH_PORT_VAR[service]: str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=15,
        check=False,
    )
    return proc.returncode == 0


def _wait(what: str, check: Any, group: ProcessGroup, timeout: float = STARTUP_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in group.procs:
            assert p.proc.poll() is None, f"{p.name} exited early:\n{p.output()[-3000:]}"
        result = check()
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}\n{group.dump()}")


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _grpc_serving(port: int) -> bool:
    """What a Kubernetes `grpc:` probe asks: grpc.health.v1 Check with service ""."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _exchange(port: int, request: bytes) -> bytes:
    """Send request, return what comes back before the peer closes or 5 s pass."""
    reply = b""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        sock.sendall(request)
        while len(reply) < 64 * 1024:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
            if b"\r\n\r\n" in reply or reply[:1] in (b"E", b"R"):
                break
    return reply


def _http_answer(port: int) -> bool:
    """Any HTTP response: the NLB closes what it cannot route, so an answer came from the ALB."""
    reply = _exchange(port, b"GET /deploy-check HTTP/1.1\r\nHost: deploy.test\r\n\r\n")
    # a 400 would be the NLB's PROXY header read as HTTP: the ALB did not trust the NLB
    return reply.startswith(b"HTTP/1.1 ") and not reply.startswith(b"HTTP/1.1 400")


def _postgres_answer(port: int) -> bool:
    """A StartupMessage answered by a backend message (auth request or error) from the DBLB."""
    params = b"user\x00deploy\x00database\x00deploy\x00\x00"
    startup = struct.pack("!II", 8 + len(params), 196608) + params
    reply = _exchange(port, startup)
    return len(reply) >= 5 and reply[:1] in (b"E", b"R")


def _rtmp_answer(port: int) -> bool:
    """C0+C1 of the RTMP handshake answered by S0 (version 3) and S1."""
    c1 = bytes(8) + bytes(i % 251 for i in range(RTMP_HANDSHAKE_SIZE - 8))
    reply = b""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        sock.sendall(b"\x03" + c1)
        while len(reply) < 1 + RTMP_HANDSHAKE_SIZE:
            chunk = sock.recv(8192)
            if not chunk:
                break
            reply += chunk
    return len(reply) >= 1 + RTMP_HANDSHAKE_SIZE and reply[0] == 3


def _localise(env: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """The compose environment with this machine's addresses and free ports."""
    out = {k: str(v) for k, v in env.items()}
    for key in list(out):
        if key.endswith("_PORT"):
            out[key] = str(ports.setdefault(key, free_port()))
        elif key.endswith("_HOST"):
            out[key] = "127.0.0.1"
    if "PROXY_TRUSTED_SOURCES" in out:  # the compose network is loopback here
        out["PROXY_TRUSTED_SOURCES"] = "127.0.0.0/8"
    return out


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ProcessGroup]:
    """The service processes; every one is stopped (SIGTERM, then SIGKILL) at the end."""
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def test_compose_environment_starts_every_service(
    compose: dict[str, Any],
    stack: ProcessGroup,
    private_redis: PrivateRedis,
    api_database: str,
) -> None:
    procs = stack
    services = compose["services"]
    shared = {"REDIS_URL": private_redis.url, "LOG_FORMAT": "console", "DRAIN_TIMEOUT": "3"}
    admin: dict[str, int] = {}
    grpc_ports: dict[str, int] = {}

    nlb_ports: dict[str, int] = {}
    nlb_env = _localise(services["nlb"]["environment"], nlb_ports)
    # the data path's listeners on free ports instead of 80/443/5432/...
    listeners = {
        protocols: free_port()
        for protocols in (p.split("=", 1)[1] for p in nlb_env["NLB_LISTENERS"].split(";"))
    }
    nlb_env["NLB_LISTENERS"] = ";".join(f"{port}={protos}" for protos, port in listeners.items())
    api_port = free_port()
    api_env = _localise(services["api"]["environment"], {"API_PORT": api_port})
    api_env |= {"DATABASE_URL": api_database}
    for env in (nlb_env, api_env):
        env |= shared | {"API_URL": f"http://127.0.0.1:{api_port}"}
        env["NLB_ADDR"] = f"127.0.0.1:{nlb_ports['NLB_GRPC_PORT']}"
    assert api_env["MARCHPROXY_ENV"] == nlb_env["MARCHPROXY_ENV"] == "production"

    procs.start("api", [sys.executable, "-m", "marchproxy_api"], api_env)
    procs.start("nlb", [sys.executable, "-m", "marchproxy_nlb"], nlb_env)
    admin |= {"api": api_port, "nlb": nlb_ports["NLB_ADMIN_PORT"]}
    grpc_ports["nlb"] = nlb_ports["NLB_GRPC_PORT"]

    for module in MODULES:
        ports: dict[str, int] = {}
        env = _localise(services[module]["environment"], ports)
        env |= shared | {
            "API_URL": api_env["API_URL"],
            "NLB_ADDR": nlb_env["NLB_ADDR"],
            "ADVERTISE_HOST": "127.0.0.1",
        }
        assert env["MARCHPROXY_ENV"] == "production" and env["MODULE_ID"] == module
        procs.start(module, [sys.executable, "-m", f"marchproxy_{module}"], env)
        admin[module], grpc_ports[module] = ports["ADMIN_PORT"], ports["GRPC_PORT"]

    # Docker's view: the image's own HEALTHCHECK command
    for service, port in admin.items():
        _wait(f"{service} HEALTHCHECK", lambda s=service, p=port: _healthcheck_passes(s, p), procs)
    # Kubernetes' view: gRPC probes for the NLB and modules, HTTP readiness for the API
    for service, port in grpc_ports.items():
        _wait(f"{service} grpc health", lambda p=port: _grpc_serving(p), procs)
    _wait("api /readyz", lambda: _healthcheck_passes("api", api_port), procs)
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/readyz", timeout=5) as resp:
        assert resp.status == 200

    def registered() -> set[str] | None:
        with contextlib.suppress(OSError, ValueError):
            status = _http_json(f"http://127.0.0.1:{admin['nlb']}/status")
            ids = {m["module_id"] for m in status["status"]["modules"] if m["health"] == "healthy"}
            return ids if set(MODULES) <= ids else None
        return None

    assert set(MODULES) <= _wait("modules registered with the NLB", registered, procs)

    # client traffic on the NLB's listeners reaches the modules that registered themselves
    http_port = next(port for protos, port in listeners.items() if "http" in protos.split(","))
    pg_port = next(port for protos, port in listeners.items() if protos == "postgresql")
    _wait("an HTTP answer through NLB -> ALB", lambda: _http_answer(http_port), procs)
    _wait("a PostgreSQL answer through NLB -> DBLB", lambda: _postgres_answer(pg_port), procs)
    rtmp_port = next(port for protos, port in listeners.items() if protos == "rtmp")
    _wait("an RTMP handshake through NLB -> RTMP", lambda: _rtmp_answer(rtmp_port), procs)
    status = _http_json(f"http://127.0.0.1:{admin['nlb']}/status")["status"]
    routed = {m["module_id"]: m["routed_total"] for m in status["modules"]}
    assert routed["alb"] >= 1 and routed["dblb"] >= 1 and routed["rtmp"] >= 1, routed

    # SIGTERM, as `docker stop` and the kubelet send it: modules drain and exit 0, then the rest
    for name in (*MODULES, "nlb", "api"):
        (proc,) = [p for p in procs.procs if p.name == name]
        proc.signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} ignored SIGTERM for {STOP_TIMEOUT}s\n{proc.output()[-3000:]}")
        assert code == 0, f"{name} exited {code}\n{proc.output()[-3000:]}"
