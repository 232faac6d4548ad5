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
