"""Write → every data plane applied: p50/p99 over N writes with M routes loaded.

Runs the API in this process (real Postgres database created for the run, real Redis with a
random prefix) and one StateClient per component (nlb, alb, dblb, ailb, rtmp), each in a process
of its own as data planes run, then PATCHes a route N times through real HTTP and times until
every client has applied the version the API holds for its component after the write (the
write changes alb and nlb; the others must still be at their current version). A client process
reports each applied version with a CLOCK_MONOTONIC timestamp, which is system-wide on Linux,
so the latency is the apply time in the client minus the write's start in this process.
Usage:

    uv run --frozen python benchmarks/api/bench_state_propagation.py [--writes 200] [--routes 1000]
        [--no-redis]             # long-poll path instead of Redis
        [--clients-in-process]   # the five clients on the API's own event loop instead
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from redis.asyncio import Redis

from marchproxy_api.app import create_app
from marchproxy_api.config import ApiSettings
from marchproxy_api.db.models import ModuleRoute
from marchproxy_api.keys import publisher_key, sessionmaker_key
from marchproxy_common.logs import configure_logging
from marchproxy_common.loop import freeze_startup_heap
from marchproxy_common.state import StateClient

PG = "postgresql://postgres@127.0.0.1:5432"
KEY = "bench-cluster-key"
COMPONENTS = ("nlb", "alb", "dblb", "ailb", "rtmp")
WAIT = 60.0


async def noop(snapshot: Mapping[str, Any]) -> list[str]:
    return []


def make_client(comp: str, redis_url: str, api_url: str, prefix: str) -> StateClient:
    return StateClient(
        comp,
        noop,
        redis_url=redis_url,
        api_url=api_url,
        cluster_api_key=KEY,
        prefix=prefix,
        poll_timeout=30,
    )


async def client_main(comp: str, redis_url: str, api_url: str, prefix: str) -> None:
    """Child process: one data plane's state client; prints ``version monotonic_ns`` lines."""
    c = make_client(comp, redis_url, api_url, prefix)
    await c.start()
    freeze_startup_heap()  # as every service's entry point does once started
    try:
        seen = -1
        while True:
            await c.wait_for_version(seen + 1)
            seen = c.applied_version
            print(seen, time.monotonic_ns(), flush=True)
    finally:
        await c.stop()


class Applied:
    """Versions applied per component with the monotonic time they were applied."""

    def __init__(self) -> None:
        self.at: dict[str, list[tuple[int, int]]] = {c: [] for c in COMPONENTS}
        self._changed = asyncio.Event()

    def record(self, comp: str, version: int, at_ns: int) -> None:
        self.at[comp].append((version, at_ns))
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def when(self, comp: str, version: int) -> int | None:
        for v, at in self.at[comp]:
            if v >= version:
                return at
        return None

    async def wait(self, targets: dict[str, int]) -> int:
        """Latest time at which a component reached its target version."""
        while True:
            times = [self.when(c, v) for c, v in targets.items()]
            if all(t is not None for t in times):
                return max(t for t in times if t is not None)
            ev = self._changed
            await ev.wait()


async def _read(proc: asyncio.subprocess.Process, comp: str, applied: Applied) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        version, at = line.split()
        applied.record(comp, int(version), int(at))


async def start_clients(
    applied: Applied, redis_url: str, api_url: str, prefix: str, in_process: bool
) -> tuple[list[Any], list[asyncio.Task[None]]]:
    if in_process:
        clients = []
        for comp in COMPONENTS:
            c = make_client(comp, redis_url, api_url, prefix)

            async def watch(c: StateClient = c) -> None:
                seen = -1
                while True:
                    await c.wait_for_version(seen + 1)
                    seen = c.applied_version
                    applied.record(c.component, seen, time.monotonic_ns())

            await c.start()
            clients.append(c)
        return clients, [asyncio.ensure_future(watch(c)) for c in clients]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            comp,
            redis_url,
            api_url,
            prefix,
            stdout=asyncio.subprocess.PIPE,
        )
        for comp in COMPONENTS
    ]
    readers = [
        asyncio.ensure_future(_read(p, c, applied)) for p, c in zip(procs, COMPONENTS, strict=True)
    ]
    return procs, readers


async def stop_clients(clients: list[Any], readers: list[asyncio.Task[None]]) -> None:
    for t in readers:
        t.cancel()
    for c in clients:
        if isinstance(c, StateClient):
            await c.stop()
        elif c.returncode is None:
            c.terminate()
            try:
                await asyncio.wait_for(c.wait(), 10)
            except TimeoutError:
                c.kill()
                await c.wait()


