"""The NLB process vs HAProxy (mode tcp, one thread), side by side, to the same nginx.

    uv run --frozen python benchmarks/nlb/nlb_vs_haproxy.py [--seconds 5] [--rounds 2]

Both proxies send a PROXY v2 header to nginx (``listen ... proxy_protocol``), so they do the same
work. The NLB runs as a real ``marchproxy-nlb`` process that sniffs each connection (HTTP) and
routes it to an instance registered over gRPC. Measured through each, interleaved per round:
wrk keep-alive small requests (per-message cost), wrk with ``Connection: close`` (new
connections per second), p99 latency at 1,000 concurrent keep-alive connections, and RSS per idle
connection with 5,000 idle connections open. Prints medians and ratios (NLB / HAProxy).
Never run in CI; the machine is shared, so treat a single run as rough.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2

KEY = "bench-key"
IDLE_CONNECTIONS = 5_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


@contextlib.contextmanager
def process(argv: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nginx_conf(d: Path, port: int) -> Path:
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("hello from nginx\n")
    conf = d / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
    uwsgi_temp_path {d}; scgi_temp_path {d};
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} proxy_protocol backlog=4096;
        root {d}/www;
    }}
}}
"""
    )
    return conf


def haproxy_conf(d: Path, port: int, backend: int) -> Path:
    conf = d / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread 1
    maxconn 9000
    tune.bufsize 262144
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen bench
    bind 127.0.0.1:{port}
    server nginx 127.0.0.1:{backend} send-proxy-v2
"""
    )
    return conf


def wrk(port: int, seconds: int, conns: int, close: bool) -> tuple[float, float]:
    """Requests per second and p99 latency (ms)."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 60
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else 0.0
    return rps, p99


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_rss_per_conn(port: int, pid: int, n: int) -> float:
    """Bytes of proxy RSS per idle connection (each has sent one request and stays open)."""
    before = rss_kib(pid)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
            socks.append(s)
        for s in socks:
            s.recv(4096)
        time.sleep(1.0)
        return (rss_kib(pid) - before) * 1024 / n
    finally:
        for s in socks:
            s.close()


async def register(grpc_port: int, backend: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        await nlb_pb2_grpc.NLBServiceStub(ch).RegisterModule(
            nlb_pb2.RegisterModuleRequest(
                module_id="nginx",
                instance_id="nginx-1",
                module_type=types_pb2.MODULE_TYPE_ALB,
                protocols=[types_pb2.PROTOCOL_HTTP],
                data_address=types_pb2.Address(host="127.0.0.1", port=backend),
            ),
            metadata=(("x-cluster-api-key", KEY),),
            timeout=10,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required (Debian package)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 4 * IDLE_CONNECTIONS:
        raise SystemExit(f"need {4 * IDLE_CONNECTIONS} open files, the hard limit is {hard}")
    nginx_port, haproxy_port, nlb_port = free_port(), free_port(), free_port()
    grpc_port, admin_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        env = {
            **os.environ,
            "CLUSTER_API_KEY": KEY,
            "NLB_LISTENERS": f"{nlb_port}=http",
            "NLB_GRPC_PORT": str(grpc_port),
            "NLB_ADMIN_PORT": str(admin_port),
            "HEARTBEAT_TIMEOUT": "3600",
            "LOG_LEVEL": "WARNING",
            "MARCHPROXY_LOOP": args.loop,
        }
        with (
            process(["nginx", "-c", str(nginx_conf(d, nginx_port))]),
            process(["haproxy", "-f", str(haproxy_conf(d, haproxy_port, nginx_port))]) as hap,
            process([sys.executable, "-m", "marchproxy_nlb"], env=env) as nlb,
        ):
            for p in (nginx_port, haproxy_port, nlb_port, grpc_port):
                wait_port(p)
            asyncio.run(register(grpc_port, nginx_port))
            engines = {"nlb": (nlb_port, nlb.pid), "haproxy": (haproxy_port, hap.pid)}
            results: dict[str, dict[str, list[float]]] = {e: {} for e in engines}
            tests = {
                "keepalive_rps": lambda port: wrk(port, args.seconds, 50, False)[0],
                "close_rps": lambda port: wrk(port, args.seconds, 50, True)[0],
                "p99_ms_1000c": lambda port: wrk(port, args.seconds, 1000, False)[1],
            }
            for rnd in range(args.rounds):
                order = list(engines) if rnd % 2 == 0 else list(reversed(engines))
                for name, fn in tests.items():
                    for engine in order:
                        value = fn(engines[engine][0])
                        results[engine].setdefault(name, []).append(value)
                        print(f"round {rnd + 1} {name:14} {engine:8} {value:12.2f}", flush=True)
            for engine in engines:
                port, pid = engines[engine]
                per_conn = idle_rss_per_conn(port, pid, IDLE_CONNECTIONS)
                results[engine]["rss_bytes_per_idle_conn"] = [per_conn]
                print(f"rss per idle conn {engine:8} {per_conn:10.0f} B", flush=True)
    print(f"\nmedians (load average {os.getloadavg()[0]:.1f}):")
    print(f"{'metric':26} {'nlb':>12} {'haproxy':>12} {'nlb/haproxy':>12}")
    for name in results["nlb"]:
        ours = statistics.median(results["nlb"][name])
        peer = statistics.median(results["haproxy"][name])
        ratio = ours / peer if peer else float("nan")
        print(f"{name:26} {ours:12.2f} {peer:12.2f} {ratio:12.2f}")


if __name__ == "__main__":
    main()
