"""Fixtures: a fresh Postgres database per test module, a real API server on 127.0.0.1:0,
real aiohttp clients, a random Redis STATE_PREFIX per test."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import psycopg
import pytest
from aiohttp import web

from marchproxy.v1 import module_pb2, module_pb2_grpc, types_pb2
from marchproxy_api.app import create_app
from marchproxy_api.config import ApiSettings

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN_PASSWORD = "admin-password-for-tests"
CLUSTER_KEY = "test-cluster-key"
SECRET = "test-secret-key-0123456789abcdef0123"


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


def make_settings(database_url: str, **over: Any) -> ApiSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "state_prefix": f"mptest{secrets.token_hex(4)}",
        "secret_key": SECRET,
        "cluster_api_key": CLUSTER_KEY,
        "marchproxy_admin_password": ADMIN_PASSWORD,
        "promote_step_seconds": 0.0,
        "log_level": "WARNING",
    }
    values.update(over)
    return ApiSettings(**values)


@dataclass
class Api:
    url: str
    app: web.Application
    http: aiohttp.ClientSession
    settings: ApiSettings
    token: str = ""

    def headers(self, token: str | None = None) -> dict[str, str]:
        tok = self.token if token is None else token
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    async def call(
        self, method: str, path: str, json: Any = None, token: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = {**self.headers(token), **kw.pop("headers", {})}
        async with self.http.request(
            method, self.url + path, json=json, headers=headers, **kw
        ) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def login(self, username: str, password: str) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/api/v1/auth/login", {"username": username, "password": password}, token=""
        )
        assert status == 200, body
        return body


async def start_api(settings: ApiSettings) -> tuple[web.AppRunner, str, web.Application]:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}", app


@asynccontextmanager
async def running_api(database_url: str, **over: Any) -> AsyncIterator[Api]:
    settings = make_settings(database_url, **over)
    runner, url, app = await start_api(settings)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            a = Api(url=url, app=app, http=http, settings=settings)
            a.token = (await a.login("admin", ADMIN_PASSWORD))["access_token"]
            yield a
    finally:
        await runner.cleanup()
        await _drop_prefix(settings.state_prefix)


async def _drop_prefix(prefix: str) -> None:
    from redis.asyncio import Redis

    r = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture
async def api(pg_url: str) -> AsyncIterator[Api]:
    async with running_api(pg_url) as a:
        yield a


@pytest.fixture
def api_factory() -> Any:
    """``async with api_factory(database_url, **settings) as api: ...``"""
    return running_api


class CutProxy:
    """TCP forwarder to a local service that a test can cut and restore on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
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
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.conns += [writer, uw]
        await asyncio.gather(self._pipe(reader, uw), self._pipe(ur, writer))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for w in self.conns:
            w.close()
        self.conns.clear()
        await self.server.wait_closed()
        self.server = None


@pytest.fixture
async def cut_proxy() -> AsyncIterator[Any]:
    made: list[CutProxy] = []

    async def factory(target_port: int) -> CutProxy:
        p = CutProxy(target_port)
        await p.start()
        made.append(p)
        return p

    try:
        yield factory
    finally:
        for p in made:
            await p.cut()


@dataclass
class FakeModule(module_pb2_grpc.ModuleServiceServicer):
    expected_key: str
    healthy: bool = True
    #: after this many HealthCheck calls the module turns unhealthy (None = never)
    fail_after: int | None = None
    calls: int = 0
    keys_seen: list[str] = field(default_factory=list)

    async def HealthCheck(self, request, context):
        md = dict(context.invocation_metadata())
        self.keys_seen.append(md.get("x-cluster-api-key", ""))
        if md.get("x-cluster-api-key") != self.expected_key:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad key")
        self.calls += 1
        ok = self.healthy and (self.fail_after is None or self.calls <= self.fail_after)
        return module_pb2.HealthCheckResponse(
            status=types_pb2.HEALTH_STATUS_HEALTHY if ok else types_pb2.HEALTH_STATUS_UNHEALTHY,
            message="ok" if ok else "error rate high",
            checks={"upstream": "ok" if ok else "5xx"},
        )


@asynccontextmanager
async def fake_module(key: str) -> AsyncIterator[tuple[FakeModule, int]]:
    server = grpc.aio.server()
    mod = FakeModule(expected_key=key)
    module_pb2_grpc.add_ModuleServiceServicer_to_server(mod, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield mod, port
    finally:
        await server.stop(None)


@pytest.fixture
async def module_server() -> AsyncIterator[tuple[FakeModule, int]]:
    async with fake_module(CLUSTER_KEY) as pair:
        yield pair
