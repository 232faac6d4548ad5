"""Startup-phase rules that keep clear-text bytes and unauthenticated clients in their place."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import psycopg
import pytest

from marchproxy_common.wire.postgres import encoder as enc
from tests.dblb.dblb_helpers import pg_config, running_dblb, self_signed_cert

pytestmark = pytest.mark.integration
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
STARTUP = enc.startup_message({"user": "postgres", "database": "test"})


async def _one_write_then_read_all(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)  # a single segment: the proxy reads request and rest together
        async with asyncio.timeout(10):
            return await reader.read()  # until the proxy closes
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_packet", "message"),
    [
        (enc.ssl_request(), "received unencrypted data after SSL request"),
        (GSSENC_REQUEST, "received unencrypted data after GSSAPI encryption request"),
    ],
)
async def test_clear_text_after_an_encryption_request_is_refused(
    tmp_path: Path, request_packet: bytes, message: str
) -> None:
    cert, key = await self_signed_cert(tmp_path)
    cfg = pg_config(client_tls_mode="require", client_tls_cert=str(cert), client_tls_key=str(key))
    async with running_dblb(cfg) as h:
        reply = await _one_write_then_read_all(h.port, request_packet + STARTUP)
        # no 'S'/'N' answer and no AuthenticationOk: one ErrorResponse, then close
        assert reply[:1] == b"E", reply[:40]
        assert b"C08P01\x00" in reply and message.encode() in reply
        assert b"R\x00\x00\x00\x08\x00\x00\x00\x00" not in reply
        assert h.protocol_errors == 1
        # a client that waits for the answer is served (over TLS, as required)
        conninfo = f"host=127.0.0.1 port={h.port} user=postgres dbname=test sslmode=require"
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as c:
            assert c.pgconn.ssl_in_use
            cur = await c.execute("select 'ok'")
            assert await cur.fetchone() == ("ok",)


async def test_request_answered_before_the_startup_arrives_is_fine() -> None:
    async with running_dblb(pg_config()) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        try:
            async with asyncio.timeout(10):
                for request_packet in (GSSENC_REQUEST, enc.ssl_request()):
                    writer.write(request_packet)
                    assert await reader.readexactly(1) == b"N"
                writer.write(STARTUP)
                data = b""
                while not data.endswith(enc.ready_for_query()):
                    chunk = await reader.read(65536)
                    assert chunk, data
                    data += chunk
        finally:
            writer.close()


async def test_ssl_request_without_client_tls_in_any_split() -> None:
    """Without client TLS a whole SSLRequest read is answered 'N' at once (no decoder); one cut
    in two reads, or sent twice, is still 'N', and clear text along with it still refused."""
    async with running_dblb(pg_config()) as h:
        reply = await _one_write_then_read_all(h.port, enc.ssl_request() + STARTUP)
        assert reply[:1] == b"E" and b"received unencrypted data after SSL request" in reply
        assert h.protocol_errors == 1
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        try:
            async with asyncio.timeout(10):
                request = enc.ssl_request()
                writer.write(request[:3])
                await writer.drain()
                await asyncio.sleep(0.05)  # (two reads on the proxy's side)
                writer.write(request[3:])
                assert await reader.readexactly(1) == b"N"
                writer.write(request)
                assert await reader.readexactly(1) == b"N"
                writer.write(STARTUP[:5])
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(STARTUP[5:])
                data = b""
                while not data.endswith(enc.ready_for_query()):
                    chunk = await reader.read(65536)
                    assert chunk, data
                    data += chunk
                assert data.startswith(enc.authentication_ok())
        finally:
            writer.close()
        # psycopg / libpq (sslmode=prefer: SSLRequest first, then in clear)
        conninfo = f"host=127.0.0.1 port={h.port} user=postgres dbname=test sslmode=prefer"
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as c:
            assert not c.pgconn.ssl_in_use
            cur = await c.execute("select 'ok'")
            assert await cur.fetchone() == ("ok",)


WILDCARD_TO_TEST = {"*": {"host": "127.0.0.1", "port": 5432, "dbname": "test"}}


async def test_unauthenticated_clients_create_no_pools() -> None:
    cfg = pg_config(
        auth_type="md5", users={"postgres": {"password": "s3cret"}}, databases=WILDCARD_TO_TEST
    )
    async with running_dblb(cfg) as h:
        for i in range(20):
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(
                    f"host=127.0.0.1 port={h.port} user=postgres dbname=junk{i} password=wrong"
                )
        assert h.manager.pools == {}
        conninfo = f"host=127.0.0.1 port={h.port} user=postgres dbname=real password=s3cret"
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as c:
            cur = await c.execute("select current_database()")
            assert await cur.fetchone() == ("test",)
        assert list(h.manager.pools) == [("real", "postgres")]


async def test_passthrough_failures_create_no_pools() -> None:
    inner_cfg = pg_config(auth_type="scram-sha-256", users={"postgres": {"password": "s3cret"}})
    async with running_dblb(inner_cfg) as inner:
        outer_cfg = pg_config(
            auth_type="passthrough",
            databases={"*": {"host": "127.0.0.1", "port": inner.port, "dbname": "test"}},
        )
        async with running_dblb(outer_cfg) as outer:
            for i in range(5):
                with pytest.raises(psycopg.OperationalError, match="password authentication"):
                    await psycopg.AsyncConnection.connect(
                        f"host=127.0.0.1 port={outer.port} user=postgres dbname=junk{i} "
                        "password=wrong"
                    )
            assert outer.manager.pools == {}
            conninfo = f"host=127.0.0.1 port={outer.port} user=postgres dbname=ok password=s3cret"
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as c:
                cur = await c.execute("select 'in'")
                assert await cur.fetchone() == ("in",)
            assert list(outer.manager.pools) == [("ok", "postgres")]


def _conninfo(port: int, db: str) -> str:
    return f"host=127.0.0.1 port={port} user=postgres dbname={db}"


async def test_pool_cap_evicts_unused_pools_and_refuses_when_all_are_busy() -> None:
    cfg = pg_config(max_pools=2, databases=WILDCARD_TO_TEST)
    async with running_dblb(cfg) as h:
        a = await psycopg.AsyncConnection.connect(_conninfo(h.port, "a"), autocommit=True)
        b = await psycopg.AsyncConnection.connect(_conninfo(h.port, "b"), autocommit=True)
        try:
            await a.execute("select 1")
            await b.execute("select 1")
            with pytest.raises(psycopg.OperationalError, match="too many pools"):
                await psycopg.AsyncConnection.connect(_conninfo(h.port, "c"))
            b_pool = h.manager.pools[("b", "postgres")]
            await b.close()
            # b's pool is unused now: it makes room for c, and its servers are closed
            async with await psycopg.AsyncConnection.connect(
                _conninfo(h.port, "c"), autocommit=True
            ) as c:
                cur = await c.execute("select current_database()")
                assert await cur.fetchone() == ("test",)
            assert sorted(h.manager.pools) == [("a", "postgres"), ("c", "postgres")]
            async with asyncio.timeout(10):
                while b_pool.servers:
                    await asyncio.sleep(0.02)
            cur = await a.execute("select 'a still works'")
            assert await cur.fetchone() == ("a still works",)
        finally:
            await a.close()
            await b.close()


async def test_unused_pools_are_evicted_after_pool_idle_timeout() -> None:
    cfg = pg_config(pool_idle_timeout=0.3, databases=WILDCARD_TO_TEST)
    async with running_dblb(cfg) as h:
        for db in ("x", "y"):
            async with await psycopg.AsyncConnection.connect(
                _conninfo(h.port, db), autocommit=True
            ) as c:
                await c.execute("select 1")
        held = await psycopg.AsyncConnection.connect(_conninfo(h.port, "z"), autocommit=True)
        try:
            await held.execute("select 1")
            assert len(h.manager.pools) == 3
            async with asyncio.timeout(15):
                while len(h.manager.pools) > 1:  # the janitor runs once a second
                    await asyncio.sleep(0.1)
            assert list(h.manager.pools) == [("z", "postgres")]  # the one with a client stays
            cur = await held.execute("select 'kept'")
            assert await cur.fetchone() == ("kept",)
        finally:
            await held.close()
