"""Start-up time and idle RSS of ``python -m marchproxy_ailb``, several runs (no peers, no load).

    uv run --frozen python benchmarks/ailb/startup.py [--runs 5] [--python PATH] [--importtime N]

Each run spawns the AILB with the benchmark's config (one OpenAI deployment, one key, JSONL
usage log) in front of ``upstream.py``, waits for ``/readyz``, measures RSS after one second
idle ("before any request"), sends the first completion, and measures RSS again after one
more second idle ("after one request": what a first request imports or builds counts).
Start-up is spawn -> ready plus the first answer's latency (as spawn -> first successful
completion was measured before), with the process's CPU seconds by then (steadier than wall
time on a busy machine). The first run compiles bytecode into a private cache
(``PYTHONPYCACHEPREFIX``), the others use it, as the image does; ``--no-bytecode`` compiles
every time instead (what PYTHONDONTWRITEBYTECODE over a venv without .pyc does). Every run gets
the image's interpreter and OpenSSL ENV (``services/ailb/Dockerfile``: PYTHONNODEBUGRANGES,
SSL_CERT_FILE/SSL_CERT_DIR; ``--no-image-env`` leaves them out). ``--python`` picks another
interpreter, e.g. a production-like venv without dev dependencies:

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
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from bench_ailb import (
    HERE,
    bytecode_env,
    cpu_seconds,
    free_port,
    image_env,
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


async def wait_admin_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until ``url`` (the admin /readyz) answers 200."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.01)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@dataclass
class Run:
    start: float  # spawn -> ready, plus the first completion's latency
    cpu: float  # CPU seconds by the first answer
    rss_idle: float  # ready and idle, before any request
    rss_one: float  # idle after one completion
    pss_one: float


async def one_run(tmp: Path, up_port: int, python: str, env: dict[str, str]) -> Run:
    port, admin = free_port(), free_port()
    proc = start_ailb(tmp, up_port, port, python=python, base_env=env, admin_port=admin)
    try:
        ready = await wait_admin_ready(f"http://127.0.0.1:{admin}/readyz", proc, 60)
        await asyncio.sleep(1.0)
        rss_idle = rss_mib(proc.pid)
        first = await wait_ready(f"http://127.0.0.1:{port}/v1/chat/completions", proc, 60)
        cpu = cpu_seconds(proc.pid)
        await asyncio.sleep(1.0)
        return Run(ready + first, cpu, rss_idle, rss_mib(proc.pid), pss_mib(proc.pid))
    finally:
        stop(proc)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--no-bytecode", action="store_true")
    ap.add_argument("--no-image-env", action="store_true", help="without the image's ENV")
    ap.add_argument("--importtime", type=int, default=0, metavar="N")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ailb-startup-"))
    image = not args.no_image_env
    if args.no_bytecode:
        env = dict(os.environ) | (image_env() if image else {})
    else:
        env = bytecode_env(tmp / "pycache", image=image)
    if image:
        print("image ENV:", " ".join(f"{k}={v}" for k, v in sorted(image_env().items())))
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "upstream.py"), str(up_port)], stdout=subprocess.DEVNULL
    )
    try:
        runs: list[Run] = []
        for i in range(args.runs):
            r = await one_run(tmp, up_port, args.python, env)
            label = "compiles" if i == 0 or args.no_bytecode else "cached"
            print(
                f"run {i + 1} ({label}): start {r.start:.2f} s wall, {r.cpu:.2f} s CPU, "
                f"idle RSS {r.rss_idle:.1f} MiB before any request, {r.rss_one:.1f} MiB "
                f"after one, PSS {r.pss_one:.1f} MiB"
            )
            runs.append(r)
        rest = runs if args.no_bytecode or len(runs) == 1 else runs[1:]

        def med(field: str) -> float:
            return float(statistics.median(getattr(r, field) for r in rest))

        print(
            f"median of {len(rest)}: start {med('start'):.2f} s wall, {med('cpu'):.2f} s CPU, "
            f"idle RSS {med('rss_idle'):.1f} MiB before any request, {med('rss_one'):.1f} MiB "
            f"after one, PSS {med('pss_one'):.1f} MiB"
        )
    finally:
        stop(upstream)
    if args.importtime:
        for us, name in import_profile(args.python, env, args.importtime):
            print(f"{us / 1000:8.1f} ms  {name}")


if __name__ == "__main__":
    asyncio.run(main())
