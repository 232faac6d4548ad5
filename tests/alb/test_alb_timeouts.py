"""Route timeouts through real sockets: ``timeout`` bounds the wait for the response head;
bodies in either direction are bounded by ``idle_timeout`` only, so a long stream that keeps
moving is never cut."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.alb.alb_support import route


async def test_long_response_stream_outlives_the_route_timeout(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url, backend={"timeout": 0.5, "idle_timeout": 5})])
    async with (
        aiohttp.ClientSession() as s,
        s.get(alb.url + "/stream?n=8&size=1000&delay=0.15") as r,
    ):
        assert r.status == 200
        data = await r.read()  # ~1.2 s of streaming, more than the 0.5 s timeout
    assert data == b"x" * 8000


async def test_long_upload_outlives_the_route_timeout(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url, backend={"timeout": 0.5, "idle_timeout": 5})])

    async def slow_body():
        for _ in range(8):
            yield b"u" * 1000
            await asyncio.sleep(0.15)

    async with aiohttp.ClientSession() as s, s.post(alb.url + "/echo", data=slow_body()) as r:
        assert r.status == 200
        assert (await r.json())["body_len"] == 8000


async def test_the_head_still_has_to_come_within_the_timeout(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url, backend={"timeout": 0.4, "idle_timeout": 5})])

    async def body():
        yield b"u" * 100
        await asyncio.sleep(0.6)  # not counted: the upload is governed by idle_timeout
        yield b"u" * 100

    async with aiohttp.ClientSession() as s:
        async with s.post(alb.url + "/echo", data=body()) as r:
            assert r.status == 200
        async with s.get(alb.url + "/slow?delay=3") as r:
            assert r.status == 504
            assert (await r.json())["error"] == "upstream_timeout"


async def test_stalled_response_stream_is_cut_after_idle_timeout(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url, backend={"timeout": 60, "idle_timeout": 0.4})])
    async with aiohttp.ClientSession() as s, s.get(alb.url + "/stream?n=3&delay=2") as r:
        assert r.status == 200
        try:
            async with asyncio.timeout(10):
                await r.read()
            cut = False
        except aiohttp.ClientPayloadError:
            cut = True
    assert cut
    assert alb.hooks.plane.refusal_counts["upstream_timeout"] == 1


async def test_client_that_stops_reading_is_cut_after_idle_timeout(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url, backend={"timeout": 60, "idle_timeout": 0.5})])
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    try:
        # 64 MiB response; we read its head and then nothing
        writer.write(b"GET /stream?n=256&size=262144 HTTP/1.1\r\nHost: a\r\n\r\n")
        async with asyncio.timeout(10):
            await reader.readuntil(b"\r\n\r\n")
        plane = alb.hooks.plane
        async with asyncio.timeout(10):
            while plane.upstreams.open_connections or plane.active_connections:
                await asyncio.sleep(0.05)
    finally:
        writer.close()
    assert plane.refusal_counts["client_write_timeout"] == 1