async def run(writes: int, routes: int, use_redis: bool, in_process: bool) -> None:
    db = f"mp_api_bench_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/test", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    prefix = f"mpbench{secrets.token_hex(3)}"
    settings = ApiSettings(
        database_url=f"{PG}/{db}",
        redis_url="redis://127.0.0.1:6379/0" if use_redis else "",
        state_prefix=prefix,
        secret_key="b" * 32,
        cluster_api_key=KEY,
        marchproxy_admin_password="bench-admin",
        log_level="WARNING",
        state_poll_max=5.0,
    )
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    clients: list[Any] = []
    readers: list[asyncio.Task[None]] = []
    applied = Applied()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url + "/api/v1/auth/login", json={"username": "admin", "password": "bench-admin"}
            ) as r:
                hdr = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            async with http.post(
                url + "/api/v1/modules", json={"name": "alb-bench", "type": "ALB"}, headers=hdr
            ) as r:
                mod = await r.json()
            app = runner.app
            async with app[sessionmaker_key]() as s, s.begin():
                s.add_all(
                    [
                        ModuleRoute(
                            module_id=mod["id"],
                            name=f"r{i}",
                            priority=100,
                            match_rules={"host": f"h{i}.example.com", "path": "/"},
                            backend_config={"target": f"http://10.0.{i // 250}.{i % 250}:80"},
                        )
                        for i in range(routes)
                    ]
                )
            async with http.post(
                url + "/api/v1/modules/" + str(mod["id"]) + "/routes",
                json={"name": "bench", "match_rules": {"host": "bench.example.com"}},
                headers=hdr,
            ) as r:
                route = await r.json()
            publisher = app[publisher_key]
            freeze_startup_heap()  # as marchproxy-api does once listening
            clients, readers = await start_clients(
                applied, settings.redis_url, "" if use_redis else url, prefix, in_process
            )
            async with asyncio.timeout(WAIT):  # every client has loaded its state
                await applied.wait({c: publisher.version_of(c) for c in COMPONENTS})
            lat, write_lat = [], []
            for i in range(writes):
                before = {c: publisher.version_of(c) for c in COMPONENTS}
                t0 = time.monotonic_ns()
                async with http.patch(
                    f"{url}/api/v1/modules/{mod['id']}/routes/{route['id']}",
                    json={"priority": 1000 + i},
                    headers=hdr,
                ) as r:
                    assert r.status == 200, await r.text()
                write_lat.append((time.monotonic_ns() - t0) / 1e9)
                # the API submitted the new snapshots before answering: these are the targets
                target = {c: publisher.version_of(c) for c in COMPONENTS}
                assert target["alb"] > before["alb"] and target["nlb"] > before["nlb"]
                async with asyncio.timeout(WAIT):
                    done = await applied.wait(target)
                lat.append((done - t0) / 1e9)
    finally:
        await stop_clients(clients, readers)
        await runner.cleanup()
        if use_redis:
            redis_client = Redis.from_url(settings.redis_url)
            keys = [k async for k in redis_client.scan_iter(f"{prefix}:*")]
            if keys:
                await redis_client.delete(*keys)
            await redis_client.aclose()
        with psycopg.connect(f"{PG}/test", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def pct(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000

    path = "redis" if use_redis else "long-poll"
    where = "in-process" if in_process else "one process each"
    print(f"path={path} routes={routes + 1} writes={writes} clients={where}")
    w50, w99 = pct(write_lat, 0.5), pct(write_lat, 0.99)
    print(f"  write (HTTP commit)      p50={w50:.1f} ms  p99={w99:.1f} ms")
    print(
        f"  write -> all applied     p50={pct(lat, 0.5):.1f} ms  p99={pct(lat, 0.99):.1f} ms"
        f"  mean={statistics.mean(lat) * 1000:.1f} ms  (goal p99 <= 50 ms)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        configure_logging("WARNING", "console")
        comp, redis_url, api_url, prefix = sys.argv[2:6]
        asyncio.run(client_main(comp, redis_url, api_url, prefix))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--routes", type=int, default=1000)
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--clients-in-process", action="store_true")
    a = p.parse_args()
    configure_logging("WARNING", "console")
    asyncio.run(run(a.writes, a.routes, not a.no_redis, a.clients_in_process))


if __name__ == "__main__":
    main()
