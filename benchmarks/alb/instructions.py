"""Instructions (callgrind Ir) or CPU time per request of the ALB for wrk keep-alive GETs
against the same nginx backend as run.py. Repeatable where req/s and CPU time are not.

    uv run --frozen python benchmarks/alb/instructions.py [callgrind|cpu] [--loop uvloop]
        [--src OTHER_CHECKOUT/services/alb/src]   # measure another version of the ALB
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BACKEND, NGINX_COMMON, start, stop, wait_port

from tests.conftest import free_port


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="callgrind", choices=["callgrind", "cpu"])
    ap.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    ap.add_argument("--src", default="", help="PYTHONPATH for another marchproxy_alb")
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="alb-instr-"))
    d.chmod(0o755)  # nginx workers run as nobody (see run.py)
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("hello from the backend\n" * 4)
    backend, port = free_port(), free_port()
    conf = d / "backend.conf"
    conf.write_text(NGINX_COMMON.format(d=d, name="be", body=BACKEND.format(port=backend, d=d)))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    procs = [start([nginx, "-c", str(conf), "-p", str(d)])]
    cfg = d / "alb.yaml"
    route = {"name": "bench", "match_rules": {}}
    route["backend_config"] = {"target": f"http://127.0.0.1:{backend}"}  # type: ignore[assignment]
    cfg.write_text(yaml.safe_dump({"version": 1, "routes": [route]}))
    out = d / "callgrind.out"
    argv = [sys.executable, "-m", "marchproxy_alb", "--config", str(cfg)]
    if args.mode == "callgrind":
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            *argv,
        ]
    env = {
        "DATA_PORT": str(port),
        "REGISTER_WITH_NLB": "false",
        "ALB_ACCESS_LOG": "false",
        "LOG_LEVEL": "WARNING",
        "MARCHPROXY_LOOP": args.loop,
        "PYTHONPATH": args.src,
    }
    alb = start(argv, env, d / "alb.log")
    procs.append(alb)
    url = f"http://127.0.0.1:{port}/index.html"
    wrk = ["wrk", "-t1", f"-c{args.connections}"]
    try:
        wait_port(backend)
        wait_port(port, 180)
        subprocess.run([*wrk, "-d2s", url], capture_output=True, check=True)  # warm-up
        if args.mode == "callgrind":
            subprocess.run(["callgrind_control", "-i", "on", str(alb.pid)], capture_output=True)
        before = cpu_ticks(alb.pid)
        res = subprocess.run([*wrk, f"-d{args.duration}s", url], capture_output=True, text=True)
        used = cpu_ticks(alb.pid)
        if "Non-2xx" in res.stdout or "Socket errors" in res.stdout:
            sys.exit(res.stdout)
        n = int(re.search(r"(\d+) requests in", res.stdout).group(1))  # type: ignore[union-attr]
        if args.mode == "cpu":
            tick = os.sysconf("SC_CLK_TCK")
            user, sys_ = ((b - a) / tick * 1e6 / n for a, b in zip(before, used, strict=True))
            print(f"{n} requests, {n / args.duration:.0f} req/s")
            print(f"CPU per request: user {user:.1f} µs + sys {sys_:.1f} µs")
            return
        subprocess.run(["callgrind_control", "-i", "off", str(alb.pid)], capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(alb.pid)], capture_output=True)
        time.sleep(1)
        total = 0
        for f in d.glob("callgrind.out*"):
            for line in f.read_text(errors="replace").splitlines():
                if line.startswith(("totals:", "summary:")):
                    total = max(total, int(line.split()[1]))
        print(f"{n} requests, {total / n:.0f} instructions per request")
    finally:
        stop(procs)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
