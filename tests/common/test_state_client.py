"""StateClient against real Redis (random prefix per test), a real API app (long poll, real
Postgres), a static file, a cut-able TCP path to Redis, and fail-static when all are gone."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import suppress
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web
from redis.asyncio import Redis

from marchproxy_common.state import StateClient

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
KEY = "state-client-test-key"
WAIT = 20.0


class Recorder:
    def __init__(self, reject: set[int] | None = None) -> None:
        self.seen: list[int] = []
        self.reject = reject or set()

    async def __call__(self, snapshot: Mapping[str, Any]) -> list[str]:
        v = int(snapshot.get("version", 0))
        if v in self.reject:
            return [f"version {v} is invalid"]
        self.seen.append(v)
        return []


@pytest.fixture
async def redis() -> AsyncIterator[tuple[Redis, str]]:
    r = Redis.from_url(REDIS_URL)
    prefix = f"mpsc{secrets.token_hex(4)}"
    try:
        yield r, prefix
    finally:
        keys = [k async for k in r.scan_iter(f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def publish(r: Redis, prefix: str, comp: str, version: int, notify: bool = True) -> None:
    snap = {"component": comp, "version": version, "modules": [], "routes": []}
    await r.set(f"{prefix}:state:{comp}", json.dumps(snap))
    if notify:
        await r.publish(f"{prefix}:state", f"{comp} {version}")


async def until(pred, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not pred():
            await asyncio.sleep(0.02)


async def test_redis_initial_fetch_and_updates(redis) -> None:
    r, prefix = redis
    await publish(r, prefix, "alb", 3)
    rec = Recorder()
    client = StateClient("alb", rec, redis_url=REDIS_URL, prefix=prefix)
    await client.start()
    try:
        assert client.applied_version == 3 and client.source == "redis"
        await publish(r, prefix, "dblb", 9)  # another component: ignored
        await publish(r, prefix, "alb", 4)
        async with asyncio.timeout(WAIT):
            await client.wait_for_version(4)
        await publish(r, prefix, "alb", 2)  # older: never applied
        await publish(r, prefix, "alb", 5)
        async with asyncio.timeout(WAIT):
            await client.wait_for_version(5)
        assert rec.seen == [3, 4, 5]
        assert client.status()["fail_static"] is False
    finally:
        await client.stop()


async def test_rejected_snapshot_keeps_previous(redis) -> None:
    r, prefix = redis
    await publish(r, prefix, "rtmp", 1)
    rec = Recorder(reject={2})
    client = StateClient("rtmp", rec, redis_url=REDIS_URL, prefix=prefix)
    await client.start()
    try:
        await publish(r, prefix, "rtmp", 2)
        await until(lambda: client.rejected_version == 2, "reject")
        assert client.applied_version == 1
        assert "invalid" in client.rejected_reason and client.rejected_total == 1
        await publish(r, prefix, "rtmp", 3)
        async with asyncio.timeout(WAIT):
            await client.wait_for_version(3)
        assert rec.seen == [1, 3]
    finally:
        await client.stop()


async def test_hint_refetches_without_publish(redis) -> None:
    r, prefix = redis
    await publish(r, prefix, "ailb", 1)
    client = StateClient("ailb", Recorder(), redis_url=REDIS_URL, prefix=prefix)
    await client.start()
    try:
        await publish(r, prefix, "ailb", 7, notify=False)
        client.hint(7)
        async with asyncio.timeout(WAIT):
            await client.wait_for_version(7)
    finally:
        await client.stop()


async def test_static_file(tmp_path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("component: alb\nversion: 12\nmodules: []\nroutes: []\n")
    rec = Recorder()
    client = StateClient("alb", rec, config_file=str(path))
    await client.start()
    await client.stop()
    assert rec.seen == [12] and client.source == "file"


class CutProxy:
    """A TCP forwarder to Redis that the test can cut and restore on the same port."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.conns: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", 6379)
        self.conns += [writer, uw]
        await asyncio.gather(self._pipe(reader, uw), self._pipe(ur, writer))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.conns:
            w.close()
        self.conns.clear()
        await self.server.wait_closed()


async def test_redis_reconnects_and_fails_static(redis) -> None:
    r, prefix = redis
    proxy = CutProxy()
    await proxy.start()
    await publish(r, prefix, "nlb", 1)
    client = StateClient(
        "nlb", Recorder(), redis_url=f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix
    )
    await client.start()
    try:
        assert client.applied_version == 1
        await proxy.cut()
        await until(lambda: client.fail_static, "fail static")
        assert client.applied_version == 1  # still running on the last applied state
        await publish(r, prefix, "nlb", 2)  # published while we are cut off
        await proxy.start()
        async with asyncio.timeout(WAIT):
            await client.wait_for_version(2)
        assert client.fail_static is False
    finally:
        await client.stop()
        await proxy.cut()


async def test_nothing_reachable_is_fail_static() -> None:
    client = StateClient(
        "alb", Recorder(), redis_url="redis://127.0.0.1:1/0", api_url="http://127.0.0.1:1"
    )
    await client.start()
    try:
        assert client.fail_static is True and client.applied_version == 0
        assert client.status()["source"] == "none"
    finally:
        await client.stop()


