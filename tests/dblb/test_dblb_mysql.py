"""MySQL through the DBLB to the local MariaDB (3306): mariadb CLI and pymysql."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import pymysql
import pytest

from marchproxy_common.wire.mysql import PacketDecoder, encode_packet
from marchproxy_common.wire.mysql import packets as p
from marchproxy_common.wire.mysql.auth import CACHING_SHA2, caching_sha2_scramble, native_scramble
from marchproxy_dblb.module import DblbHooks
from tests.dblb.dblb_helpers import psql, settings, unique

pytestmark = pytest.mark.integration
PASSWORD = "mp-pw-1"


def _root() -> pymysql.connections.Connection[Any]:
    return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)


@pytest.fixture
def mysql_account() -> Any:
    """A throwaway MariaDB user and database, dropped afterwards."""
    user, db = unique("mp_dblb_u"), unique("mp_dblb_db")
    conn = _root()
    try:
        with conn.cursor() as cur:
            cur.execute(f"create database {db}")
            cur.execute(f"create user '{user}'@'127.0.0.1' identified by '{PASSWORD}'")
            cur.execute(f"grant all on {db}.* to '{user}'@'127.0.0.1'")
        yield user, db
    finally:
        with conn.cursor() as cur:
            cur.execute(f"drop user if exists '{user}'@'127.0.0.1'")
            cur.execute(f"drop database if exists {db}")
        conn.close()


@contextlib.asynccontextmanager
async def mysql_dblb(
    users: dict[str, str], top: dict[str, Any] | None = None, **mysql: Any
) -> AsyncIterator[tuple[DblbHooks, int]]:
    """A DBLB with a MySQL listener; ``top`` holds settings outside the ``mysql`` section."""
    hooks = DblbHooks(settings(mysql_port=0))
    mysql_cfg = {"host": "127.0.0.1", "port": 3306, "users": users, **mysql}
    errors = await hooks.apply_config({"config": {"mysql": mysql_cfg, **(top or {})}})
    assert errors == []
    await hooks.start_data_plane()
    assert hooks.mysql_address is not None
    try:
        yield hooks, hooks.mysql_address.port
    finally:
        await hooks.close()


async def test_mariadb_cli(mysql_account: tuple[str, str]) -> None:
    user, db = mysql_account
    async with mysql_dblb({user: PASSWORD}) as (_, port):
        proc = await asyncio.create_subprocess_exec(
            "mariadb",
            "-h",
            "127.0.0.1",
            "-P",
            str(port),
            "-u",
            user,
            f"-p{PASSWORD}",
            db,
            "-N",
            "-e",
            "create table t (a int); insert into t values (1),(2); "
            "select sum(a), database() from t; drop table t",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(os.environ),
        )
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
        assert proc.returncode == 0, out
        assert out.decode().split() == ["3", db]


async def test_pymysql_pooling_reset_and_multi_statements(mysql_account: tuple[str, str]) -> None:
    user, db = mysql_account
    async with mysql_dblb({user: PASSWORD}, pool_size=2) as (hooks, port):

        def work() -> list[Any]:
            seen = []
            for _ in range(3):
                c = pymysql.connect(
                    host="127.0.0.1",
                    port=port,
                    user=user,
                    password=PASSWORD,
                    database=db,
                    client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS,
                )
                with c.cursor() as cur:
                    cur.execute("select connection_id(), @x")
                    seen.append(cur.fetchone())
                    cur.execute("set @x = 5")
                    cur.execute("create temporary table tmp (a int)")
                    cur.execute("insert into tmp values (1), (2), (3)")
                    cur.execute("select count(*) from tmp; select 'second'")
                    seen.append(cur.fetchone())
                    cur.nextset()
                    seen.append(cur.fetchone())
                c.close()
            return seen

        seen = await asyncio.to_thread(work)
        # one server connection reused by the three sessions, session state reset each time
        conn_ids = {row[0] for row in seen[0::3]}
        assert len(conn_ids) == 1
        assert [row[1] for row in seen[0::3]] == [None, None, None]
        assert seen[1::3] == [(3,)] * 3
        assert seen[2::3] == [("second",)] * 3

        def bad() -> None:
            pymysql.connect(host="127.0.0.1", port=port, user=user, password="nope", database=db)

        with pytest.raises(pymysql.err.OperationalError, match="Access denied"):
            await asyncio.to_thread(bad)
        assert hooks.auth_failures == 1


async def test_client_sent_caching_sha2_gets_auth_switch(mysql_account: tuple[str, str]) -> None:
    """A MySQL 8 style client answering with caching_sha2_password is switched to native."""
    user, db = mysql_account
    async with mysql_dblb({user: PASSWORD}) as (_, port):
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            decoder = PacketDecoder()
            queue: list[p.Packet] = []

            async def packet() -> p.Packet:
                while not queue:
                    chunk = await reader.read(4096)
                    assert chunk
                    queue.extend(decoder.feed(chunk))
                return queue.pop(0)

            greeting = p.parse_handshake((await packet()).payload)
            caps = (
                p.CLIENT_PROTOCOL_41
                | p.CLIENT_SECURE_CONNECTION
                | p.CLIENT_PLUGIN_AUTH
                | p.CLIENT_CONNECT_WITH_DB
                | p.CLIENT_DEPRECATE_EOF
            )
            resp = p.HandshakeResponse(
                caps,
                1 << 24,
                45,
                user,
                caching_sha2_scramble(PASSWORD, greeting.salt),
                db,
                CACHING_SHA2,
            )
            writer.write(encode_packet(1, p.encode_handshake_response(resp)))
            switch = await packet()
            plugin, salt = p.parse_auth_switch(switch.payload)
            assert (switch.seq, plugin) == (2, "mysql_native_password")
            writer.write(encode_packet(3, native_scramble(PASSWORD, salt)))
            ok = await packet()
            assert (ok.seq, ok.payload[:1]) == (4, b"\x00")
            writer.write(encode_packet(0, b"\x03select 41 + 1"))
            rows = []
            while True:
                pkt = await packet()
                rows.append(pkt.payload)
                if pkt.payload[:1] == b"\xfe":  # DEPRECATE_EOF: OK packet with 0xFE header
                    break
            assert b"\x0242" in rows  # the one text row: lenenc "42"
            writer.write(encode_packet(0, b"\x01"))  # COM_QUIT
            writer.close()


async def test_malformed_handshake_closes_only_that_client(mysql_account: tuple[str, str]) -> None:
    user, _ = mysql_account
    async with mysql_dblb({user: PASSWORD}) as (_, port):
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.read(4096)  # greeting
            writer.write(encode_packet(1, struct.pack("<I", 0)))  # 4-byte "handshake response"
            reply = await reader.read()
            writer.close()
        assert reply[4:5] == b"\xff"
        assert b"#08S01" in reply

        def good() -> Any:
            c = pymysql.connect(host="127.0.0.1", port=port, user=user, password=PASSWORD)
            with c.cursor() as cur:
                cur.execute("select 'fine'")
                row = cur.fetchone()
            c.close()
            return row

        assert await asyncio.to_thread(good) == ("fine",)


async def test_mysql_listener_accepts_proxy_v2_and_direct_clients(
    mysql_account: tuple[str, str],
) -> None:
    from marchproxy_common.wire.proxy_protocol import build_v2

    user, _ = mysql_account
    hooks = DblbHooks(settings(mysql_port=0, proxy_protocol="optional"))
    await hooks.apply_config({"config": {"mysql": {"users": {user: PASSWORD}}}})
    await hooks.start_data_plane()
    assert hooks.mysql_address is not None
    port = hooks.mysql_address.port
    try:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(build_v2(("198.51.100.9", 5555), ("127.0.0.1", port)))
            greeting = PacketDecoder().feed(await reader.read(4096))
            assert greeting and greeting[0].payload[:1] == b"\x0a"  # HandshakeV10
            writer.close()

        def direct() -> Any:
            c = pymysql.connect(host="127.0.0.1", port=port, user=user, password=PASSWORD)
            with c.cursor() as cur:
                cur.execute("select 'direct'")
                row = cur.fetchone()
            c.close()
            return row

        assert await asyncio.to_thread(direct) == ("direct",)
    finally:
        await hooks.close()


def _mysql_connect(port: int, user: str, db: str) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(host="127.0.0.1", port=port, user=user, password=PASSWORD, database=db)


def _server_sessions(user: str) -> int:
    conn = _root()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select count(*) from information_schema.processlist where user = %s", (user,)
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


async def _psql_admin(port: int, sql: str) -> str:
    rc, out = await psql(port, sql)
    assert rc == 0, out
    return out


async def test_mysql_pools_in_show_pools_show_stats_and_metrics(
    mysql_account: tuple[str, str],
) -> None:
    from prometheus_client import generate_latest

    user, db = mysql_account
    async with mysql_dblb({user: PASSWORD}, pool_size=3) as (hooks, port):
        c = await asyncio.to_thread(_mysql_connect, port, user, db)
        try:

            def queries() -> None:
                with c.cursor() as cur:
                    for i in range(4):
                        cur.execute("select %s", (i,))

            await asyncio.to_thread(queries)
            assert hooks._server is not None
            admin_port = hooks._server.sockets[0].getsockname()[1]
            pools = await _psql_admin(admin_port, "SHOW POOLS")
            assert f"{db}|{user}|1|0|1|0|0|0|0|session|3|mysql" in pools.split(), pools
            stats = [
                line.split("|") for line in (await _psql_admin(admin_port, "SHOW STATS")).split()
            ]
            mine = [row for row in stats if row[:2] == [db, user]]
            assert len(mine) == 1 and mine[0][-1] == "mysql" and int(mine[0][3]) >= 4, stats
            text = generate_latest(hooks.metrics_registry).decode()
            labels = f'database="{db}",pool_mode="session",role="mysql"'
            active = f'marchproxy_dblb_pool_servers{{{labels},state="active",user="{user}"}} 1.0'
            assert active in text
            assert f'marchproxy_dblb_queries_total{{{labels},user="{user}"}}' in text
        finally:
            c.close()


async def test_mysql_idle_servers_time_out(mysql_account: tuple[str, str]) -> None:
    user, db = mysql_account
    async with mysql_dblb({user: PASSWORD}, top={"server_idle_timeout": 0.3}) as (hooks, port):

        def session() -> None:
            c = _mysql_connect(port, user, db)
            with c.cursor() as cur:
                cur.execute("select 1")
            c.close()

        await asyncio.to_thread(session)
        assert await asyncio.to_thread(_server_sessions, user) == 1  # parked for reuse
        async with asyncio.timeout(15):
            while await asyncio.to_thread(_server_sessions, user):
                await asyncio.sleep(0.2)
        async with asyncio.timeout(5):
            while hooks.mysql_pool_rows():  # the unused pool is forgotten too
                await asyncio.sleep(0.1)
        await asyncio.to_thread(session)  # and a new one is opened on demand


async def test_mysql_max_client_conn_counts_both_frontends(
    mysql_account: tuple[str, str],
) -> None:
    import psycopg

    user, db = mysql_account
    async with mysql_dblb({user: PASSWORD}, top={"max_client_conn": 2}) as (hooks, port):
        assert hooks._server is not None
        pg_port = hooks._server.sockets[0].getsockname()[1]
        first = await asyncio.to_thread(_mysql_connect, port, user, db)
        pg = await psycopg.AsyncConnection.connect(
            f"host=127.0.0.1 port={pg_port} user=postgres dbname=pgbouncer"
        )
        try:
            with pytest.raises(pymysql.err.OperationalError, match="Too many connections"):
                await asyncio.to_thread(_mysql_connect, port, user, db)
            with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
                await psycopg.AsyncConnection.connect(
                    f"host=127.0.0.1 port={pg_port} user=postgres dbname=pgbouncer"
                )
        finally:
            first.close()
            await pg.close()
        async with asyncio.timeout(10):
            while hooks.client_total():
                await asyncio.sleep(0.05)
        again = await asyncio.to_thread(_mysql_connect, port, user, db)
        again.close()
