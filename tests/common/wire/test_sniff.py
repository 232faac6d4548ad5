"""classify(): real client openings, prefixes, random splits and garbage."""

from __future__ import annotations

import asyncio
import ssl
import struct

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_common.wire.sniff import (
    HTTP2_PREFACE,
    MAX_SNIFF_BYTES,
    NEED_MORE,
    UNKNOWN,
    Http2Details,
    HttpDetails,
    Match,
    NeedMore,
    PostgresDetails,
    RedisDetails,
    RtmpDetails,
    SniffedProtocol,
    TlsDetails,
    Unknown,
    classify,
)

HYP = settings(max_examples=100, deadline=None)


def client_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello from the ssl module (OpenSSL)."""
    ctx = ssl.create_default_context()
    if sni is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def refragment(records: bytes, size: int) -> bytes:
    """Re-split the handshake bytes of TLS records into records of at most ``size`` bytes."""
    body = bytearray()
    pos = 0
    while pos < len(records):
        n = struct.unpack_from("!H", records, pos + 3)[0]
        body += records[pos + 5 : pos + 5 + n]
        pos += 5 + n
    out = bytearray()
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return bytes(out)


def pg_startup(params: dict[str, str], version: int = 196608) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", 8 + len(body), version) + body


def tls(sni: str | None, alpn: tuple[str, ...] = ()) -> Match:
    return Match(SniffedProtocol.TLS, TlsDetails(sni, alpn, True))


# ------------------------------------------------------------------ known openings


def test_tls_sni_alpn_real_client_hello() -> None:
    raw = client_hello("Api.Example.com", ["h2", "http/1.1"])
    assert classify(raw) == tls("api.example.com", ("h2", "http/1.1"))
    assert classify(raw + b"\x17\x03\x03junk") == tls("api.example.com", ("h2", "http/1.1"))
    assert classify(client_hello(None)) == tls(None)


@pytest.mark.parametrize("size", [1, 7, 64, 200])
def test_tls_client_hello_split_over_records(size: int) -> None:
    raw = refragment(client_hello("db.internal", ["postgresql"]), size)
    assert classify(raw) == tls("db.internal", ("postgresql",))
    assert classify(raw[: len(raw) // 2]) is NEED_MORE


def test_tls_huge_client_hello_gives_up_without_sni() -> None:
    body = b"\x01" + (40000).to_bytes(3, "big") + b"\x03\x03" + b"\0" * 100
    raw = b"\x16\x03\x01" + struct.pack("!H", len(body)) + body
    assert classify(raw) == Match(SniffedProtocol.TLS, TlsDetails())
    assert classify(raw, final=True) == Match(SniffedProtocol.TLS, TlsDetails())
    assert classify(raw[:6]) is NEED_MORE


def test_tls_incomplete_at_deadline() -> None:
    raw = client_hello("a.example")
    assert classify(raw[:50], final=True) == Match(SniffedProtocol.TLS, TlsDetails())
    assert classify(b"\x16\x03\x01\x00\x00") is UNKNOWN
    assert classify(b"\x16\x01") is UNKNOWN


def test_http1() -> None:
    req = b"GET /index.html?q=1 HTTP/1.1\r\nUser-Agent: x\r\nHOST:  shop.example \r\n\r\nbody"
    assert classify(req) == Match(
        SniffedProtocol.HTTP, HttpDetails("GET", "/index.html?q=1", "HTTP/1.1", "shop.example")
    )
    assert classify(req[:20]) is NEED_MORE
    assert classify(req[:20], final=True) == Match(SniffedProtocol.HTTP, HttpDetails("GET"))
    absolute = b"POST http://proxy.example:8080/x HTTP/1.0\r\n\r\n"
    assert classify(absolute) == Match(
        SniffedProtocol.HTTP,
        HttpDetails("POST", "http://proxy.example:8080/x", "HTTP/1.0", "proxy.example:8080"),
    )
    connect = b"CONNECT db.example:5432 HTTP/1.1\r\n\r\n"
    match = classify(connect)
    assert isinstance(match, Match)
    assert match.details == HttpDetails("CONNECT", "db.example:5432", "HTTP/1.1", "db.example:5432")
    assert classify(b"M-SEARCH * HTTP/1.1\r\n\r\n") == Match(
        SniffedProtocol.HTTP, HttpDetails("M-SEARCH", "*", "HTTP/1.1", None)
    )


def test_http1_head_too_big_is_still_http() -> None:
    req = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_SNIFF_BYTES
    assert classify(req) == Match(SniffedProtocol.HTTP, HttpDetails("GET", "/", "HTTP/1.1"))


def test_http2_preface() -> None:
    assert classify(HTTP2_PREFACE + b"\0\0\0\x04\0\0\0\0\0") == Match(
        SniffedProtocol.HTTP2, Http2Details()
    )
    assert classify(HTTP2_PREFACE[:10]) is NEED_MORE
    assert classify(b"PRI * HTTP/2.0\r\n", final=True) == Match(
        SniffedProtocol.HTTP2, Http2Details()
    )


def test_postgres() -> None:
    raw = pg_startup({"user": "alice", "database": "shop", "application_name": "psql"})
    assert classify(raw) == Match(
        SniffedProtocol.POSTGRESQL,
        PostgresDetails(
            "startup",
            "alice",
            "shop",
            (3, 0),
            (("user", "alice"), ("database", "shop"), ("application_name", "psql")),
        ),
    )
    no_db = classify(pg_startup({"user": "bob"}))
    assert isinstance(no_db, Match)
    assert isinstance(no_db.details, PostgresDetails)
    assert no_db.details.database == "bob"
    ssl_req = struct.pack("!II", 8, 80877103)
    assert classify(ssl_req) == Match(SniffedProtocol.POSTGRESQL, PostgresDetails("ssl_request"))
    gss = struct.pack("!II", 8, 80877104)
    assert classify(gss) == Match(SniffedProtocol.POSTGRESQL, PostgresDetails("gssenc_request"))
    cancel = struct.pack("!IIII", 16, 80877102, 1234, 5678)
    assert classify(cancel) == Match(SniffedProtocol.POSTGRESQL, PostgresDetails("cancel_request"))
    assert classify(ssl_req[:5]) is NEED_MORE
    assert classify(struct.pack("!II", 20000, 196608)) is UNKNOWN
    assert classify(struct.pack("!II", 8, 12345)) is UNKNOWN


async def test_postgres_real_psycopg_openings() -> None:
    """Capture what libpq (psycopg) really sends first, with and without TLS preference."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while len(data) < 8 or len(data) < int.from_bytes(data[:4], "big"):
            chunk = await reader.read(4096)
            if not chunk:
                break
            data += chunk
        seen.append(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(20):
            for sslmode in ("disable", "prefer"):
                conninfo = (
                    f"host=127.0.0.1 port={port} user=carol dbname=orders "
                    f"sslmode={sslmode} gssencmode=disable connect_timeout=5"
                )
                with pytest.raises(psycopg.OperationalError):
                    await psycopg.AsyncConnection.connect(conninfo)
    finally:
        server.close()
        await server.wait_closed()
    startup = classify(seen[0])
    assert isinstance(startup, Match)
    assert isinstance(startup.details, PostgresDetails)
    assert (startup.details.kind, startup.details.user, startup.details.database) == (
        "startup",
        "carol",
        "orders",
    )
    assert classify(seen[1]) == Match(SniffedProtocol.POSTGRESQL, PostgresDetails("ssl_request"))


def test_rtmp() -> None:
    c0c1 = b"\x03" + b"\0\0\0\0" + b"\0\0\0\0" + bytes(range(256)) * 6
    assert classify(c0c1) == Match(SniffedProtocol.RTMP, RtmpDetails())
    assert classify(c0c1[:5]) is NEED_MORE
    assert classify(b"\x03", final=True) == Match(SniffedProtocol.RTMP, RtmpDetails())
    assert classify(b"\x06" + b"\0" * 20) == Match(SniffedProtocol.RTMP, RtmpDetails(True))


def test_redis() -> None:
    assert classify(b"*1\r\n$4\r\nPING\r\n") == Match(SniffedProtocol.REDIS, RedisDetails("PING"))
    assert classify(b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\n") == Match(
        SniffedProtocol.REDIS, RedisDetails("SET")
    )
    assert classify(b"*2\r\n$5\r\nHEL") is NEED_MORE
    assert classify(b"*2\r\n$5\r\nHEL", final=True) == Match(SniffedProtocol.REDIS, RedisDetails())
    assert classify(b"PING\r\n") == Match(SniffedProtocol.REDIS, RedisDetails("PING"))
    assert classify(b"ping\r\n") == Match(SniffedProtocol.REDIS, RedisDetails("PING"))
    assert classify(b"AUTH secret\r\n") == Match(SniffedProtocol.REDIS, RedisDetails("AUTH"))
    assert classify(b"*x\r\n") is UNKNOWN
    assert classify(b"*1\r\n:4\r\n") is UNKNOWN


def test_unknown_and_bounds() -> None:
    assert classify(b"") is NEED_MORE
    assert classify(b"", final=True) is UNKNOWN
    assert classify(b"\xff\xfe") is UNKNOWN
    assert classify(b"SSH-2.0-OpenSSH_9.2\r\n") is UNKNOWN
    assert classify(b"howdy world\r\n") is UNKNOWN
    assert classify(b"A" * (MAX_SNIFF_BYTES * 2)) is UNKNOWN


# ------------------------------------------------------------------ property tests

label = st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True)  # no IPs: those get no SNI
hostnames = st.lists(label, min_size=2, max_size=4).map(".".join)
alpn_ids = st.lists(
    st.sampled_from(["h2", "http/1.1", "postgresql", "redis", "x-custom"]),
    max_size=3,
    unique=True,
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND"])
paths = st.text("abcdefghijklmnopqrstuvwxyz0123456789/._-?=&", max_size=60).map(lambda p: "/" + p)
pg_name = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=30)


