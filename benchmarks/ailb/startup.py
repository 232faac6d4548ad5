"""Start-up time and idle RSS of ``python -m marchproxy_ailb``, several runs (no peers, no load).

    uv run --frozen python benchmarks/ailb/startup.py [--runs 5] [--python PATH] [--importtime N]

Each run spawns the AILB with the benchmark's config (one OpenAI deployment, one key, JSONL
usage log) in front of ``upstream.py`` and measures spawn -> first successful completion
(wall), the process's CPU seconds by then (steadier than wall time on a busy machine), and RSS
and PSS after one second idle. The first run compiles bytecode into a private cache
(``PYTHONPYCACHEPREFIX``), the others use it, as the image does; ``--no-bytecode`` compiles
every time instead (what PYTHONDONTWRITEBYTECODE over a venv without .pyc does). ``--python``
picks another interpreter, e.g. a production-like venv without dev dependencies:

    UV_PROJECT_ENVIRONMENT=/tmp/ailb-prod UV_COMPILE_BYTECODE=1 uv sync --frozen --no-dev \\
        --no-editable --package marchproxy-ailb \\
        --reinstall-package marchproxy-common --reinstall-package marchproxy-ailb
    uv run --frozen python benchmarks/ailb/startup.py --python /tmp/ailb-prod/bin/python

``--importtime N`` prints the N slowest top-level imports of the entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_ailb import (
    HERE,
    bytecode_env,
    cpu_seconds,
    free_port,
    rss_mib,
    start_ailb,
    stop,
    wait_ready,
)

ROOT = HERE.parent.parent


def pss_mib(pid: int) -> float:
    """Proportional set size: shared library pages count by the share this process uses."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def import_profile(python: str, env: dict[str, str], top: int) -> list[tuple[int, str]]:
    """(cumulative µs, module) of the slowest imports at depth 0 and 1 of the entry point."""
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", "import marchproxy_ailb.__main__"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[12:].split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 2:
            rows.append((int(cumulative), name.rstrip()))
    return sorted(rows, reverse=True)[:top]


async def one_run(
    tmp: Path, up_port: int, python: str, env: dict[str, str]
) -> tuple[float, float, float, float]:
    port = free_port()
    proc = start_ailb(tmp, up_port, port, python=python, base_env=env)
    try:
        wall = await wait_ready(f"http://127.0.0.1:{port}/v1/chat/completions", proc, 60)
        cpu = cpu_seconds(proc.pid)
        await asyncio.sleep(1.0)
        return wall, cpu, rss_mib(proc.pid), pss_mib(proc.pid)
    finally:
        stop(proc)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--no-bytecode", action="store_true")
    ap.add_argument("--importtime", type=int, default=0, metavar="N")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ailb-startup-"))
    env = dict(os.environ) if args.no_bytecode else bytecode_env(tmp / "pycache")
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "upstream.py"), str(up_port)], stdout=subprocess.DEVNULL
    )
    try:
        runs = []
        for i in range(args.runs):
            wall, cpu, rss, pss = await one_run(tmp, up_port, args.python, env)
            label = "compiles" if i == 0 or args.no_bytecode else "cached"
            print(
                f"run {i + 1} ({label}): start {wall:.2f} s wall, {cpu:.2f} s CPU, "
                f"idle RSS {rss:.1f} MiB, PSS {pss:.1f} MiB"
            )
            runs.append((wall, cpu, rss, pss))
        rest = runs if args.no_bytecode or len(runs) == 1 else runs[1:]
        walls, cpus, rsss, psss = zip(*rest, strict=True)
        print(
            f"median of {len(rest)}: start {statistics.median(walls):.2f} s wall, "
            f"{statistics.median(cpus):.2f} s CPU, idle RSS {statistics.median(rsss):.1f} MiB, "
            f"PSS {statistics.median(psss):.1f} MiB"
        )
    finally:
        stop(upstream)
    if args.importtime:
        for us, name in import_profile(args.python, env, args.importtime):
            print(f"{us / 1000:8.1f} ms  {name}")


if __name__ == "__main__":
    asyncio.run(main())
