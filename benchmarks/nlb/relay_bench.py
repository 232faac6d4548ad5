"""Relay engines vs HAProxy (mode tcp, one thread, tune.bufsize 262144), side by side.

    uv run --frozen python benchmarks/nlb/relay_bench.py [--seconds 3] [--rounds 1] [--uvloop]
        [--splice] [--fd]

Measures through each proxy: iperf3 bulk (client->server and -R), wrk keep-alive small
requests to nginx (per-message cost) and wrk with ``Connection: close`` (new connections/s).
Prints each number and the ratio to HAProxy. Never run in CI; the machine is shared, so treat
single runs as rough.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from tests.conftest import free_port as free_port  # re-exported; below the ephemeral range

HERE = Path(__file__).resolve().parent


def listening(port: int) -> bool:
    """Check /proc/net/tcp for a LISTEN socket: a probe connection would confuse iperf3 -s."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_port(port: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


@contextlib.contextmanager
def proc(args: list[str], port: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            if port is not None:
                try:
                    wait_port(port)
                except RuntimeError:
                    err.seek(0)
                    msg = err.read().decode(errors="replace")[-500:]
                    raise RuntimeError(f"{args[0]} did not start: {msg}") from None
            yield p
        finally:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            err.seek(0)
            tail = err.read().decode(errors="replace")[-300:]
            if tail.strip() and "--verbose" in sys.argv:
                print(f"  [{args[0]} stderr] {tail}", file=sys.stderr)


def iperf(port: int, seconds: float, reverse: bool) -> float:
    args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(int(seconds)), "-J"]
    if reverse:
        args.append("-R")
    out = subprocess.run(args, capture_output=True, timeout=seconds + 30).stdout
    doc = json.loads(out)
    if "error" in doc:
        print(f"  iperf3 through :{port} failed: {doc['error']}", file=sys.stderr)
        return 0.0
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


def wrk(port: int, seconds: float, close: bool) -> float:
    args = ["wrk", "-t1", "-c50", f"-d{int(seconds)}s", f"http://127.0.0.1:{port}/"]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(args, capture_output=True, timeout=seconds + 30, check=True).stdout
    m = re.search(rb"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else 0.0


HAPROXY_CFG = """global
  nbthread 1
  tune.bufsize 262144
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen l
  bind 127.0.0.1:{port}
  server s 127.0.0.1:{target}
"""


def measure(name: str, extra: list[str], nginx_port: int, secs: int, tmp: Path) -> dict[str, float]:
    res: dict[str, float] = {}
    for label in ("bulk", "http"):
        port = free_port()
        iperf_port = free_port()
        target = iperf_port if label == "bulk" else nginx_port
        if name == "haproxy":
            cfg = tmp / f"haproxy-{port}.cfg"
            cfg.write_text(HAPROXY_CFG.format(port=port, target=target))
            cmd = ["haproxy", "-f", str(cfg), "-db"]
        else:
            cmd = [sys.executable, str(HERE / "relay_proxy.py"), str(port), str(target), *extra]
        # a fresh iperf3 server each time: a half-finished test leaves one "busy"
        iperf_cmd = ["iperf3", "-s", "-p", str(iperf_port)]
        with proc(iperf_cmd, iperf_port), proc(cmd, port):
            if label == "bulk":
                res["bulk_gbps"] = iperf(port, secs, reverse=False)
                res["bulk_rev_gbps"] = iperf(port, secs, reverse=True)
            else:
                res["keepalive_rps"] = wrk(port, secs, close=False)
                res["close_rps"] = wrk(port, secs, close=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="alternate engines; report medians")
    ap.add_argument("--uvloop", action="store_true", help="also run the relay on uvloop")
    ap.add_argument("--splice", action="store_true", help="also run the os.splice prototype")
    ap.add_argument("--fd", action="store_true", help="also run the fd relay engine (the NLB's)")
    ap.add_argument("--verbose", action="store_true", help="print the proxies' stderr")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    nginx_port = free_port()
    nginx_conf = tmp / "nginx.conf"
    nginx_conf.write_text(
        f"""daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{nginx_port}; location / {{ return 200 "ok"; }} }} }}
"""
    )
    engines: list[tuple[str, list[str]]] = [("haproxy", []), ("relay", ["--engine", "relay"])]
    if a.uvloop:
        engines.append(("relay-uvloop", ["--engine", "relay", "--loop", "uvloop"]))
    if a.splice:
        engines.append(("splice", ["--engine", "splice"]))
    if a.fd:
        engines.append(("fd", ["--engine", "fd"]))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in engines}
    with proc(["nginx", "-c", str(nginx_conf), "-p", str(tmp)], nginx_port):
        for r in range(a.rounds):
            for name, extra in engines:
                res = measure(name, extra, nginx_port, a.seconds, tmp)
                runs[name].append(res)
                print(f"round {r + 1} {name:13s} {json.dumps(res)}", flush=True)
    results = {
        name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()
    }
    base = results["haproxy"]
    print("\nmedians:")
    for name, res in results.items():
        print(f"  {name:14s} {json.dumps({k: round(v, 2) for k, v in res.items()})}")
    print("ratio to haproxy (higher is better):")
    for name, res in results.items():
        if name == "haproxy":
            continue
        ratios = {k: round(v / base[k], 2) if base[k] else 0.0 for k, v in res.items()}
        print(f"  {name:14s} {json.dumps(ratios)}")
    print(f"(cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
