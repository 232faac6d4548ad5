"""The ALB as a reverse proxy, end to end: real aiohttp/httpx/raw-socket clients, real aiohttp
backends, everything on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import httpx
import structlog

from tests.alb.alb_support import raw_exchange, route


async def test_basic_get_sets_forwarding_headers(alb, backends) -> None:
    b = await backends("b1")
    await alb.configure([route("all", b.url)])
    hdrs = {"X-Request-ID": "abc-123"}
    async with aiohttp.ClientSession() as s, s.get(alb.url + "/echo?x=1", headers=hdrs) as r:
        assert r.status == 200
        assert r.headers["X-Request-ID"] == "abc-123"
        assert "marchproxy-alb" in r.headers["Via"]
        body = await r.json()
    h = body["headers"]
    assert body["path"] == "/echo?x=1"
    assert h["X-Forwarded-For"] == "127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == f"127.0.0.1:{alb.port}"
    assert h["Forwarded"].startswith("for=127.0.0.1;proto=http")
    assert h["Via"] == "1.1 marchproxy-alb"
    assert h["X-Request-ID"] == "abc-123"
    assert h["Host"] == f"127.0.0.1:{alb.port}"


async def test_request_id_generated_and_hop_by_hop_removed(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    hdrs = {
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "1",
        "TE": "trailers",
        "Proxy-Connection": "x",
    }
    async with aiohttp.ClientSession() as s, s.get(alb.url + "/echo", headers=hdrs) as r:
        body = await r.json()
        rid = r.headers["X-Request-ID"]
    assert len(rid) == 32
    h = {k.lower() for k in body["headers"]}
    assert "x-secret" not in h and "te" not in h and "proxy-connection" not in h
    assert body["headers"]["X-Request-ID"] == rid


async def test_keepalive_reuses_one_upstream_connection(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn) as s:
        for i in range(25):
            async with s.get(f"{alb.url}/echo/{i}") as r:
                assert r.status == 200
                await r.read()
    assert len(b.requests) == 25
    assert len(b.peers) == 1, b.peers
    assert alb.hooks.plane.total_connections == 1


async def test_chunked_both_ways(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])

    async def gen():
        for _ in range(50):
            yield b"y" * 4096

    async with aiohttp.ClientSession() as s:
        async with s.post(alb.url + "/echo", data=gen()) as r:
            body = await r.json()
        assert body["body_len"] == 50 * 4096
        assert body["chunked"] is True
        async with s.get(alb.url + "/stream?n=30&size=1000") as r:
            assert r.headers.get("Transfer-Encoding") == "chunked"
            data = await r.read()
        assert data == b"x" * 30000


async def test_httpx_content_length_upload(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    async with httpx.AsyncClient() as c:
        r = await c.put(alb.url + "/echo", content=b"z" * 100_000)
    assert r.status_code == 200
    assert r.json()["body_len"] == 100_000
    assert r.json()["chunked"] is False


async def test_no_route_404_and_upstream_refused_502(alb, backends) -> None:
    b = await backends()
    await b.stop()  # nothing listens on that port any more
    await alb.configure([route("dead", b.url, match={"path": "/dead"}, backend={"retries": 0})])
    async with httpx.AsyncClient() as c:
        r = await c.get(alb.url + "/nowhere")
        assert r.status_code == 404
        assert r.json()["error"] == "no_route"
        r = await c.get(alb.url + "/dead")
        assert r.status_code == 502
        assert r.json()["error"] == "bad_gateway"
    assert alb.hooks.plane.refusal_counts["no_route"] == 1


async def test_upstream_timeout_504(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("slow", b.url, backend={"timeout": 0.3})])
    async with httpx.AsyncClient() as c:
        r = await c.get(alb.url + "/slow?delay=1.5")
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"


async def test_no_healthy_backend_503(alb, backends) -> None:
    b = await backends()
    b.health_status = 500
    await alb.configure(
        [
            route(
                "hc",
                b.url,
                backend={
                    "health_check": {
                        "path": "/healthz",
                        "interval": 0.05,
                        "unhealthy_threshold": 2,
                        "timeout": 1,
                    }
                },
            )
        ]
    )
    pool = alb.hooks.plane.pools["hc"]
    async with asyncio.timeout(15):
        while pool.available():
            await asyncio.sleep(0.02)
    async with httpx.AsyncClient() as c:
        r = await c.get(alb.url + "/x")
        assert r.status_code == 503
        assert r.json()["error"] == "no_healthy_backend"
        b.health_status = 200
        async with asyncio.timeout(15):
            while not pool.available():
                await asyncio.sleep(0.02)
        r = await c.get(alb.url + "/x")
        assert r.status_code == 200


async def test_malformed_request_400_and_close(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    out = await raw_exchange(alb.port, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in out
    out = await raw_exchange(alb.port, b"\x16\x03\x01garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    # RFC 9112 §3.2: no Host, or two of them
    out = await raw_exchange(alb.port, b"GET / HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    out = await raw_exchange(alb.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    # both framings at once is a smuggling vector: refused
    out = await raw_exchange(
        alb.port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b.requests == []


async def test_pipelined_requests_answered_in_order(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    reqs = (
        b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
        + b"GET /echo/last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    out = await raw_exchange(alb.port, reqs)
    assert out.count(b"HTTP/1.1 200 OK") == 6
    positions = [out.find(b'"/echo/%d"' % i) for i in range(5)] + [out.find(b'"/echo/last"')]
    assert all(p > 0 for p in positions)
    assert positions == sorted(positions)


async def test_expect_100_continue(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(10):
            line = await reader.readuntil(b"\r\n\r\n")
        assert line.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            lines = head.split(b"\r\n")
            cl = [ln for ln in lines if ln.lower().startswith(b"content-length")]
            length = int(cl[0].split(b":")[1])
            body = json.loads(await reader.readexactly(length))
        assert body["body_len"] == 5
        assert "Expect" not in body["headers"]
    finally:
        writer.close()


async def test_limits_413_431_414(alb_factory, backends) -> None:
    alb = await alb_factory(alb_max_header_bytes=1024, alb_max_request_line=256)
    b = await backends()
    await alb.configure([route("all", b.url, max_body_size=1000)])
    async with httpx.AsyncClient() as c:
        r = await c.post(alb.url + "/echo", content=b"x" * 2000)
        assert r.status_code == 413
        r = await c.get(alb.url + "/echo", headers={"X-Big": "v" * 2000})
        assert r.status_code == 431
        r = await c.get(alb.url + "/" + "p" * 400)
        assert r.status_code == 414

        async def gen():
            for _ in range(10):
                yield b"q" * 500

        r = await c.post(alb.url + "/echo", content=gen())
        assert r.status_code == 413
    counts = alb.hooks.plane.refusal_counts
    assert counts["body_too_large"] == 2
    assert counts["headers_too_large"] == 1


async def test_slowloris_header_timeout_408(alb_factory, backends) -> None:
    alb = await alb_factory(alb_header_timeout=0.3)
    b = await backends()
    await alb.configure([route("all", b.url)])
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        async with asyncio.timeout(10):
            out = await reader.read()
        assert out.startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()
    assert alb.hooks.plane.refusal_counts["header_timeout"] == 1


async def test_curl_get(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-o",
        "-",
        "-w",
        "%{http_code}",
        f"{alb.url}/echo?via=curl",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out.endswith(b"200")
    assert json.loads(out[:-3])["path"] == "/echo?via=curl"


async def test_byte_by_byte_pipelined_chunked_requests(alb, backends) -> None:
    """Every parser state boundary crossed between reads: one byte per TCP segment."""
    b = await backends()
    await alb.configure([route("all", b.url)])
    reqs = (
        b"POST /echo/one HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"PUT /echo/two HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nwxyz"
        b"GET /echo/three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i in range(len(reqs)):
            writer.write(reqs[i : i + 1])
            await writer.drain()
            if i % 16 == 0:
                await asyncio.sleep(0)
        out = b""
        async with asyncio.timeout(20):
            while chunk := await reader.read(65536):
                out += chunk
    finally:
        writer.close()
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert b'"body_len": 5' in out and b'"body_len": 4' in out
    assert out.find(b"/echo/one") < out.find(b"/echo/two") < out.find(b"/echo/three")


async def test_structured_access_log(alb_factory, backends) -> None:
    alb = await alb_factory(alb_access_log=True)
    b = await backends()
    await alb.configure([route("logged", b.url)])
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient() as c:
            await c.get(alb.url + "/echo/log", headers={"X-Request-ID": "rid-7"})
    access = [e for e in logs if e["event"] == "access"]
    assert len(access) == 1
    e = access[0]
    assert (e["method"], e["path"], e["status"], e["route"]) == ("GET", "/echo/log", 200, "logged")
    assert e["request_id"] == "rid-7" and e["target"] == b.url and e["duration_ms"] >= 0


async def test_absolute_form_target_routes_by_its_authority(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("abs", b.url, match={"host": "api.example.com"})])
    out = await raw_exchange(
        alb.port,
        b"GET http://api.example.com/echo/abs?q=1 HTTP/1.1\r\nHost: other\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200")
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/echo/abs?q=1"
    assert body["headers"]["Host"] == "api.example.com"
