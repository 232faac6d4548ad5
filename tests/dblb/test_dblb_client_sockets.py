"""The DBLB's client sockets (marchproxy_common.net.sockets): churn, vanishing clients, draining."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import psycopg
import pytest

from marchproxy_common.net.sockets import ClientListener, SocketTransport
from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_dblb.module import DblbHooks
from marchproxy_dblb.pool import ServerConnection
from tests.dblb.dblb_helpers import dsn, pg_config, run_client, running_dblb

pytestmark = pytest.mark.integration


def _listener(hooks: DblbHooks) -> ClientListener:
    server = hooks._server
    assert isinstance(server, ClientListener)
    return server


async def _until_no_clients(hooks: DblbHooks) -> None:
    listener = _listener(hooks)
    async with asyncio.timeout(10):
        while hooks.manager.client_count or listener.connections:
            await asyncio.sleep(0.01)
    # what is left on the poller are the pool's servers (they share it with the clients)
    left = [t.get_protocol() for t in listener._poller.transports.values()]
    assert all(isinstance(p, ServerConnection) for p in left), left
    assert len(left) == sum(len(p.servers) for p in hooks.manager.every_pool())


async def _logged_in(port: int) -> socket.socket:
    """A raw client, logged in (after an SSLRequest answered 'N', as libpq does)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, struct.pack("!II", 8, 80877103))
    assert await loop.sock_recv(sock, 1) == b"N"
    await loop.sock_sendall(sock, enc.startup_message({"user": "postgres", "database": "test"}))
    seen = b""
    async with asyncio.timeout(10):
        while not seen.endswith(enc.ready_for_query(b"I")):
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "closed during login"
            seen += chunk
    return sock


async def test_connect_per_transaction_leaves_no_socket_behind(tmp_path: Path) -> None:
    script = tmp_path / "one.sql"
    script.write_text("SELECT 1;\n")
    async with running_dblb(pg_config(default_pool_size=2)) as h:
        code, out = await run_client(
            "pgbench", "-n", "-C", "-c", "4", "-j", "2", "-t", "50", "-f", str(script),
            "-h", "127.0.0.1", "-p", str(h.port), "-U", "postgres", "test",
        )  # fmt: skip
        assert code == 0, out
        assert "number of transactions actually processed: 200/200" in out
        await _until_no_clients(h)
        assert h.total_connections >= 200  # (pgbench opens one more first)


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_client_that_vanishes_without_terminate_is_forgotten(how: str) -> None:
    async with running_dblb(pg_config(default_pool_size=1)) as h:
        sock = await _logged_in(h.port)
        await asyncio.get_running_loop().sock_sendall(sock, enc.query("select pg_sleep(0.05)"))
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await _until_no_clients(h)
        # the pool's only server came back and serves the next client
        async with await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as conn:
            cur = await conn.execute("select 42")
            assert await cur.fetchone() == (42,)


async def test_stop_accepting_keeps_the_clients_it_has() -> None:
    async with running_dblb(pg_config()) as h:
        conn: Any = await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True)
        try:
            await h.stop_accepting()
            assert not _listener(h).is_serving()
            cur = await conn.execute("select 7")
            assert await cur.fetchone() == (7,)
            with pytest.raises(psycopg.OperationalError):
                await psycopg.AsyncConnection.connect(dsn(h.port, connect_timeout="3"))
        finally:
            await conn.close()
        await _until_no_clients(h)


async def test_a_reply_bigger_than_the_socket_buffer_arrives_whole() -> None:
    """Writes the kernel does not take at once wait in the transport and go out in order."""
    async with running_dblb(pg_config()) as h:
        conn = await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True)
        try:
            for size in (100_000, 3_000_000):
                cur = await conn.execute(
                    "select repeat('x', %s), g from generate_series(1, 3) g", (size,)
                )
                rows = await cur.fetchall()
                assert [(len(r[0]), r[1]) for r in rows] == [(size, 1), (size, 2), (size, 3)]
        finally:
            await conn.close()


async def test_pooled_servers_share_the_clients_poller() -> None:
    """Server sockets go on the clients' poller (one poll per wake-up for both sides), and a
    server closed by the pool leaves it."""
    async with running_dblb(pg_config(default_pool_size=1)) as h:
        poller = _listener(h)._poller
        conn: Any = await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True)
        try:
            cur = await conn.execute("select 42")
            assert await cur.fetchone() == (42,)
            (pool,) = h.manager.pools.values()
            (server,) = pool.servers
            assert isinstance(server.transport, SocketTransport)
            assert poller.transports[server.transport.get_extra_info("socket").fileno()] is (
                server.transport
            )
        finally:
            await conn.close()
        server.close()
        async with asyncio.timeout(10):
            while server in pool.servers or len(poller.transports) > 0:
                await asyncio.sleep(0.01)
