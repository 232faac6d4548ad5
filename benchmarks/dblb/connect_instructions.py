"""User-space instructions the DBLB spends per `pgbench -S -C` connection (callgrind).

Usage: uv run --frozen python benchmarks/dblb/connect_instructions.py [--connections 2000]
       [--clients 2] [--src DIR]
Starts the DBLB under ``valgrind --tool=callgrind`` with instrumentation off, warms it up,
switches instrumentation on for ``--connections`` pgbench transactions on a connection each
(SSLRequest, login, one SELECT, Terminate), then divides the instructions counted by the
connections. Unlike CPU time this barely moves on a busy machine (+-0.5 % from run to run), so
it shows changes of a few percent that bench_pgbench.py cannot. Kernel work (the syscalls) is
not counted: `strace -c -f -p PID` counts those. Few clients (default 2) keep the DBLB's
wake-ups close to one event each, as when the machine is not saturated; under valgrind more
clients batch more events per wake-up than a real run would. ``--src``: another
services/dblb/src (and marchproxy_common, if the directory holds one) ahead of the workspace's.
Needs the local Postgres on 127.0.0.1:5432 (trust), pgbench and valgrind. Never run in CI.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pgbench import PG, free_port, psql, stop, wait_port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--src", default="", help="a services/dblb/src to measure instead")
    args = ap.parse_args()
    db = f"mp_dblb_instr_{secrets.token_hex(4)}"
    psql(f"create database {db}")
    proc = None
    try:
        subprocess.run(["pgbench", *PG, "-i", "-s", "1", "-q", db], check=True, capture_output=True)
        with tempfile.TemporaryDirectory(prefix="mp-dblb-instr-") as t:
            tmp = Path(t)
            port = free_port()
            cfg = tmp / "dblb.yaml"
            cfg.write_text(
                "modules:\n  - name: dblb\n    config:\n      pool_mode: transaction\n"
                "      default_pool_size: 16\n      max_client_conn: 1000\n"
                f"      databases:\n        {db}: {{host: 127.0.0.1, port: 5432}}\n"
            )
            env = {
                **os.environ,
                "DATA_PORT": str(port),
                "REGISTER_WITH_NLB": "false",
                "PROXY_PROTOCOL": "off",
                "LOG_LEVEL": "WARNING",
                "CONFIG_FILE": str(cfg),
            }
            if args.src:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
            out = tmp / "callgrind.out"
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
            argv += [f"--callgrind-out-file={out}", sys.executable, "-m", "marchproxy_dblb"]
            proc = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            wait_port(port, proc, timeout=120)
            pgbench(port, db, 2, 40)  # warm up: the pool's servers, the caches
            control(proc.pid, "-i", "on")
            pgbench(port, db, args.clients, args.connections)
            control(proc.pid, "-d")
            control(proc.pid, "-i", "off")
            time.sleep(1)
            dumps = sorted(tmp.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
            total = next(
                int(line.split()[1])
                for line in dumps[-1].read_text().splitlines()
                if line.startswith("totals:")
            )
            print(
                f"{total / args.connections:,.0f} instructions per connection "
                f"({args.connections} connections, {args.clients} clients)"
            )
    finally:
        if proc is not None:
            stop(proc)
        psql(f"drop database if exists {db} with (force)")


def pgbench(port: int, db: str, clients: int, transactions: int) -> None:
    argv = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-S", "-n", "-C"]
    argv += ["-c", str(clients), "-j", str(min(clients, 2)), "-t", str(transactions // clients)]
    subprocess.run([*argv, db], check=True, capture_output=True, timeout=600)


def control(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, capture_output=True)


if __name__ == "__main__":
    main()
