"""Fixtures for ALB tests: real aiohttp backends on port 0 and an ALB data plane on port 0."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from marchproxy_alb.config import AlbSettings
from marchproxy_alb.module import AlbHooks


@dataclass
class Backend:
    name: str
    runner: web.AppRunner
    port: int
    peers: set[tuple[str, int]] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    health_status: int = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


def _make_app(b: Backend) -> web.Application:
    async def record(request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            b.peers.add((peer[0], peer[1]))
        b.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
            }
        )

    async def echo(request: web.Request) -> web.Response:
        await record(request)
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response(
            {
                "backend": b.name,
                "method": request.method,
                "path": request.path_qs,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "body_len": total,
                "chunked": request.headers.get("Transfer-Encoding", "") == "chunked",
            }
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        await record(request)
        n = int(request.query.get("n", "10"))
        size = int(request.query.get("size", "1000"))
        delay = float(request.query.get("delay", "0"))  # seconds between blocks
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = b"x" * size
        for _ in range(n):
            await resp.write(block)
            if delay:
                await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.Response(text="late")

    async def status(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=int(request.match_info["code"]), text=b.name)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=b.health_status, text="health")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        await record(request)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    async def who(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text=b.name)

    app = web.Application(client_max_size=1 << 34)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/healthz", health)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", who)
    return app


async def start_backend(name: str = "b1", port: int = 0) -> Backend:
    b = Backend(name, None, 0)  # type: ignore[arg-type]
    runner = web.AppRunner(_make_app(b), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    b.runner = runner
    b.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return b


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
    started: list[Backend] = []

    async def make(name: str = "b1") -> Backend:
        b = await start_backend(name)
        started.append(b)
        return b

    yield make
    for b in started:
        await b.stop()


@dataclass
class Alb:
    hooks: AlbHooks

    @property
    def port(self) -> int:
        return self.hooks.data_address.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def configure(
        self, routes: list[dict[str, Any]], module_config: dict[str, Any] | None = None
    ) -> None:
        snapshot = {
            "component": "alb",
            "version": 1,
            "modules": [{"name": "alb", "type": "ALB", "config": module_config or {}}],
            "routes": routes,
        }
        errors = await self.hooks.apply_config(json.loads(json.dumps(snapshot)))
        assert errors == [], errors


def route(name: str, target: str | list[str], **kw: Any) -> dict[str, Any]:
    backend: dict[str, Any] = dict(kw.pop("backend", {}))
    if isinstance(target, list):
        backend["targets"] = target
    else:
        backend["target"] = target
    return {
        "name": name,
        "module": "alb",
        "match_rules": kw.pop("match", {}),
        "backend_config": backend,
        **kw,
    }


def alb_settings(**kw: Any) -> AlbSettings:
    base: dict[str, Any] = {
        "data_host": "127.0.0.1",
        "data_port": 0,
        "register_with_nlb": False,
        "alb_access_log": False,
    }
    base.update(kw)
    return AlbSettings(**base)


@pytest.fixture
async def alb_factory() -> AsyncIterator[Callable[..., Awaitable[Alb]]]:
    made: list[AlbHooks] = []

    async def make(**kw: Any) -> Alb:
        hooks = AlbHooks(alb_settings(**kw))
        await hooks.start_data_plane()
        made.append(hooks)
        return Alb(hooks)

    yield make
    for h in made:
        await h.close()


@pytest.fixture
async def alb(alb_factory: Callable[..., Awaitable[Alb]]) -> Alb:
    return await alb_factory()


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send raw bytes, then read until the server closes (bounded by read_timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(read_timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        writer.close()


def make_cert(d: Path, name: str) -> tuple[str, str]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return str(cert), str(key)


async def tls_get(port: int, sni: str, cafile: str, path: str) -> tuple[str, bytes]:
    ctx = ssl.create_default_context(cafile=cafile)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    try:
        peer = writer.get_extra_info("peercert")
        cn = dict(x[0] for x in peer["subject"])["commonName"]
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            data = await reader.read()
            while chunk := await reader.read(65536):
                data += chunk
        return cn, data
    finally:
        writer.close()
