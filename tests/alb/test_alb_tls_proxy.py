"""TLS termination with SNI (two certificates, openssl-made) and PROXY v2 from an NLB."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl

import httpx
import pytest

from marchproxy_common.wire.proxy_protocol import build_v2
from tests.alb.alb_support import make_cert, raw_exchange, route, tls_get


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl CLI is required for the TLS tests")
    d = tmp_path_factory.mktemp("alb-certs")
    return {n: make_cert(d, n) for n in ("a.example.com", "b.example.org")}


async def test_tls_sni_two_certificates(alb_factory, backends, certs) -> None:
    alb = await alb_factory(alb_tls_port=0)
    b = await backends()
    (ca, ka), (cb, kb) = certs["a.example.com"], certs["b.example.org"]
    await alb.configure(
        [route("all", b.url)],
        {
            "tls": {
                "certificates": [
                    {"server_names": ["a.example.com"], "cert_file": ca, "key_file": ka},
                    {"server_names": ["*.example.org"], "cert_file": cb, "key_file": kb},
                ]
            }
        },
    )
    port = alb.hooks.tls_address.port
    cn, data = await tls_get(port, "a.example.com", ca, "/echo/a")
    assert cn == "a.example.com"
    assert data.startswith(b"HTTP/1.1 200")
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["headers"]["X-Forwarded-Proto"] == "https"
    cn, data = await tls_get(port, "b.example.org", cb, "/echo/b")
    assert cn == "b.example.org"
    assert data.startswith(b"HTTP/1.1 200")
    # curl, with SNI from --resolve
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--cacert",
        cb,
        "--resolve",
        f"b.example.org:{port}:127.0.0.1",
        f"https://b.example.org:{port}/echo/curl",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert json.loads(out)["path"] == "/echo/curl"
    assert alb.hooks.status()["tls_server_names"] == ["a.example.com", "*.example.org"]


async def test_bad_certificate_config_rejected(alb_factory) -> None:
    alb = await alb_factory()
    errors = await alb.hooks.apply_config(
        {
            "modules": [
                {
                    "name": "alb",
                    "config": {
                        "tls": {
                            "certificates": [
                                {
                                    "server_names": ["x"],
                                    "cert_file": "/nonexistent.pem",
                                    "key_file": "/nope",
                                }
                            ]
                        }
                    },
                }
            ],
            "routes": [],
        }
    )
    assert errors and "certificate" in errors[0]


async def test_proxy_v2_header_gives_real_client_address(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    reader, writer = await asyncio.open_connection("127.0.0.1", alb.port)
    try:
        writer.write(
            build_v2(("203.0.113.7", 40000), ("127.0.0.1", alb.port))
            + b"GET /echo/pp HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(10):
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["headers"]["X-Forwarded-For"] == "203.0.113.7"
    # and a plain client on the same port still works (mode "optional")
    async with httpx.AsyncClient() as c:
        r = await c.get(alb.url + "/echo/plain")
    assert r.json()["headers"]["X-Forwarded-For"] == "127.0.0.1"


async def test_untrusted_source_cannot_claim_another_address(alb_factory, backends) -> None:
    """Only PROXY_TRUSTED_SOURCES may send a PROXY header: from anyone else it is not
    parsed, so it cannot forge X-Forwarded-For (or steer ip_hash); it is just a bad request."""
    alb = await alb_factory(proxy_trusted_sources="10.0.0.0/8, fd00::/8")
    b = await backends()
    await alb.configure([route("all", b.url)])
    request = b"GET /echo/pp HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    v2 = build_v2(("203.0.113.7", 40000), ("127.0.0.1", alb.port))
    out = await raw_exchange(alb.port, v2 + request)
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 %d\r\n" % alb.port
    out = await raw_exchange(alb.port, v1 + request)
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert b.requests == []
    # the same untrusted peer without a header is served under its socket address
    async with httpx.AsyncClient() as c:
        r = await c.get(alb.url + "/echo/plain", headers={"X-Forwarded-For": "203.0.113.7"})
    assert r.json()["headers"]["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"


async def test_proxy_v2_then_tls_on_the_tls_listener(alb_factory, backends, certs) -> None:
    """The NLB forwards TLS untouched with a PROXY v2 header in front of the ClientHello."""
    alb = await alb_factory(alb_tls_port=0)
    b = await backends()
    ca, ka = certs["a.example.com"]
    await alb.configure(
        [route("all", b.url)],
        {
            "tls": {
                "certificates": [
                    {"server_names": ["a.example.com"], "cert_file": ca, "key_file": ka}
                ]
            }
        },
    )
    port = alb.hooks.tls_address.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_v2(("198.51.100.9", 5555), ("127.0.0.1", port)))
        await writer.drain()
        ctx = ssl.create_default_context(cafile=ca)
        async with asyncio.timeout(10):
            await writer.start_tls(ctx, server_hostname="a.example.com")
            writer.write(
                b"GET /echo/tls-pp HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    h = json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]
    assert h["X-Forwarded-For"] == "198.51.100.9"
    assert h["X-Forwarded-Proto"] == "https"


async def test_https_upstream_verified_with_ca_file_and_server_name(alb, certs) -> None:
    from aiohttp import web

    cert, key = certs["b.example.org"]
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls upstream {request.secure}")

    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=sctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        await alb.configure(
            [
                route(
                    "tls-up",
                    f"https://127.0.0.1:{port}",
                    backend={"tls_server_name": "b.example.org", "retries": 0},
                )
            ],
            {"upstream": {"ca_file": cert}},
        )
        async with httpx.AsyncClient() as c:
            r = await c.get(alb.url + "/x")
        assert r.status_code == 200 and r.text == "tls upstream True"
        # without the right name the certificate does not verify: 502, not a silent downgrade
        await alb.configure(
            [route("tls-up", f"https://127.0.0.1:{port}", backend={"retries": 0})],
            {"upstream": {"ca_file": cert}},
        )
        async with httpx.AsyncClient() as c:
            r = await c.get(alb.url + "/x")
        assert r.status_code == 502
    finally:
        await runner.cleanup()


async def test_active_health_checks_use_the_upstream_tls_settings(alb, certs) -> None:
    """https:// health checks verify with upstream.ca_file and tls_server_name, like requests."""
    from aiohttp import web

    cert, key = certs["b.example.org"]
    checks: list[str] = []

    async def health(request: web.Request) -> web.Response:
        checks.append(request.host)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_get("/{tail:.*}", lambda r: web.Response(text="tls upstream"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=sctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    hc = {"path": "/healthz", "interval": 0.05, "timeout": 2, "unhealthy_threshold": 2}
    try:
        await alb.configure(
            [
                route(
                    "tls-hc",
                    f"https://127.0.0.1:{port}",
                    backend={"tls_server_name": "b.example.org", "health_check": hc},
                )
            ],
            {"upstream": {"ca_file": cert}},
        )
        async with asyncio.timeout(15):
            while len(checks) < 5:
                await asyncio.sleep(0.02)
        assert alb.hooks.plane.pools["tls-hc"].available()
        async with httpx.AsyncClient() as c:
            r = await c.get(alb.url + "/x")
        assert r.status_code == 200 and r.text == "tls upstream"
    finally:
        await runner.cleanup()


async def handshake_cn(port: int, sni: str, cafiles: list[str]) -> str:
    """CN of the certificate the ALB presents for ``sni`` (verified, hostname not checked)."""
    ctx = ssl.create_default_context()
    for f in cafiles:
        ctx.load_verify_locations(f)
    ctx.check_hostname = False
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    try:
        peer = writer.get_extra_info("peercert")
        return dict(x[0] for x in peer["subject"])["commonName"]
    finally:
        writer.close()


async def test_certificates_load_once_off_the_loop_and_an_empty_list_clears(
    alb_factory, certs, monkeypatch
) -> None:
    import threading

    from marchproxy_alb import tls as tls_mod

    loads: list[int] = []
    real = tls_mod._load_chain

    def counting(ctx, cert):
        loads.append(threading.get_ident())
        real(ctx, cert)

    monkeypatch.setattr(tls_mod, "_load_chain", counting)
    alb = await alb_factory(alb_tls_port=0)
    (ca, ka), (cb, kb) = certs["a.example.com"], certs["b.example.org"]
    tls = {
        "certificates": [
            {"server_names": ["a.example.com"], "cert_file": ca, "key_file": ka},
            {"server_names": ["b.example.org"], "cert_file": cb, "key_file": kb},
        ]
    }
    await alb.configure([], {"tls": tls})
    assert len(loads) == 2  # each certificate once
    assert threading.get_ident() not in loads  # never on the event loop's thread
    port = alb.hooks.tls_address.port
    assert await handshake_cn(port, "b.example.org", [ca, cb]) == "b.example.org"
    assert await handshake_cn(port, "unknown.test", [ca, cb]) == "a.example.com"  # default
    await alb.configure([], {"tls": {"certificates": []}})
    assert alb.hooks.status()["tls_server_names"] == []
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake_cn(port, "a.example.com", [ca, cb])


async def test_wildcard_certificate_covers_exactly_one_label(alb_factory, certs) -> None:
    alb = await alb_factory(alb_tls_port=0)
    (ca, ka), (cb, kb) = certs["a.example.com"], certs["b.example.org"]
    await alb.configure(
        [],
        {
            "tls": {
                "certificates": [
                    {"server_names": ["a.example.com"], "cert_file": ca, "key_file": ka},
                    {"server_names": ["*.example.org"], "cert_file": cb, "key_file": kb},
                ]
            }
        },
    )
    port = alb.hooks.tls_address.port
    assert await handshake_cn(port, "b.example.org", [ca, cb]) == "b.example.org"
    # RFC 6125 §6.4.3: "*" is one label, so these get the default certificate instead
    assert await handshake_cn(port, "x.b.example.org", [ca, cb]) == "a.example.com"
    assert await handshake_cn(port, "example.org", [ca, cb]) == "a.example.com"
    sni = alb.hooks.sni
    assert sni.context_for("B.Example.Org.") is not None
    assert sni.context_for("x.b.example.org") is None
