"""Postgres down when the API starts: the process stays up, answers 503 JSON (readyz too)
and becomes ready by itself once the database is reachable."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.api.conftest import ADMIN_PASSWORD, _drop_prefix, make_settings, start_api

pytestmark = pytest.mark.integration


async def test_api_starts_without_postgres_and_recovers(pg_url, cut_proxy) -> None:
    proxy = await cut_proxy(5432)
    await proxy.cut()  # nothing listens on the proxy port: connections are refused
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = make_settings(url, start_retry_max=0.3)
    runner, base, _ = await start_api(settings)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:

            async def call(method: str, path: str, **kw) -> tuple[int, dict, dict]:
                async with http.request(method, base + path, **kw) as resp:
                    assert resp.content_type == "application/json", await resp.text()
                    return resp.status, await resp.json(), dict(resp.headers)

            assert (await call("GET", "/healthz"))[0] == 200
            status, body, headers = await call("GET", "/readyz")
            assert status == 503 and body["error"] == "not_ready"
            assert set(body) == {"error", "message", "details"} and body["details"]["reason"]
            assert headers["Retry-After"]
            login = {"username": "admin", "password": ADMIN_PASSWORD}
            status, body, _ = await call("POST", "/api/v1/auth/login", json=login)
            assert status == 503 and body["error"] == "not_ready"
            status, body, _ = await call("GET", "/api/v1/modules")
            assert status == 503 and body["error"] == "not_ready"
            status, health, _ = await call("GET", "/api/v1/system/health")
            assert status == 200 and health["ready"] is False and health["database"] == "down"

            await proxy.start()
            async with asyncio.timeout(30):
                while (await call("GET", "/readyz"))[0] != 200:
                    await asyncio.sleep(0.1)
            status, tokens, _ = await call("POST", "/api/v1/auth/login", json=login)
            assert status == 200, tokens
            auth = {"Authorization": f"Bearer {tokens['access_token']}"}
            status, mod, _ = await call(
                "POST", "/api/v1/modules", json={"name": "late", "type": "ALB"}, headers=auth
            )
            assert status == 201, mod
            hdr = {"X-Cluster-Api-Key": settings.cluster_api_key}
            status, snap, _ = await call("GET", "/api/v1/state/alb?after=0&timeout=0", headers=hdr)
            assert status == 200 and [m["name"] for m in snap["modules"]] == ["late"]
    finally:
        await runner.cleanup()
        await _drop_prefix(settings.state_prefix)
