"""The NLB process vs HAProxy (mode tcp, one thread), side by side.

    uv run --frozen python benchmarks/nlb/nlb_vs_haproxy.py [--seconds 5] [--rounds 2] [--idle N]
    uv run --frozen python benchmarks/nlb/nlb_vs_haproxy.py --quick   # does it run? 2 s, 500 idle
    uv run --frozen python benchmarks/nlb/nlb_vs_haproxy.py --haproxy-splice  # HAProxy splicing too
    uv run --frozen python benchmarks/nlb/nlb_vs_haproxy.py --only bulk_gbps,bulk_reverse_gbps
    uv run --frozen python benchmarks/nlb/nlb_vs_haproxy.py --haproxy-bufsize 1048576

Measured through each, interleaved per round:

- iperf3 bulk, both directions, to an iperf3 server: the NLB on a passthrough listener
  (``proxy_protocol=none``), HAProxy with no ``send-proxy`` (iperf3 speaks no PROXY protocol),
  ``tune.bufsize 262144`` (``--haproxy-bufsize``);
- wrk keep-alive small requests to nginx (per-message cost), wrk with ``Connection: close``
  (new connections per second) and p99 latency at 1,000 concurrent keep-alive connections.
  Here both proxies send a PROXY v2 header to nginx (``listen ... proxy_protocol``), so they do
  the same work; the NLB sniffs each connection (HTTP) and routes it to an instance registered
  over gRPC;
- RSS per idle connection with ``--idle`` (10,000) connections open, each after one request.
  Every proxied connection holds two descriptors, so RLIMIT_NOFILE is raised to its hard limit
  and the count is lowered (and said so) if the hard limit cannot hold them; HAProxy's maxconn
  is set to fit.

Prints medians and ratios (NLB / HAProxy). Never run in CI; the machine is shared, so treat a
single run as rough.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
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
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from tests.conftest import free_port  # below the ephemeral range: no port races

KEY = "bench-key"
IDLE_CONNECTIONS = 10_000
FD_MARGIN = 400  # descriptors a proxy needs besides two per connection
IDLE_BATCH = 100  # idle connections opened at a time


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


def nginx_conf(d: Path, port: int, max_conns: int) -> Path:
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("hello from nginx\n")
    conf = d / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
worker_rlimit_nofile {max_conns + 1000};
events {{ worker_connections {max_conns + 1000}; }}
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


def haproxy_conf(
    d: Path,
    port: int,
    backend: int,
    bulk_port: int,
    iperf: int,
    maxconn: int,
    splice: bool,
    bufsize: int,
) -> Path:
    conf = d / "haproxy.cfg"
    splice_line = "\n    option splice-auto" if splice else ""
    # pipes count against the descriptor limit (maxconn/4 by default): the bulk test needs few
    pipes_line = "\n    maxpipes 16" if splice else ""
    conf.write_text(
        f"""global
    nbthread 1
    maxconn {maxconn}{pipes_line}
    tune.bufsize {bufsize}
defaults
    mode tcp{splice_line}
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen bench
    bind 127.0.0.1:{port}
    server nginx 127.0.0.1:{backend} send-proxy-v2 maxconn {maxconn}
listen bulk
    bind 127.0.0.1:{bulk_port}
    server iperf 127.0.0.1:{iperf}
"""
    )
    return conf


def iperf3(port: int, seconds: int, reverse: bool) -> float:
    """Gbit/s received, one TCP stream (``-R``: server to client)."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    try:
        report = json.loads(out.stdout)
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"iperf3 through port {port} failed: {out.stdout[-500:]}") from exc


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
    # no latency distribution (too few requests completed): say so rather than report 0
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else math.nan
    return rps, p99


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_rss_per_conn(port: int, pid: int, n: int) -> float:
    """Bytes of proxy RSS per idle connection (each has sent one request and stays open)."""
    for _ in range(20):  # warm up: first-connection allocations are not per connection
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
            s.recv(4096)
    time.sleep(0.5)
    before = rss_kib(pid)
    socks: list[socket.socket] = []
    try:
        # in batches, each answered before the next opens: this measures idle connections,
        # not how a proxy copes with a burst of thousands of connects at once
        while len(socks) < n:
            batch = []
            for _ in range(min(IDLE_BATCH, n - len(socks))):
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
                batch.append(s)
                socks.append(s)
            for s in batch:
                s.recv(4096)
        time.sleep(1.0)
        return (rss_kib(pid) - before) * 1024 / n
    finally:
        for s in socks:
            s.close()


