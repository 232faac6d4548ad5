"""Consistent hashing through the proxy: on a cookie, and on the client IP (ip_hash), with
client addresses carried in PROXY v2 headers from a trusted (loopback) NLB."""

from __future__ import annotations

import asyncio

import httpx

from marchproxy_common.wire.proxy_protocol import build_v2
from tests.alb.alb_support import route


async def test_cookie_hash_is_sticky_per_session(alb, backends) -> None:
    bs = [await backends(f"b{i}") for i in range(3)]
    await alb.configure(
        [
            route(
                "sticky",
                [b.url for b in bs],
                backend={"load_balancing": "consistent_hash", "hash_on": {"cookie": "session"}},
            )
        ]
    )
    seen: dict[str, set[str]] = {}
    async with httpx.AsyncClient() as c:
        for i in range(48):
            sid = f"s{i % 12}"
            cookie = f"theme=dark; session={sid}; lang=en"
            r = await c.get(alb.url + "/who", headers={"Cookie": cookie})
            assert r.status_code == 200
            seen.setdefault(sid, set()).add(r.text)
        # no cookie: falls back to the client IP, which is one address here
        fallback = {(await c.get(alb.url + "/who")).text for _ in range(6)}
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len({next(iter(v)) for v in seen.values()}) > 1  # sessions spread over targets
    assert len(fallback) == 1


async def _get_as(port: int, client_ip: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            build_v2((client_ip, 40000), ("127.0.0.1", port))
            + b"GET /who HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(10):
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    return data.split(b"\r\n\r\n", 1)[1].decode()


async def test_ip_hash_is_sticky_per_client_address(alb, backends) -> None:
    bs = [await backends(f"b{i}") for i in range(3)]
    await alb.configure(
        [route("by-ip", [b.url for b in bs], backend={"load_balancing": "ip_hash"})]
    )
    seen: dict[str, set[str]] = {}
    for i in range(36):
        ip = f"198.51.100.{i % 12 + 1}"
        seen.setdefault(ip, set()).add(await _get_as(alb.port, ip))
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len({next(iter(v)) for v in seen.values()}) > 1
    xff = {r["headers"]["X-Forwarded-For"] for b in bs for r in b.requests}
    assert xff == set(seen)  # hashed on the PROXY source, not the loopback peer
