"""AILB vs LiteLLM's proxy in front of the same fake OpenAI upstream, one worker each.

    uv run --frozen python benchmarks/ailb/bench_ailb.py [--duration 8] [--sequential 300]
        [--litellm /tmp/litellm-venv/bin/litellm] [--rss-requests 100000]

Measures, for the upstream directly, the AILB and LiteLLM: start-up time (spawn -> first
successful completion), req/s at 32 connections (wrk, non-stream), added p50/p99 latency one
request at a time (minus the direct upstream's), time to first token of a stream (minus direct),
RSS idle and after the load. Prints a table and the AILB/LiteLLM ratios. Never run in CI.
LiteLLM is installed in its own venv (never the project's): uv venv /tmp/litellm-venv &&
VIRTUAL_ENV=/tmp/litellm-venv uv pip install 'litellm[proxy]'.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KEY = "sk-bench"
BODY = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """RSS of the process and its children (LiteLLM runs uvicorn under a parent)."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
        ).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """User+system CPU of the process and its children so far (load-independent cost)."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
        ).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    startup_s: float = 0.0
    rps: float = 0.0
    rps_stream: float = 0.0
    cpu_us_per_req: float = 0.0
    requests: int = 0
    errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    rss_idle: float = 0.0
    rss_after: float = 0.0
    notes: list[str] = field(default_factory=list)


async def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> float:
    t0 = time.perf_counter()
    deadline = t0 + timeout
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}")
            try:
                async with s.post(url, json=BODY, headers={"Authorization": f"Bearer {KEY}"}) as r:
                    await r.read()
                    if r.status == 200:
                        return time.perf_counter() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise RuntimeError(f"{url} not ready after {timeout}s")


async def sequential(url: str, n: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of n non-stream requests, and TTFT (ms) of n//2 streams, one at a time."""
    lat: list[float] = []
    ttft: list[float] = []
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s:
        for _ in range(10):  # warm-up: connections, caches
            async with s.post(url, json=BODY, headers=headers) as r:
                await r.read()
        for _ in range(n):
            t0 = time.perf_counter()
            async with s.post(url, json=BODY, headers=headers) as r:
                await r.read()
            lat.append((time.perf_counter() - t0) * 1000)
        for _ in range(n // 2):
            t0 = time.perf_counter()
            first = None
            async with s.post(url, json={**BODY, "stream": True}, headers=headers) as r:
                async for line in r.content:
                    if (
                        first is None
                        and line.startswith(b"data: {")
                        and b'"content":"H' in line.replace(b" ", b"")
                    ):
                        first = time.perf_counter()
            if first is not None:
                ttft.append((first - t0) * 1000)
    return lat, ttft


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def wrk(
    url: str, duration: float, connections: int = 32, script: str = "post.lua"
) -> tuple[float, int, int]:
    env = {**os.environ, "BENCH_KEY": KEY}
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(duration)}s",
            "-s",
            str(HERE / script),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:.*", out)
    if m:
        errs += sum(int(x) for x in re.findall(r"\d+", m.group(0)))
    return rps, total, errs


#: ENV of the image's runtime stage that changes how the interpreter or OpenSSL use memory
IMAGE_ENV_PREFIXES = ("PYTHON", "SSL_", "OPENSSL_", "MALLOC_")


def image_env(dockerfile: Path = ROOT / "services" / "ailb" / "Dockerfile") -> dict[str, str]:
    """The runtime stage's interpreter and OpenSSL settings (PYTHONNODEBUGRANGES, SSL_CERT_*),
    so the benchmark measures the image's configuration, not the dev machine's. The image's
    PYTHONDONTWRITEBYTECODE is left out: its venv ships compiled bytecode, our cache stands in
    for it (see bytecode_env)."""
    final = dockerfile.read_text(encoding="utf-8").split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.*?)(?<!\\)$", final, re.M | re.S):
        for key, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", block):
            if key.startswith(IMAGE_ENV_PREFIXES) and key != "PYTHONDONTWRITEBYTECODE":
                env[key] = value
    return env


