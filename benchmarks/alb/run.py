"""wrk keep-alive req/s and p99 through the ALB vs nginx proxy_pass (1 worker) and HAProxy
mode http (1 thread), all in front of the same nginx static-file backend.

    uv run --frozen python benchmarks/alb/run.py [--duration 4] [--rounds 3] [--connections 50]
        [--proxies nginx,haproxy,alb]
        [--loop asyncio|uvloop]

Never run in CI. Prints one line per proxy and the ratios ALB/nginx and ALB/HAProxy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from tests.conftest import free_port  # below the ephemeral range: no port races


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """SIGTERM each process group, then SIGKILL what has not exited after ``timeout``."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


NGINX_COMMON = """
worker_processes 1;
daemon off;
error_log {d}/error-{name}.log warn;
pid {d}/nginx-{name}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body-{name};
  proxy_temp_path {d}/proxy-{name};
  fastcgi_temp_path {d}/fcgi-{name};
  uwsgi_temp_path {d}/uwsgi-{name};
  scgi_temp_path {d}/scgi-{name};
  keepalive_requests 1000000;
  {body}
}}
"""

BACKEND = """server {{ listen 127.0.0.1:{port}; root {d}/www; location / {{ }} }}"""

NGINX_PROXY = """
  upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://be; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }} }}
"""

HAPROXY = """
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{backend}
"""


def start(
    argv: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every process in process group ``pgid`` (a proxy and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ...
            total += int(fields[11]) + int(fields[12])
    return total / tick


def wrk(url: str, duration: int, connections: int) -> tuple[float, float, str]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"{url}: not every request got a 2xx/3xx answer\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert m, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return rps, float(m.group(1)) * scale, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    ap.add_argument(
        "--src",
        default="",
        help="PYTHONPATH for the ALB: .native/alb for the compiled build (make native)",
    )
    ap.add_argument(
        "--proxies",
        default="nginx,haproxy,alb",
        help="comma-separated subset of nginx,haproxy,alb (e.g. alb alone while profiling)",
    )
    args = ap.parse_args()
    wanted = [p for p in args.proxies.split(",") if p]
    if not set(wanted) <= {"nginx", "haproxy", "alb"} or not wanted:
        sys.exit("--proxies takes a subset of nginx,haproxy,alb")
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} not found")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    d = Path(tempfile.mkdtemp(prefix="alb-bench-"))
    # mkdtemp makes the directory 0700: an nginx started as root serves from worker processes
    # running as nobody, which would answer every request with 403 Forbidden
    d.chmod(0o755)
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("hello from the backend\n" * 4)
    backend, p_nginx, p_haproxy, p_alb = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        conf = d / "backend.conf"
        conf.write_text(NGINX_COMMON.format(d=d, name="be", body=BACKEND.format(port=backend, d=d)))
        procs.append(start([nginx, "-c", str(conf), "-p", str(d)], log=d / "nginx-be.out.log"))
        conf = d / "proxy.conf"
        conf.write_text(
            NGINX_COMMON.format(
                d=d, name="px", body=NGINX_PROXY.format(port=p_nginx, backend=backend)
            )
        )
        procs.append(start([nginx, "-c", str(conf), "-p", str(d)], log=d / "nginx-px.out.log"))
        conf = d / "haproxy.cfg"
        conf.write_text(HAPROXY.format(port=p_haproxy, backend=backend))
        procs.append(start([haproxy, "-db", "-f", str(conf)], log=d / "haproxy.log"))
        cfg = d / "alb.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "routes": [
                        {
                            "name": "bench",
                            "match_rules": {},
                            "backend_config": {"target": f"http://127.0.0.1:{backend}"},
                        }
                    ],
                }
            )
        )
        procs.append(
            start(
                [sys.executable, "-m", "marchproxy_alb", "--config", str(cfg)],
                {
                    "DATA_PORT": str(p_alb),
                    "REGISTER_WITH_NLB": "false",
                    "ALB_ACCESS_LOG": "false",
                    "LOG_LEVEL": "WARNING",
                    "MARCHPROXY_LOOP": args.loop,
                    "PYTHONPATH": args.src,
                },
                d / "alb.log",
            )
        )
        for p in (backend, p_nginx, p_haproxy, p_alb):
            try:
                wait_port(p)
            except RuntimeError:
                print("port", p, "backend/nginx/haproxy/alb:", backend, p_nginx, p_haproxy, p_alb)
                for f in d.glob("*.log"):
                    print(f, f.read_text()[-2000:], file=sys.stderr)
                raise
        targets = {
            name: port
            for name, port in (("nginx", p_nginx), ("haproxy", p_haproxy), ("alb", p_alb))
            if name in wanted
        }
        for port in (backend, *targets.values()):
            wrk(f"http://127.0.0.1:{port}/index.html", 1, args.connections)  # warm-up
        rps, p99, _ = wrk(f"http://127.0.0.1:{backend}/index.html", args.duration, args.connections)
        print(f"{'backend':8s} {rps:10.0f} req/s   p99 {p99:8.2f} ms (direct, for reference)")
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        cpu: dict[str, list[float]] = {name: [] for name in targets}  # µs of CPU per request
        pgids = dict(zip(("nginx", "haproxy", "alb"), (p.pid for p in procs[1:]), strict=True))
        # interleaved rounds, medians: this machine is shared, so single runs are noisy
        for _ in range(args.rounds):
            for name, port in targets.items():
                url = f"http://127.0.0.1:{port}/index.html"
                before = group_cpu_seconds(pgids[name])
                rps, p99, _ = wrk(url, args.duration, args.connections)
                used = group_cpu_seconds(pgids[name]) - before
                runs[name].append((rps, p99))
                cpu[name].append(used * 1e6 / max(1.0, rps * args.duration))
        results = {}
        for name, rs in runs.items():
            rps = statistics.median(r[0] for r in rs)
            p99 = statistics.median(r[1] for r in rs)
            results[name] = (rps, p99)
            each = ", ".join(f"{r[0]:.0f}" for r in rs)
            us = statistics.median(cpu[name])
            print(
                f"{name:8s} {rps:10.0f} req/s   p99 {p99:8.2f} ms   {us:5.1f} µs CPU/req"
                f"   (runs: {each})",
                flush=True,
            )
        alb_rps, alb_p99 = results.get("alb", (0.0, 0.0))
        for peer in ("nginx", "haproxy"):
            if peer not in results or "alb" not in results:
                continue
            rps, p99 = results[peer]
            print(
                f"alb/{peer}: req/s x{alb_rps / rps:.2f}   p99 x{alb_p99 / p99:.2f}"
                f"   (goal vs nginx: >= 0.5x req/s, <= 2x p99)"
            )
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"ALB interpreter: {sys.executable} (Python {sys.version.split()[0]})")
    finally:
        stop(procs)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