@st.composite
def tls_openings(draw: st.DrawFn) -> tuple[bytes, Match]:
    host = draw(hostnames)
    alpn = draw(alpn_ids)
    raw = client_hello(host, alpn or None)
    if draw(st.booleans()):
        raw = refragment(raw, draw(st.integers(1, 600)))
    return raw, tls(host, tuple(alpn))


@st.composite
def http_openings(draw: st.DrawFn) -> tuple[bytes, Match]:
    method, path, host = draw(methods), draw(paths), draw(hostnames)
    extra = draw(st.lists(st.tuples(label, label), max_size=4))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"X-{k}: {v}\r\n" for k, v in extra)
    raw = (head + f"Host: {host}\r\n\r\n").encode()
    return raw, Match(SniffedProtocol.HTTP, HttpDetails(method, path, "HTTP/1.1", host))


@st.composite
def pg_openings(draw: st.DrawFn) -> tuple[bytes, Match]:
    user, db = draw(pg_name), draw(pg_name)
    params = {"user": user, "database": db}
    params.update(draw(st.dictionaries(pg_name, pg_name, max_size=3)))
    params["user"], params["database"] = user, db
    details = PostgresDetails("startup", user, db, (3, 0), tuple(params.items()))
    return pg_startup(params), Match(SniffedProtocol.POSTGRESQL, details)


