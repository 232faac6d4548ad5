"""Shared fixtures: free ports, real service processes that are always stopped, settings."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from marchproxy_common.wire.proxy_protocol import NeedData, parse

settings.register_profile(
    "fast", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

ROOT = Path(__file__).resolve().parent.parent
RESERVED_PORTS = frozenset({5432, 6379, 3306, 5672, 1883, 4222})


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_cursor() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, one disjoint block per xdist worker.

    A port taken with bind(0) and released lies in the ephemeral range, where any outgoing
    connect() of any test may take it before the service under test binds it: the race that
    made a service fail with EADDRINUSE. Below that range the kernel never hands ports out, so
    only our own picks compete, and the per-worker blocks keep those apart.
    """
    floor = _ephemeral_floor()
    low = 10_000 if floor > 12_000 else 1_024
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (floor - low) // workers
    block = range(low + worker * size, low + (worker + 1) * size)
    start = os.getpid() % len(block)  # two runs side by side start apart
    for i in itertools.count():
        yield block[(start + i) % len(block)]


_PORTS = _port_cursor()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on and no other test will be handed, never one of the machine's
    services. The caller binds it soon after; see ``_port_cursor`` for why this is race-free."""
    for port in _PORTS:
        if port in RESERVED_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise AssertionError("unreachable")


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (same guarantees as ``free_port``)."""
    while True:
        first = free_port(host)
        block = [first] + [next(_PORTS) for _ in range(count - 1)]
        if block != list(range(first, first + count)) or RESERVED_PORTS.intersection(block):
            continue  # wrapped around the worker's block, or crossed a reserved port
        try:
            for port in block:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return first


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class ServiceProcess:
    """A real service process with its output captured to a file for failure reports."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "LOG_FORMAT": "console", "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen(
            list(argv), env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class ProcessGroup:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[ServiceProcess] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> ServiceProcess:
        p = ServiceProcess(name, argv, env, self.log_dir)
        self.procs.append(p)
        return p

    def python(self, name: str, module: str, env: Mapping[str, str]) -> ServiceProcess:
        return self.start(name, [sys.executable, "-m", module], env)

    def dump(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-4000:]}" for p in self.procs)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            sys.stderr.write(group.dump())


class PrivateRedis:
    """A redis-server of the test's own on a free port, so a test may stop and restart it
    without touching the machine's shared Redis on 6379."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@dataclass
class ProxiedEchoBackend:
    """A module instance stand-in: reads the NLB's PROXY header, answers ``name|src|`` (src is
    the client address the header carried), then echoes everything until EOF."""

    name: str
    server: asyncio.Server | None = None
    port: int = 0
    seen: list[tuple[str, int]] = field(default_factory=list)
    first: list[bytes] = field(default_factory=list)
    open: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            buf = b""
            while True:
                got = parse(buf)
                if not isinstance(got, NeedData):
                    header, used = got
                    break
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += chunk
            assert header.source is not None
            src = header.source
            self.seen.append((str(src[0]), int(src[1])))
            rest = buf[used:]
            self.first.append(rest)
            writer.write(f"{self.name}|{src[0]}:{src[1]}|".encode())
            if rest:
                writer.write(rest)
            while chunk := await reader.read(1 << 18):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def start(self) -> ProxiedEchoBackend:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