async def register(grpc_port: int, backend: int, iperf: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = nlb_pb2_grpc.NLBServiceStub(ch)
        for module_id, module_type, protocol, port in (
            ("nginx", types_pb2.MODULE_TYPE_ALB, types_pb2.PROTOCOL_HTTP, backend),
            ("iperf", types_pb2.MODULE_TYPE_L3_NETWORK, types_pb2.PROTOCOL_TCP, iperf),
        ):
            await stub.RegisterModule(
                nlb_pb2.RegisterModuleRequest(
                    module_id=module_id,
                    instance_id=f"{module_id}-1",
                    module_type=module_type,
                    protocols=[protocol],
                    data_address=types_pb2.Address(host="127.0.0.1", port=port),
                ),
                metadata=(("x-cluster-api-key", KEY),),
                timeout=10,
            )


def idle_budget(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it); the idle connections it
    allows: each costs a proxy two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return wanted
    fits = max(0, (limit - FD_MARGIN) // 2)
    if fits < wanted:
        print(
            f"note: RLIMIT_NOFILE hard limit is {hard}; a proxy needs two descriptors per "
            f"connection, so the idle test uses {fits} connections, not {wanted}",
            flush=True,
        )
    return min(wanted, fits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", type=int, default=IDLE_CONNECTIONS)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument(
        "--quick", action="store_true", help="check that it runs: 2 s, one round, 500 idle"
    )
    parser.add_argument(
        "--haproxy-splice",
        action="store_true",
        help="HAProxy with option splice-auto",
    )
    parser.add_argument(
        "--haproxy-bufsize",
        type=int,
        default=262144,
        help="HAProxy's tune.bufsize (the issue's setting; the NLB's bulk buffer is 1 MiB)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated metrics to measure (default all): rss_bytes_per_idle_conn, "
        "bulk_gbps, bulk_reverse_gbps, keepalive_rps, close_rps, p99_ms_1000c",
    )
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    if args.quick:
        args.seconds, args.rounds, args.idle = 2, 1, 500
    for tool in ("nginx", "haproxy", "wrk", "iperf3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required (Debian package)")
    idle = idle_budget(args.idle)
    nginx_port, haproxy_port, nlb_port = free_port(), free_port(), free_port()
    iperf_port, haproxy_bulk, nlb_bulk = free_port(), free_port(), free_port()
    grpc_port, admin_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        env = {
            **os.environ,
            "CLUSTER_API_KEY": KEY,
            "NLB_LISTENERS": f"{nlb_port}=http;{nlb_bulk}=tcp?proxy_protocol=none",
            "NLB_GRPC_PORT": str(grpc_port),
            "NLB_ADMIN_PORT": str(admin_port),
            "HEARTBEAT_TIMEOUT": "3600",
            "LOG_LEVEL": "WARNING",
            "MARCHPROXY_LOOP": args.loop,
        }
        hap_conf = haproxy_conf(
            d,
            haproxy_port,
            nginx_port,
            haproxy_bulk,
            iperf_port,
            maxconn=idle + 100,
            splice=args.haproxy_splice,
            bufsize=args.haproxy_bufsize,
        )
        with (
            process(["nginx", "-c", str(nginx_conf(d, nginx_port, idle))]),
            process(["iperf3", "-s", "-p", str(iperf_port)]),
            process(["haproxy", "-f", str(hap_conf)]) as hap,
            process([sys.executable, "-m", "marchproxy_nlb"], env=env) as nlb,
        ):
            for p in (nginx_port, iperf_port, haproxy_port, nlb_port, grpc_port):
                wait_port(p)
            asyncio.run(register(grpc_port, nginx_port, iperf_port))
            engines = {
                "nlb": (nlb_port, nlb_bulk, nlb.pid),
                "haproxy": (haproxy_port, haproxy_bulk, hap.pid),
            }
            results: dict[str, dict[str, list[float]]] = {e: {} for e in engines}
            # first, while both processes are fresh: later runs leave freed memory behind
            # (Python's arenas, HAProxy's pools) that idle connections would reuse unseen
            for engine in engines if not only or "rss_bytes_per_idle_conn" in only else ():
                port, _, pid = engines[engine]
                per_conn = idle_rss_per_conn(port, pid, idle)
                results[engine]["rss_bytes_per_idle_conn"] = [per_conn]
                print(f"rss per idle conn ({idle}) {engine:8} {per_conn:10.0f} B", flush=True)
            tests: dict[str, Callable[[str], float]] = {
                "bulk_gbps": lambda e: iperf3(engines[e][1], args.seconds, False),
                "bulk_reverse_gbps": lambda e: iperf3(engines[e][1], args.seconds, True),
                "keepalive_rps": lambda e: wrk(engines[e][0], args.seconds, 50, False)[0],
                "close_rps": lambda e: wrk(engines[e][0], args.seconds, 50, True)[0],
                "p99_ms_1000c": lambda e: wrk(engines[e][0], args.seconds, 1000, False)[1],
            }
            unknown = only - set(tests) - {"rss_bytes_per_idle_conn"}
            if unknown:
                raise SystemExit(f"unknown metrics: {', '.join(sorted(unknown))}")
            tests = {k: v for k, v in tests.items() if not only or k in only}
            for rnd in range(args.rounds):
                order = list(engines) if rnd % 2 == 0 else list(reversed(engines))
                for name, fn in tests.items():
                    for engine in order:
                        value = fn(engine)
                        results[engine].setdefault(name, []).append(value)
                        print(f"round {rnd + 1} {name:18} {engine:8} {value:12.2f}", flush=True)
    print(f"\nmedians (load average {os.getloadavg()[0]:.1f}):")
    print(f"{'metric':26} {'nlb':>12} {'haproxy':>12} {'nlb/haproxy':>12}")
    for name in results["nlb"]:
        ours = statistics.median(results["nlb"][name])
        peer = statistics.median(results["haproxy"][name])
        ratio = ours / peer if peer else float("nan")
        print(f"{name:26} {ours:12.2f} {peer:12.2f} {ratio:12.2f}")


if __name__ == "__main__":
    main()