def bytecode_env(cache_dir: Path, *, image: bool = True) -> dict[str, str]:
    """Run with cached bytecode, as the image does (UV_COMPILE_BYTECODE=1): a machine that
    sets PYTHONDONTWRITEBYTECODE over a venv without .pyc files (ours does) otherwise makes
    every start compile ~420 modules from source, which costs more than the start itself. The
    cache lives in the benchmark's own directory (PYTHONPYCACHEPREFIX), never in the venv.
    ``image``: also the image's interpreter/OpenSSL ENV (image_env), which the first run's
    compilation honours too (PYTHONNODEBUGRANGES, as the image's build stage)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    if image:
        env |= image_env()
    return env


def start_ailb(
    tmp: Path,
    up_port: int,
    port: int,
    *,
    python: str = sys.executable,
    base_env: dict[str, str] | None = None,
    admin_port: int = 0,
) -> subprocess.Popen[bytes]:
    cfg = {
        "modules": [
            {
                "name": "ailb",
                "type": "AILB",
                "config": {
                    "model_list": [
                        {
                            "model_name": "gpt-fake",
                            "provider": "openai",
                            "base_url": f"http://127.0.0.1:{up_port}/v1",
                            "api_key": "sk-up",
                            "model": "gpt-4o-mini",
                            "price": {"input": 0.15, "output": 0.6},
                        }
                    ],
                    "keys": [
                        {"key_hash": hashlib.sha256(KEY.encode()).hexdigest(), "name": "bench"}
                    ],
                },
            }
        ]
    }
    path = tmp / "ailb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {
        **(os.environ if base_env is None else base_env),
        "CONFIG_FILE": str(path),
        "DATA_PORT": str(port),
        "GRPC_PORT": "0",
        "ADMIN_PORT": str(admin_port),
        "REGISTER_WITH_NLB": "false",
        "REDIS_URL": "",
        "API_URL": "",
        "LOG_LEVEL": "WARNING",
        "AILB_USAGE_LOG": str(tmp / "usage.jsonl"),
    }
    return subprocess.Popen(
        [python, "-m", "marchproxy_ailb"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "ailb.log", "wb"),
    )


def start_litellm(tmp: Path, exe: str, up_port: int, port: int) -> subprocess.Popen[bytes]:
    cfg = {
        "model_list": [
            {
                "model_name": "gpt-fake",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": f"http://127.0.0.1:{up_port}/v1",
                    "api_key": "sk-up",
                },
            }
        ],
        "general_settings": {"master_key": KEY},
        "litellm_settings": {"drop_params": True},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MASTER_KEY": KEY,
        "LITELLM_LOG": "ERROR",
    }
    for var in ("VIRTUAL_ENV", "DATABASE_URL", "REDIS_URL"):
        env.pop(var, None)
    return subprocess.Popen(
        [
            exe,
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env=env,
        cwd=tmp,
        stdout=open(tmp / "litellm.log", "wb"),
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def measure(
    name: str,
    url: str,
    proc: subprocess.Popen[bytes] | None,
    args: argparse.Namespace,
    startup_timeout: float = 60.0,
) -> Result:
    res = Result(name)
    res.startup_s = await wait_ready(url, proc, startup_timeout)
    if proc is not None:
        await asyncio.sleep(1.0)
        res.rss_idle = rss_mib(proc.pid)
    lat, ttft = await sequential(url, args.sequential)
    res.p50_ms, res.p99_ms, res.ttft_p50_ms = pct(lat, 0.5), pct(lat, 0.99), pct(ttft, 0.5)
    cpu0 = cpu_seconds(proc.pid) if proc is not None else 0.0
    warm, warm_requests = 0.0, 0
    res.rps, res.requests, res.errors = await asyncio.to_thread(wrk, url, args.duration)
    if proc is not None and res.requests:
        res.cpu_us_per_req = (cpu_seconds(proc.pid) - cpu0) / res.requests * 1e6
        # warmed up (buffers, pools, allocator arenas at 32 connections): growth after this
        # point is growth per request
        warm, warm_requests = rss_mib(proc.pid), res.requests
    res.rps_stream, n, e = await asyncio.to_thread(
        wrk, url, args.duration / 2, 32, "post_stream.lua"
    )
    res.requests += n
    res.errors += e
    if (
        proc is not None
        and args.rss_requests
        and res.requests < args.rss_requests
        and name == "ailb"
    ):
        more = (args.rss_requests - res.requests) / max(res.rps, 1.0)
        if more <= args.max_extra_seconds:
            _, n, e = await asyncio.to_thread(wrk, url, more + 1)
            res.requests += n
            res.errors += e
        else:
            res.notes.append(f"rss after {res.requests} requests (100k would take {more:.0f}s)")
    if proc is not None:
        res.rss_after = rss_mib(proc.pid)
        if res.requests > warm_requests:
            res.notes.append(
                f"rss {warm:.1f} MiB after {warm_requests} requests, {res.rss_after:.1f} MiB "
                f"after {res.requests}"
            )
    return res


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--sequential", type=int, default=300)
    ap.add_argument("--litellm", default="/tmp/litellm-venv/bin/litellm")
    ap.add_argument("--rss-requests", type=int, default=100_000)
    ap.add_argument("--max-extra-seconds", type=float, default=45.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ailb-bench-"))
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "upstream.py"), str(up_port)], stdout=subprocess.DEVNULL
    )
    procs = [upstream]
    results: list[Result] = []
    try:
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        results.append(await measure("upstream", direct, None, args))
        env = bytecode_env(tmp / "pycache")
        warm_port = free_port()
        warm = start_ailb(tmp, up_port, warm_port, base_env=env)  # fills the bytecode cache
        await wait_ready(f"http://127.0.0.1:{warm_port}/v1/chat/completions", warm, 60)
        stop(warm)
        port = free_port()
        ailb = start_ailb(tmp, up_port, port, base_env=env)
        procs.append(ailb)
        results.append(
            await measure("ailb", f"http://127.0.0.1:{port}/v1/chat/completions", ailb, args)
        )
        stop(ailb)
        if Path(args.litellm).exists():
            port = free_port()
            litellm = start_litellm(tmp, args.litellm, up_port, port)
            procs.append(litellm)
            results.append(
                await measure(
                    "litellm",
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    litellm,
                    args,
                    startup_timeout=120,
                )
            )
            stop(litellm)
        else:
            print(f"(no LiteLLM at {args.litellm}; skipped)")
    finally:
        for p in procs:
            stop(p)
    base = results[0]
    cols = (
        "start s",
        "req/s@32",
        "stream/s",
        "reqs",
        "errs",
        "p50 ms",
        "p99 ms",
        "+p50",
        "+p99",
        "ttft",
        "+ttft",
        "rss0",
        "rss1",
        "cpu us/req",
    )
    print("\n" + " " * 10 + "".join(f"{c:>10}" for c in cols))
    for r in results:
        values = (
            f"{r.startup_s:.2f}",
            f"{r.rps:.0f}",
            f"{r.rps_stream:.0f}",
            str(r.requests),
            str(r.errors),
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.p50_ms - base.p50_ms:.2f}",
            f"{r.p99_ms - base.p99_ms:.2f}",
            f"{r.ttft_p50_ms:.2f}",
            f"{r.ttft_p50_ms - base.ttft_p50_ms:.2f}",
            f"{r.rss_idle:.1f}",
            f"{r.rss_after:.1f}",
            f"{r.cpu_us_per_req:.0f}",
        )
        notes = f"  ({'; '.join(r.notes)})" if r.notes else ""
        print(f"{r.name:10}" + "".join(f"{v:>10}" for v in values) + notes)
    by = {r.name: r for r in results}
    if "ailb" in by:
        a = by["ailb"]
        print(
            f"\nailb req/s vs direct upstream: {a.rps / base.rps:.2f}x non-stream, "
            f"{a.rps_stream / max(base.rps_stream, 1e-3):.2f}x stream"
        )
    if "ailb" in by and "litellm" in by:
        a, lite = by["ailb"], by["litellm"]
        added_a = max(a.p50_ms - base.p50_ms, 1e-3)
        added_l = lite.p50_ms - base.p50_ms
        ttft_a = max(a.ttft_p50_ms - base.ttft_p50_ms, 1e-3)
        ttft_l = lite.ttft_p50_ms - base.ttft_p50_ms
        print(
            f"ailb vs litellm: req/s {a.rps / max(lite.rps, 1e-3):.1f}x, "
            f"stream req/s {a.rps_stream / max(lite.rps_stream, 1e-3):.1f}x, "
            f"added p50 {added_l / added_a:.1f}x lower, ttft {ttft_l / ttft_a:.1f}x lower, "
            f"cpu/request {lite.cpu_us_per_req / max(a.cpu_us_per_req, 1e-3):.0f}x lower, "
            f"rss idle {lite.rss_idle / max(a.rss_idle, 1e-3):.1f}x lower, "
            f"start {lite.startup_s / max(a.startup_s, 1e-3):.1f}x faster"
        )
    print(f"(logs in {tmp})")


if __name__ == "__main__":
    asyncio.run(main())
