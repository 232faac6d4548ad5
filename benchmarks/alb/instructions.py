"""Instructions (callgrind Ir) or CPU time per request of the ALB for wrk keep-alive GETs
against the same nginx backend as run.py. Repeatable where req/s and CPU time are not.
``profile`` runs the ALB under cProfile instead and prints the functions with the most own time,
with their calls per request (cProfile's overhead inflates small calls: read it for counts);
``syscalls`` counts the ALB's system calls per request (``perf stat`` on syscall tracepoints,
which needs root or perf_event_paranoid <= 1).

    uv run --frozen python benchmarks/alb/instructions.py [callgrind|cpu|profile|syscalls]
        [--loop uvloop]
        [--src OTHER_CHECKOUT/services/alb/src]   # measure another version of the ALB
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import shutil
import signal
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

SYSCALL_EVENTS = [
    "raw_syscalls:sys_enter",
    *(
        f"syscalls:sys_enter_{name}"
        for name in ("sendto", "recvfrom", "epoll_wait", "epoll_ctl", "write", "read", "getpid")
    ),
]


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def main() -> None:
    ap = argparse.ArgumentParser()
    modes = ["callgrind", "cpu", "profile", "syscalls"]
    ap.add_argument("mode", nargs="?", default="callgrind", choices=modes)
    ap.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    ap.add_argument("--src", default="", help="PYTHONPATH for another marchproxy_alb")
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--keep", default="", help="callgrind: copy the callgrind output here")
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
    route: dict[str, object] = {"name": "bench", "match_rules": {}}
    route["backend_config"] = {"target": f"http://127.0.0.1:{backend}"}
    cfg.write_text(yaml.safe_dump({"version": 1, "routes": [route]}))
    out = d / "callgrind.out"
    argv = [sys.executable, "-m", "marchproxy_alb", "--config", str(cfg)]
    if args.mode == "profile":
        argv[1:1] = ["-m", "cProfile", "-o", str(d / "profile.out")]
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
        warm = subprocess.run([*wrk, "-d2s", url], capture_output=True, check=True, text=True)
        if args.mode == "callgrind":
            subprocess.run(["callgrind_control", "-i", "on", str(alb.pid)], capture_output=True)
        perf = None
        if args.mode == "syscalls":
            events = ",".join(SYSCALL_EVENTS)
            perf_out = str(d / "perf.txt")
            perf = subprocess.Popen(
                ["perf", "stat", "-x,", "-o", perf_out, "-p", str(alb.pid), "-e", events]
            )
            time.sleep(0.5)
        before = cpu_ticks(alb.pid)
        res = subprocess.run([*wrk, f"-d{args.duration}s", url], capture_output=True, text=True)
        used = cpu_ticks(alb.pid)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        if "Non-2xx" in res.stdout or "Socket errors" in res.stdout:
            sys.exit(res.stdout)
        n = int(re.search(r"(\d+) requests in", res.stdout).group(1))  # type: ignore[union-attr]
        if args.mode == "syscalls":
            print(f"{n} requests; system calls per request:")
            for line in (d / "perf.txt").read_text().splitlines():
                fields = line.split(",")
                if len(fields) > 2 and fields[0].isdigit():
                    name = fields[2].removeprefix("syscalls:sys_enter_")
                    print(f"{int(fields[0]) / n:8.3f}  {name.replace('raw_syscalls:', 'all ')}")
            return
        if args.mode == "profile":
            n += int(re.search(r"(\d+) requests in", warm.stdout).group(1))  # type: ignore[union-attr]
            stop(procs[1:])  # the profile is written as the ALB exits
            procs[1:] = []
            stats = pstats.Stats(str(d / "profile.out"))
            print(f"{n} requests (warm-up included); calls and own µs per request:")
            rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
            for (file, line, func), (_, calls, tottime, *_) in rows[:45]:
                where = f"{Path(file).name}:{line}" if line else file
                print(f"{calls / n:7.2f} {tottime / n * 1e6:7.2f}  {func} ({where})")
            return
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
        if args.keep:
            for f in d.glob("callgrind.out*"):
                shutil.copy(f, args.keep)
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
