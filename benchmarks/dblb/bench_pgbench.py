"""pgbench -S through the DBLB and through PgBouncer (both transaction mode), side by side.

Usage: uv run --frozen python benchmarks/dblb/bench_pgbench.py [--duration 15] [--pool-size 16]
Runs `pgbench -S -c 16 -j 2 -T <duration>` and the same with `-C` (a new connection per
transaction) against each pooler, then prints TPS, the DBLB/PgBouncer ratio and each pooler's
CPU time per transaction (utime + stime of its processes from /proc, in microseconds): on a
shared machine that is steadier than TPS. Needs the local Postgres on 127.0.0.1:5432 (trust)
and /usr/sbin/pgbouncer. Never run in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG = ["-h", "127.0.0.1", "-p", "5432", "-U", "postgres"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def psql(sql: str, db: str = "test") -> None:
    subprocess.run(["psql", *PG, db, "-qc", sql], check=True, capture_output=True)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` and its direct children (the DBLB's WORKERS), from /proc."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.exists():
            pids += [int(c) for c in children.read_text().split()]
    user = system = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        user += int(fields[11])  # utime, stime: fields 14 and 15 of proc(5)
        system += int(fields[12])
    return user / _CLOCK_TICKS, system / _CLOCK_TICKS


@dataclass
class Run:
    tps: float
    xacts: int
    user: float  # pooler CPU seconds during the run
    system: float

    @property
    def cpu_us_per_xact(self) -> float:
        return (self.user + self.system) / max(self.xacts, 1) * 1e6

    @property
    def sys_share(self) -> float:
        return self.system / max(self.user + self.system, 1e-9)


def measured(pid: int, port: int, db: str, args: argparse.Namespace, reconnect: bool) -> Run:
    user, system = cpu_seconds(pid)
    tps, xacts = pgbench(port, db, args.duration, args.clients, reconnect)
    user_after, system_after = cpu_seconds(pid)
    return Run(tps, xacts, user_after - user, system_after - system)


def pgbench(port: int, db: str, duration: int, clients: int, reconnect: bool) -> tuple[float, int]:
    argv = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-S", "-n"]
    argv += ["-c", str(clients), "-j", "2", "-T", str(duration)]
    if reconnect:
        argv.append("-C")
    out = subprocess.run([*argv, db], capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    m = re.search(r"tps = ([0-9.]+)", out.stdout)
    n = re.search(r"number of transactions actually processed: ([0-9]+)", out.stdout)
    if not m or not n:
        raise RuntimeError(out.stdout)
    return float(m.group(1)), int(n.group(1))


def start_dblb(tmp: Path, db: str, pool_size: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = tmp / "dblb.yaml"
    cfg.write_text(
        "modules:\n"
        "  - name: dblb\n"
        "    config:\n"
        "      pool_mode: transaction\n"
        f"      default_pool_size: {pool_size}\n"
        "      max_client_conn: 1000\n"
        "      databases:\n"
        f"        {db}: {{host: 127.0.0.1, port: 5432}}\n"
    )
    env = {
        **os.environ,
        "DATA_PORT": str(port),
        "REGISTER_WITH_NLB": "false",
        "PROXY_PROTOCOL": "off",
        "LOG_LEVEL": "WARNING",
        "CONFIG_FILE": str(cfg),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "marchproxy_dblb"], env=env, stdout=subprocess.DEVNULL
    )
    wait_port(port, proc)
    return proc, port


def start_pgbouncer(tmp: Path, db: str, pool_size: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    (tmp / "users.txt").write_text('"postgres" ""\n')
    ini = tmp / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"{db} = host=127.0.0.1 port=5432 dbname={db}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp / 'users.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 1000\n"
        f"logfile = {tmp / 'pgbouncer.log'}\npidfile = {tmp / 'pgbouncer.pid'}\n"
        "log_connections = 0\nlog_disconnections = 0\n"
    )
    shutil.chown(tmp, "nobody") if os.geteuid() == 0 else None
    for f in tmp.iterdir():
        if os.geteuid() == 0:
            shutil.chown(f, "nobody")
    argv = ["/usr/sbin/pgbouncer", str(ini)]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        argv = ["/usr/sbin/pgbouncer", "-u", "nobody", str(ini)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--pool-size", type=int, default=16)
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate DBLB/PgBouncer runs; report medians"
    )
    ap.add_argument("--no-reconnect", action="store_true", help="skip the -C runs")
    args = ap.parse_args()
    db = f"mp_dblb_bench_{secrets.token_hex(4)}"
    psql(f"create database {db}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(["pgbench", *PG, "-i", "-s", "1", "-q", db], check=True, capture_output=True)
        with tempfile.TemporaryDirectory(prefix="mp-dblb-bench-") as t:
            tmp = Path(t)
            os.chmod(tmp, 0o777)
            dblb, dblb_port = start_dblb(tmp, db, args.pool_size)
            procs.append(dblb)
            bouncer, bouncer_port = start_pgbouncer(tmp, db, args.pool_size)
            procs.append(bouncer)
            print(
                f"pgbench -S -c {args.clients} -j 2 -T {args.duration}, transaction mode, "
                f"pool size {args.pool_size}"
            )
            print(
                f"{'run':<28}{'DBLB tps':>10}{'PgB tps':>10}{'ratio':>7}"
                f"{'DBLB us/xact':>14}{'PgB us/xact':>13}{'sys%':>11}"
            )
            loop = os.environ.get("MARCHPROXY_LOOP", "asyncio")
            print(
                f"DBLB event loop: {loop}; {args.rounds} round(s), medians; us/xact is CPU "
                "(user + system), sys% its system share (DBLB/PgB)"
            )
            for reconnect in (False, True) if not args.no_reconnect else (False,):
                label = "-S -C (connect per xact)" if reconnect else "-S (persistent)"
                ours_runs: list[Run] = []
                theirs_runs: list[Run] = []
                for r in range(args.rounds):  # alternate who goes first: the box is shared
                    pair = [(dblb, dblb_port, ours_runs), (bouncer, bouncer_port, theirs_runs)]
                    for proc, port, runs in pair if r % 2 == 0 else reversed(pair):
                        runs.append(measured(proc.pid, port, db, args, reconnect))
                ours = statistics.median(x.tps for x in ours_runs)
                theirs = statistics.median(x.tps for x in theirs_runs)
                ours_cpu = statistics.median(x.cpu_us_per_xact for x in ours_runs)
                theirs_cpu = statistics.median(x.cpu_us_per_xact for x in theirs_runs)
                ours_sys = statistics.median(x.sys_share for x in ours_runs) * 100
                theirs_sys = statistics.median(x.sys_share for x in theirs_runs) * 100
                print(
                    f"{label:<28}{ours:>10.0f}{theirs:>10.0f}{ours / theirs:>7.2f}"
                    f"{ours_cpu:>14.1f}{theirs_cpu:>13.1f}{ours_sys:>6.0f}/{theirs_sys:<4.0f}",
                    flush=True,
                )
    finally:
        for proc in procs:
            stop(proc)
        psql(f"drop database if exists {db} with (force)")


if __name__ == "__main__":
    main()
