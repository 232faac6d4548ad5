"""Desired state end to end, as real processes: API (Postgres) → Redis → NLB and ALB.

A write through the API reaches a running NLB and a running ALB (their /status shows the new
version and the ALB routes real traffic by it); with Redis stopped the next write still arrives
through the API long poll; with Redis and the API both stopped the data planes keep serving the
last state they applied.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web

from tests.conftest import PrivateRedis, ProcessGroup, free_port, wait_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

KEY = "e2e-cluster-key"
ADMIN_PASSWORD = "e2e-admin-password"


@pytest.fixture
def pg_database() -> Iterator[str]:
    name = f"mp_e2e_{uuid.uuid4().hex[:10]}"
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"backend saw {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def wait_json(
    http: aiohttp.ClientSession, url: str, pick: Any, want: Any, what: str, procs: ProcessGroup
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    last: Any = None
    while time.monotonic() < deadline:
        try:
            async with http.get(url) as r:
                body = await r.json()
            last = pick(body)
            if last == want:
                return body  # type: ignore[no-any-return]
        except (aiohttp.ClientError, KeyError, TypeError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: last saw {last!r}, wanted {want!r}\n{procs.dump()}")


def applied(body: dict[str, Any]) -> int:
    """The applied desired-state version from an NLB or module /status document."""
    config = body["status"]["config"] if "status" in body else body["config"]
    return int(config["applied_version"])


async def test_write_reaches_nlb_and_alb_through_redis_then_long_poll_then_fail_static(
    procs: ProcessGroup, private_redis: PrivateRedis, pg_database: str, backend: int
) -> None:
    api_port, nlb_grpc, nlb_admin = free_port(), free_port(), free_port()
    alb_data, alb_admin = free_port(), free_port()
    common = {
        "CLUSTER_API_KEY": KEY,
        "REDIS_URL": private_redis.url,
        "API_URL": f"http://127.0.0.1:{api_port}",
        "HEARTBEAT_INTERVAL": "0.5",
    }
    procs.python(
        "api",
        "marchproxy_api",
        {
            **common,
            "DATABASE_URL": pg_database,
            "SECRET_KEY": "e2e-secret",
            "API_HOST": "127.0.0.1",
            "API_PORT": str(api_port),
            "MARCHPROXY_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "STATE_POLL_DEFAULT": "5",
        },
    )
    wait_port(api_port, timeout=60)
    procs.python(
        "nlb",
        "marchproxy_nlb",
        {**common, "NLB_GRPC_PORT": str(nlb_grpc), "NLB_ADMIN_PORT": str(nlb_admin)},
    )
    alb = procs.python(
        "alb",
        "marchproxy_alb",
        {
            **common,
            "NLB_ADDR": f"127.0.0.1:{nlb_grpc}",
            "DATA_PORT": str(alb_data),
            "ADMIN_PORT": str(alb_admin),
            "GRPC_PORT": "0",
        },
    )
    wait_port(nlb_admin, timeout=60)
    wait_port(alb_admin, timeout=60)
    api = f"http://127.0.0.1:{api_port}/api/v1"
    nlb_status = f"http://127.0.0.1:{nlb_admin}/status"
    alb_status = f"http://127.0.0.1:{alb_admin}/status"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(
            f"{api}/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        ) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())["access_token"]
        auth = {"Authorization": f"Bearer {token}"}

        async def version() -> int:
            async with http.get(f"{api}/state/status", headers=auth) as r:
                assert r.status == 200, await r.text()
                return int((await r.json())["config_version"])

        # 1. A write, delivered through Redis.
        async with http.post(
            f"{api}/modules",
            headers=auth,
            json={"name": "alb", "type": "ALB", "enabled": True, "version": "1.0.0"},
        ) as r:
            assert r.status == 201, await r.text()
            module_id = (await r.json())["id"]
        async with http.post(
            f"{api}/modules/{module_id}/routes",
            headers=auth,
            json={
                "name": "hello",
                "match_rules": {"path": "/hello/*"},
                "backend_config": {"target": f"http://127.0.0.1:{backend}"},
            },
        ) as r:
            assert r.status == 201, await r.text()
        v1 = await version()
        nlb_http = free_port()  # a listener the NLB opens because the API says so
        async with http.post(
            f"{api}/nlb/listeners",
            headers=auth,
            json={"name": "web", "port": nlb_http, "protocols": ["http"]},
        ) as r:
            assert r.status == 201, await r.text()
        v1_nlb = await version()  # a listener changes the NLB's state only
        assert v1_nlb > v1
        body = await wait_json(http, nlb_status, applied, v1_nlb, "NLB applies v1", procs)
        (web_listener,) = body["status"]["listeners"]
        assert web_listener["address"] == f"127.0.0.1:{nlb_http}"
        assert web_listener["proxy_protocol"] == "v2"
        await wait_json(http, alb_status, applied, v1, "ALB applies v1", procs)
        async with http.get(f"http://127.0.0.1:{alb_data}/hello/world") as r:
            assert r.status == 200
            assert await r.text() == "backend saw /hello/world"

        async def through_nlb(path: str) -> str:
            async with http.get(f"http://127.0.0.1:{nlb_http}{path}") as r:
                assert r.status == 200, await r.text()
                return await r.text()

        deadline = time.monotonic() + 30  # until the ALB has registered with the NLB
        while True:
            try:
                assert await through_nlb("/hello/nlb") == "backend saw /hello/nlb"
                break
            except (aiohttp.ClientError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

        # 2. Redis stops; the next write arrives through the API long poll.
        private_redis.stop()
        async with http.post(
            f"{api}/modules/{module_id}/routes",
            headers=auth,
            json={
                "name": "again",
                "match_rules": {"path": "/again/*"},
                "backend_config": {"target": f"http://127.0.0.1:{backend}"},
            },
        ) as r:
            assert r.status == 201, await r.text()
        v2 = await version()
        assert v2 > v1
        await wait_json(http, nlb_status, applied, v2, "NLB applies v2 without Redis", procs)
        await wait_json(http, alb_status, applied, v2, "ALB applies v2 without Redis", procs)
        async with http.get(f"http://127.0.0.1:{alb_data}/again/x") as r:
            assert r.status == 200

        # 3. The API stops too: the data planes keep serving what they applied last.
        procs.procs[0].stop()
        await asyncio.sleep(1.0)
        async with http.get(f"http://127.0.0.1:{alb_data}/hello/still") as r:
            assert r.status == 200
            assert await r.text() == "backend saw /hello/still"
        assert applied(await (await http.get(alb_status)).json()) == v2
        assert applied(await (await http.get(nlb_status)).json()) == v2
        # ... and say so in /status.
        await wait_json(
            http, alb_status, lambda b: b["config"]["fail_static"], True, "ALB fail static", procs
        )
        await wait_json(
            http,
            nlb_status,
            lambda b: b["status"]["config"]["fail_static"],
            True,
            "NLB fail static",
            procs,
        )
    assert alb.proc.poll() is None
