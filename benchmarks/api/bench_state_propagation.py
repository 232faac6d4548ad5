"""Write → every affected data plane applied: p50/p99 over N writes with M routes loaded.

Runs the API (real Postgres database created for the run, real Redis with a random prefix) and
one StateClient per component (nlb, alb, dblb, ailb, rtmp) in this process, then PATCHes a route
N times through real HTTP and times until the alb and nlb clients (the components the write
changes) have applied the new version. Usage:

    uv run --frozen python benchmarks/api/bench_state_propagation.py [--writes 200] [--routes 1000]
        [--no-redis]   # long-poll path instead of Redis
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
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
from marchproxy_api.keys import sessionmaker_key
from marchproxy_common.state import StateClient

PG = "postgresql://postgres@127.0.0.1:5432"
KEY = "bench-cluster-key"


async def noop(snapshot: Mapping[str, Any]) -> list[str]:
    return []


async def run(writes: int, routes: int, use_redis: bool) -> None:
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
    )
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    clients: list[StateClient] = []
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
            for comp in ("nlb", "alb", "dblb", "ailb", "rtmp"):
                c = StateClient(
                    comp,
                    noop,
                    redis_url=settings.redis_url,
                    api_url="" if use_redis else url,
                    cluster_api_key=KEY,
                    prefix=prefix,
                    poll_timeout=30,
                )
                await c.start()
                clients.append(c)
            alb, nlb = clients[1], clients[0]
            lat, write_lat = [], []
            for i in range(writes):
                before = max(alb.applied_version, nlb.applied_version)
                t0 = time.perf_counter()
                async with http.patch(
                    f"{url}/api/v1/modules/{mod['id']}/routes/{route['id']}",
                    json={"priority": 1000 + i},
                    headers=hdr,
                ) as r:
                    assert r.status == 200, await r.text()
                write_lat.append(time.perf_counter() - t0)
                async with asyncio.timeout(30):
                    await alb.wait_for_version(before + 1)
                    await nlb.wait_for_version(before + 1)
                lat.append(time.perf_counter() - t0)
    finally:
        for c in clients:
            await c.stop()
        await runner.cleanup()
        if use_redis:
            r = Redis.from_url(settings.redis_url)
            keys = [k async for k in r.scan_iter(f"{prefix}:*")]
            if keys:
                await r.delete(*keys)
            await r.aclose()
        with psycopg.connect(f"{PG}/test", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def pct(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000

    path = "redis" if use_redis else "long-poll"
    print(f"path={path} routes={routes + 1} writes={writes}")
    w50, w99 = pct(write_lat, 0.5), pct(write_lat, 0.99)
    print(f"  write (HTTP commit)      p50={w50:.1f} ms  p99={w99:.1f} ms")
    print(
        f"  write -> alb+nlb applied p50={pct(lat, 0.5):.1f} ms  p99={pct(lat, 0.99):.1f} ms"
        f"  mean={statistics.mean(lat) * 1000:.1f} ms  (goal p99 <= 50 ms)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--routes", type=int, default=1000)
    p.add_argument("--no-redis", action="store_true")
    a = p.parse_args()
    asyncio.run(run(a.writes, a.routes, not a.no_redis))


if __name__ == "__main__":
    main()