@st.composite
def redis_openings(draw: st.DrawFn) -> tuple[bytes, Match]:
    args = draw(st.lists(st.binary(max_size=20), min_size=0, max_size=3))
    cmd = draw(st.sampled_from(["GET", "SET", "HELLO", "CLIENT", "PING"]))
    items = [cmd.encode(), *args]
    raw = f"*{len(items)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in items)
    return raw, Match(SniffedProtocol.REDIS, RedisDetails(cmd))


PG = SniffedProtocol.POSTGRESQL
fixed_openings = st.sampled_from(
    [
        (HTTP2_PREFACE + b"\0\0\0\x04\0\0\0\0\0", Match(SniffedProtocol.HTTP2, Http2Details())),
        (b"\x03" + b"\x01" * 1536, Match(SniffedProtocol.RTMP, RtmpDetails())),
        (struct.pack("!II", 8, 80877103), Match(PG, PostgresDetails("ssl_request"))),
        (struct.pack("!IIII", 16, 80877102, 1, 2), Match(PG, PostgresDetails("cancel_request"))),
        (b"PING\r\n", Match(SniffedProtocol.REDIS, RedisDetails("PING"))),
        (b"hello there\r\n", Match(SniffedProtocol.REDIS, RedisDetails("HELLO"))),
    ]
)  # fmt: skip

