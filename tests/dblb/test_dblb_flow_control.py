"""Backpressure between a client and its server must not outlive their link."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import psycopg
import pytest

from marchproxy_common.wire.postgres import BackendDecoder
from marchproxy_common.wire.postgres import encoder as enc
from tests.dblb.dblb_helpers import dsn, pg_config, running_dblb

pytestmark = pytest.mark.integration
ROW_BYTES = 5_000_000


async def _slow_reader_of_a_big_row(port: int) -> int:
    """A raw client that reads a 5 MB row in small sips; returns the DataRow payload size."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        ready = enc.ready_for_query(b"I")

        async def until_ready() -> list[Any]:
            chunks: list[bytes] = []
            tail = b""
            for _ in range(100_000):
                chunk = await loop.sock_recv(sock, 8192)
                assert chunk, "proxy closed the connection"
                chunks.append(chunk)
                tail = (tail + chunk)[-len(ready) :]
                if tail == ready:
                    decoder = BackendDecoder(max_message_len=ROW_BYTES * 2)
                    return decoder.feed(b"".join(chunks))
                await asyncio.sleep(0.0005)  # slow: the proxy's buffer to us fills up
            raise AssertionError("no ReadyForQuery")

        await loop.sock_sendall(sock, enc.startup_message({"user": "postgres", "database": "test"}))
        await until_ready()
        await loop.sock_sendall(sock, enc.query(f"select repeat('x', {ROW_BYTES})"))
        msgs = await until_ready()
        rows = [m for m in msgs if m.type == ord("D")]
        await loop.sock_sendall(sock, enc.terminate())
        return len(rows[0].body)
    finally:
        sock.close()


async def test_pause_of_a_slow_client_does_not_stick_to_the_pooled_server() -> None:
    async with running_dblb(pg_config(default_pool_size=1, query_wait_timeout=10)) as h:
        async with asyncio.timeout(60):
            for _ in range(2):
                size = await _slow_reader_of_a_big_row(h.port)
                assert size >= ROW_BYTES
                # the next client gets the same (only) server: it must still be read from
                async with await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c:
                    async with asyncio.timeout(5):
                        cur = await c.execute("select 'next client'")
                        assert await cur.fetchone() == ("next client",)
        pool = h.manager.pools[("test", "postgres")]
        assert len(pool.servers) == 1
        assert not any(s.reading_paused for s in pool.servers)