async def test_an_api_answering_garbage_is_unreachable_not_a_crash() -> None:
    """A 200 whose body is not JSON (a proxy's error page, say) is a source failure: the
    client stays fail-static and keeps polling instead of losing its watcher."""
    polls = 0

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal polls
        polls += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n<html>oh!")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = StateClient("alb", Recorder(), api_url=url, cluster_api_key=KEY, poll_timeout=0.2)
    await client.start()
    try:
        assert client.fail_static is True and client.applied_version == 0
        assert "not JSON" in (client.last_error or "")
        for _ in range(100):  # the watcher retries, with back-off from 0.2 s
            if polls >= 2:
                break
            await asyncio.sleep(0.05)
        assert polls >= 2
    finally:
        await client.stop()
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------- long poll against the real API
@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    name = f"mp_api_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_api_long_poll_ack_and_fail_static(pg_url: str) -> None:
    from marchproxy_api.app import create_app
    from marchproxy_api.config import ApiSettings

    settings = ApiSettings(
        database_url=pg_url,
        redis_url="",
        secret_key="s" * 32,
        cluster_api_key=KEY,
        marchproxy_admin_password="pw-for-state-tests",
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    client = StateClient("alb", Recorder(), api_url=url, cluster_api_key=KEY, poll_timeout=5.0)
    stopped = False
    try:
        await client.start()
        assert client.source == "api" and client.applied_version >= 1
        first = client.applied_version
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url + "/api/v1/auth/login",
                json={"username": "admin", "password": "pw-for-state-tests"},
            ) as resp:
                token = (await resp.json())["access_token"]
            hdr = {"Authorization": f"Bearer {token}"}
            async with http.post(
                url + "/api/v1/modules", json={"name": "alb-main", "type": "ALB"}, headers=hdr
            ) as resp:
                assert resp.status == 201
            async with asyncio.timeout(WAIT):
                await client.wait_for_version(first + 1)

            async def acked() -> bool:
                async with http.get(url + "/api/v1/state/status", headers=hdr) as resp:
                    body = await resp.json()
                alb = next(c for c in body["components"] if c["component"] == "alb")
                return any(
                    i["instance_id"] == client.instance_id
                    and i["applied_version"] == client.applied_version
                    for i in alb["instances"]
                )

            async with asyncio.timeout(WAIT):
                while not await acked():
                    await asyncio.sleep(0.05)
        applied = client.applied_version
        await runner.cleanup()
        stopped = True
        await until(lambda: client.fail_static, "fail static after API stop")
        assert client.applied_version == applied
    finally:
        await client.stop()
        if not stopped:
            await runner.cleanup()


async def test_redis_down_falls_back_to_api_long_poll(pg_url: str) -> None:
    from marchproxy_api.app import create_app
    from marchproxy_api.config import ApiSettings

    settings = ApiSettings(
        database_url=pg_url,
        redis_url="",
        secret_key="s" * 32,
        cluster_api_key=KEY,
        marchproxy_admin_password="pw-for-state-tests",
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    proxy = CutProxy()
    await proxy.start()
    await proxy.cut()  # Redis configured but unreachable from the start
    client = StateClient(
        "dblb",
        Recorder(),
        redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        api_url=url,
        cluster_api_key=KEY,
        poll_timeout=5.0,
        prefix=f"mpsc{secrets.token_hex(4)}",
    )
    try:
        await client.start()
        assert client.source == "api" and client.applied_version >= 1
        first = client.applied_version
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url + "/api/v1/auth/login",
                json={"username": "admin", "password": "pw-for-state-tests"},
            ) as resp:
                token = (await resp.json())["access_token"]
            async with http.post(
                url + "/api/v1/modules",
                json={"name": "dblb-main", "type": "DBLB"},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 201
        async with asyncio.timeout(WAIT):
            await client.wait_for_version(first + 1)
        assert client.source == "api"
    finally:
        await client.stop()
        await runner.cleanup()


async def test_long_poll_after_rejection_does_not_spin(pg_url: str) -> None:
    from marchproxy_api.app import create_app
    from marchproxy_api.config import ApiSettings
    from marchproxy_api.keys import metrics_key

    settings = ApiSettings(
        database_url=pg_url,
        redis_url="",
        secret_key="s" * 32,
        cluster_api_key=KEY,
        marchproxy_admin_password="pw-for-state-tests",
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    class RejectAll:
        calls = 0

        async def __call__(self, snapshot: Mapping[str, Any]) -> list[str]:
            self.calls += 1
            return ["nothing is acceptable"]

    rec = RejectAll()
    client = StateClient("rtmp", rec, api_url=url, cluster_api_key=KEY, poll_timeout=0.5)
    try:
        await client.start()
        assert client.rejected_version >= 1 and client.applied_version == 0
        await asyncio.sleep(1.5)  # several poll periods: the rejected version is not re-fetched
        assert rec.calls == 1
        registry = runner.app[metrics_key].registry
        served = sum(
            sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name == "marchproxy_api_requests_total"
            and sample.labels.get("route", "").startswith("/api/v1/state/{component")
            and sample.labels.get("status") == "200"
            and sample.labels.get("method") == "GET"
        )
        assert served == 1, served  # 304s after the rejection, not a stream of 200s
    finally:
        await client.stop()
        await runner.cleanup()