openings = st.one_of(
    tls_openings(), http_openings(), pg_openings(), redis_openings(), fixed_openings
)


@HYP
@given(openings, st.data())
def test_any_prefix_is_need_more_or_the_same_match(
    case: tuple[bytes, Match], data: st.DataObject
) -> None:
    raw, expected = case
    assert classify(raw) == expected
    cut = data.draw(st.integers(0, len(raw)))
    verdict = classify(raw[:cut])
    assert verdict is NEED_MORE or verdict == expected
    final = classify(raw[:cut], final=True)
    assert not isinstance(final, NeedMore)
    if cut == len(raw):
        assert final == expected


@settings(max_examples=30, deadline=None)
@given(openings)
def test_byte_by_byte(case: tuple[bytes, Match]) -> None:
    raw, expected = case
    first_match = None
    for i in range(len(raw) + 1):
        verdict = classify(raw[:i])
        assert verdict is NEED_MORE or verdict == expected, (i, verdict)
        if first_match is None and verdict == expected:
            first_match = i
    assert first_match is not None


@HYP
@given(st.binary(max_size=600), st.booleans())
def test_garbage_never_raises(raw: bytes, final: bool) -> None:
    verdict = classify(raw, final=final)
    assert isinstance(verdict, NeedMore | Match | Unknown)
    if final:
        assert not isinstance(verdict, NeedMore)


@HYP
@given(
    st.sampled_from([b"\x16\x03\x01", b"\x00\x00", b"*", b"GET ", b"PRI", b"\x03", b"PING"]),
    st.binary(max_size=400),
)
def test_plausible_starts_with_garbage_never_raise(prefix: bytes, rest: bytes) -> None:
    verdict = classify(prefix + rest)
    assert isinstance(verdict, NeedMore | Match | Unknown)


@settings(max_examples=30, deadline=None)
@given(openings, st.binary(min_size=1, max_size=64))
def test_mutated_openings_never_raise(case: tuple[bytes, Match], noise: bytes) -> None:
    raw, _ = case
    for pos in (0, len(raw) // 3, len(raw) // 2, len(raw) - 1):
        mutated = raw[:pos] + noise + raw[pos + len(noise) :]
        assert isinstance(classify(mutated), NeedMore | Match | Unknown)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_never_needs_more_than_the_cap(seed: bytes) -> None:
    raw = (seed * (MAX_SNIFF_BYTES // len(seed) + 1))[:MAX_SNIFF_BYTES]
    assert not isinstance(classify(raw), NeedMore)
    for start in (b"\x16\x03\x01\x40\x00\x01", b"GET / HTTP/1.1\r\n", b"*1\r\n$9"):
        assert not isinstance(classify(start + raw), NeedMore)


def test_bare_lf_tolerated() -> None:
    assert classify(b"GET /a HTTP/1.0\nHost: lf.example\n\n") == Match(
        SniffedProtocol.HTTP, HttpDetails("GET", "/a", "HTTP/1.0", "lf.example")
    )
    assert classify(b"GET /a HTTP/1.0\nHost: lf.example\n") is NEED_MORE
    assert classify(b"PING\n") == Match(SniffedProtocol.REDIS, RedisDetails("PING"))
