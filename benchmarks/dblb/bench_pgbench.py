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


def start_dblb(
    tmp: Path, db: str, pool_size: int, src: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """The DBLB of this tree, or (``src``: a services/dblb/src directory) another version."""
    port = free_port()
    cfg = tmp / f"dblb-{port}.yaml"
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
    if src:  # ahead of the workspace's editable install
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
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


def start_floor() -> tuple[subprocess.Popen[bytes], int]:
    """relay_floor.py: asyncio and the send/recv calls alone, no pooling (one server each)."""
    port = free_port()
    script = Path(__file__).with_name("relay_floor.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL)
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


def report(label: str, results: dict[str, list[Run]]) -> None:
    """One row per pooler: medians over the rounds, TPS relative to PgBouncer's."""
    pgb = statistics.median(x.tps for x in results["PgBouncer"])
    for i, (name, runs) in enumerate(results.items()):
        tps = statistics.median(x.tps for x in runs)
        cpu = statistics.median(x.cpu_us_per_xact for x in runs)
        sys_share = statistics.median(x.sys_share for x in runs) * 100
        print(
            f"{label if i == 0 else '':<26}{name:<12}{tps:>9.0f}{cpu:>10.1f}{sys_share:>7.0f}"
            f"{tps / pgb:>10.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--pool-size", type=int, default=16)
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate the poolers' runs; report medians"
    )
    ap.add_argument("--no-reconnect", action="store_true", help="skip the -C runs")
    ap.add_argument(
        "--baseline",
        default="",
        help="services/dblb/src of another version (e.g. unpacked from git archive; may also "
        "hold that version's marchproxy_common), run side by side as 'DBLB base'",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run relay_floor.py (a do-nothing asyncio relay, no pooling) as 'floor'",
    )
    args = ap.parse_args()
    db = f"mp_dblb_bench_{secrets.token_hex(4)}"
    psql(f"create database {db}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(["pgbench", *PG, "-i", "-s", "1", "-q", db], check=True, capture_output=True)
        with tempfile.TemporaryDirectory(prefix="mp-dblb-bench-") as t:
            tmp = Path(t)
            os.chmod(tmp, 0o777)
            poolers = {"DBLB": start_dblb(tmp, db, args.pool_size)}
            poolers["PgBouncer"] = start_pgbouncer(tmp, db, args.pool_size)
            if args.baseline:
                poolers["DBLB base"] = start_dblb(tmp, db, args.pool_size, args.baseline)
            if args.floor:
                poolers["floor"] = start_floor()
            procs += [proc for proc, _ in poolers.values()]
            loop = os.environ.get("MARCHPROXY_LOOP", "asyncio")
            print(
                f"pgbench -S -c {args.clients} -j 2 -T {args.duration}, transaction mode, "
                f"pool size {args.pool_size}; DBLB event loop: {loop}; interpreter: "
                f"{sys.executable} (Python {sys.version.split()[0]})\n"
                f"{args.rounds} round(s), medians; us/xact: pooler CPU (user + system) per "
                "transaction, sys%: its system share"
            )
            print(f"{'run':<26}{'pooler':<12}{'tps':>9}{'us/xact':>10}{'sys%':>7}{'tps/PgB':>10}")
            for reconnect in (False, True) if not args.no_reconnect else (False,):
                label = "-S -C (connect per xact)" if reconnect else "-S (persistent)"
                # the floor opens a server connection per client: no pooler for -C
                names = [n for n in poolers if not (reconnect and n == "floor")]
                results: dict[str, list[Run]] = {name: [] for name in names}
                for r in range(args.rounds):  # rotate who goes first: the box is shared
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        proc, port = poolers[name]
                        results[name].append(measured(proc.pid, port, db, args, reconnect))
                report(label, results)
    finally:
        for proc in procs:
            stop(proc)
        psql(f"drop database if exists {db} with (force)")


if __name__ == "__main__":
    main()
