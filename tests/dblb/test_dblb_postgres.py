"""DBLB against the real Postgres on 5432 with real clients: psql, psycopg 3, pgbench."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import struct
from typing import Any

import psycopg
import pytest

from tests.dblb.dblb_helpers import (
    CLIENT_ENV,
    DIRECT_DSN,
    dsn,
    pg_config,
    run_client,
    running_dblb,
    unique,
)

pytestmark = pytest.mark.integration
MODES = ["transaction", "session"]


@pytest.mark.parametrize("mode", MODES)
async def test_psql_select(mode: str) -> None:
    async with running_dblb(pg_config(pool_mode=mode)) as h:
        rc, out = await run_client(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(h.port),
            "-U",
            "postgres",
            "test",
            "-Atc",
            "select 1",
        )
        assert rc == 0, out
        assert out.strip() == "1"
        rc, out = await run_client(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(h.port),
            "-U",
            "postgres",
            "test",
            "-At",
            "-c",
            "begin",
            "-c",
            "select 40 + 2",
            "-c",
            "commit",
        )
        assert rc == 0, out
        assert "42" in out.split()


async def _workload(conn: psycopg.AsyncConnection[Any], table: str) -> list[Any]:
    """The same statements direct and through the DBLB; returns every result."""
    results: list[Any] = []
    async with conn.transaction():
        await conn.execute(f"create table {table} (id int primary key, v text)")
    for i in range(5):
        await conn.execute(f"insert into {table} values (%s, %s)", (i, f"v{i}"), prepare=True)
    for i in range(5):
        cur = await conn.execute(f"select v from {table} where id = %s", (i,), prepare=True)
        results.append(await cur.fetchall())
    async with conn.pipeline():
        curs = [
            await conn.execute(f"select id, v from {table} where id >= %s order by id", (i,))
            for i in range(3)
        ]
        await conn.execute(f"update {table} set v = v || '!' where id = %s", (1,))
    for cur in curs:
        results.append(await cur.fetchall())
    async with conn.pipeline():
        cur2 = await conn.execute(f"select count(*) from {table}", prepare=True)
        cur3 = await conn.execute(f"select v from {table} where id = %s", (1,), prepare=True)
    results.append(await cur2.fetchall())
    results.append(await cur3.fetchall())
    cur = await conn.execute(f"select * from {table} order by id")
    results.append(await cur.fetchall())
    await conn.execute(f"drop table {table}")
    return results


@pytest.mark.parametrize("mode", MODES)
async def test_psycopg_async_prepared_and_pipeline_match_direct(mode: str) -> None:
    async with running_dblb(pg_config(pool_mode=mode, default_pool_size=2)) as h:
        async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
            d.prepare_threshold = 0
            expected = await _workload(d, unique("mp_dblb_direct"))
        # several clients in turn on a small pool: statements must follow each client
        for _ in range(3):
            async with await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c:
                c.prepare_threshold = 0
                got = await _workload(c, unique("mp_dblb_proxy"))
            assert got == expected


@pytest.mark.parametrize("mode", MODES)
async def test_psycopg_sync_client(mode: str) -> None:
    async with running_dblb(pg_config(pool_mode=mode)) as h:

        def work() -> list[Any]:
            with psycopg.connect(dsn(h.port), autocommit=True) as c:
                c.prepare_threshold = 0
                rows = [c.execute("select %s::int * 2", (i,)).fetchone() for i in range(5)]
                with c.transaction():
                    rows.append(c.execute("select txid_current() > 0").fetchone())
                with c.pipeline():
                    cur = c.execute("select 'a' || %s", ("b",))
                rows.append(cur.fetchone())
                return rows

        rows = await asyncio.to_thread(work)
        assert rows == [(0,), (2,), (4,), (6,), (8,), (True,), ("ab",)]


async def test_pgbench_all_protocols_both_modes() -> None:
    db = unique("mp_dblb_bench")
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
        await d.execute(f"create database {db}")
    try:
        for mode in MODES:
            async with running_dblb(pg_config(pool_mode=mode, default_pool_size=3)) as h:
                base = ["-h", "127.0.0.1", "-p", str(h.port), "-U", "postgres"]
                if mode == "transaction":
                    rc, out = await run_client("pgbench", *base, "-i", "-s", "1", "-q", db)
                    assert rc == 0, out
                for proto in ("simple", "extended", "prepared"):
                    rc, out = await run_client(
                        "pgbench", *base, "-M", proto, "-c", "4", "-j", "2", "-t", "30", db
                    )
                    assert rc == 0, out
                    assert "number of transactions actually processed: 120/120" in out, out
                    assert "error" not in out.lower(), out
                if mode == "transaction":
                    # more clients per pgbench thread than servers: its synchronous PQprepare
                    # must not wait for a server another client of the same thread holds
                    rc, out = await run_client(
                        "pgbench",
                        *base,
                        "-M",
                        "prepared",
                        "-c",
                        "8",
                        "-j",
                        "1",
                        "-t",
                        "15",
                        db,
                        timeout=60,
                    )
                    assert rc == 0, out
                    assert "actually processed: 120/120" in out, out
        async with await psycopg.AsyncConnection.connect(
            f"host=127.0.0.1 port=5432 user=postgres dbname={db}"
        ) as d:
            cur = await d.execute("select count(*) from pgbench_history")
            row = await cur.fetchone()
            assert row is not None and row[0] == 120  # pgbench truncates history per run
    finally:
        async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
            await d.execute(f"drop database if exists {db} with (force)")


async def test_200_clients_share_10_servers() -> None:
    table = unique("mp_dblb_share")
    async with running_dblb(pg_config(default_pool_size=10, query_wait_timeout=60)) as h:
        async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
            await d.execute(f"create table {table} (client int, n int)")
        try:
            conns = []
            async with asyncio.timeout(60):
                for _ in range(20):  # 200 connections, opened in waves of 10
                    conns += await asyncio.gather(
                        *[
                            psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True)
                            for _ in range(10)
                        ]
                    )
                assert len(conns) == 200

                async def client(i: int, c: psycopg.AsyncConnection[Any]) -> None:
                    for n in range(3):
                        async with c.transaction():
                            await c.execute(f"insert into {table} values (%s, %s)", (i, n))
                            await c.execute("select pg_sleep(0.001)")

                await asyncio.gather(*[client(i, c) for i, c in enumerate(conns)])
            pool = h.manager.pools[("test", "postgres")]
            assert len(pool.servers) <= 10
            assert pool.stats.xact_count >= 600
            for c in conns:
                await c.close()
            async with await psycopg.AsyncConnection.connect(DIRECT_DSN) as d:
                cur = await d.execute(f"select count(*), count(distinct client) from {table}")
                assert await cur.fetchone() == (600, 200)
        finally:
            async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
                await d.execute(f"drop table if exists {table}")


async def _server_states(app: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
        cur = await d.execute(
            "select state from pg_stat_activity where application_name = %s", (app,)
        )
        return [r[0] for r in await cur.fetchall()]


@pytest.mark.parametrize("mode", MODES)
async def test_client_killed_mid_transaction_leaves_no_stuck_server(mode: str) -> None:
    app = unique("mp_dblb_kill")
    async with running_dblb(pg_config(pool_mode=mode, default_pool_size=2)) as h:
        conn = await psycopg.AsyncConnection.connect(dsn(h.port, application_name=app))
        await conn.execute("select txid_current()")  # opens a transaction (autocommit off)
        assert "idle in transaction" in await _server_states(app)
        # kill the client's socket without a Terminate message
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        states: list[str] = ["idle in transaction"]
        async with asyncio.timeout(20):
            while "idle in transaction" in states:
                await asyncio.sleep(0.1)
                states = await _server_states(app)
        assert "idle in transaction" not in states
        # the pool still serves new clients
        async with await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c:
            cur = await c.execute("select 1")
            assert await cur.fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("select 1")
        await conn.close()


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_reaches_the_right_query(mode: str) -> None:
    async with running_dblb(pg_config(pool_mode=mode, default_pool_size=4)) as h:
        a = await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True)
        b = await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True)
        try:
            m = unique("mp_dblb_cancel")  # other tests sleep too: count only these two
            sleeper_a = asyncio.ensure_future(a.execute(f"select pg_sleep(30), '{m}a'"))
            sleeper_b = asyncio.ensure_future(b.execute(f"select pg_sleep(1.5), '{m}b'"))
            async with asyncio.timeout(20):
                while True:  # wait until both run on servers
                    async with await psycopg.AsyncConnection.connect(
                        DIRECT_DSN, autocommit=True
                    ) as d:
                        cur = await d.execute(
                            "select count(*) from pg_stat_activity "
                            "where query like %s and state = 'active'",
                            (f"select pg_sleep(%, '{m}_'",),
                        )
                        row = await cur.fetchone()
                    if row is not None and row[0] >= 2:
                        break
                    await asyncio.sleep(0.05)
                await a.cancel_safe(timeout=10)
                with pytest.raises(psycopg.errors.QueryCanceled):
                    await sleeper_a
                cur_b = await sleeper_b
                assert await cur_b.fetchone() == ("", f"{m}b")
            assert h.cancels_forwarded == 1
        finally:
            await a.close()
            await b.close()


async def _wait_active(pattern: str, count: int = 1) -> None:
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
        for _ in range(400):
            cur = await d.execute(
                "select count(*) from pg_stat_activity where query like %s and state = 'active'",
                (pattern,),
            )
            row = await cur.fetchone()
            if row is not None and row[0] >= count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"no active query like {pattern!r}")


async def test_psql_ctrl_c_cancels_through_dblb() -> None:
    marker = unique("mp_dblb_cancel")
    async with running_dblb(pg_config()) as h:
        proc = await asyncio.create_subprocess_exec(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(h.port),
            "-U",
            "postgres",
            "test",
            "-c",
            f"select pg_sleep(30), '{marker}'",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=CLIENT_ENV,
        )
        try:
            async with asyncio.timeout(20):
                await _wait_active(f"select pg_sleep(30), '{marker}'%")
                proc.send_signal(signal.SIGINT)  # what Ctrl-C does: psql sends CancelRequest
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert "canceling statement due to user request" in out.decode()
        assert h.cancels_forwarded == 1


def _startup(user: str = "postgres", db: str = "test") -> bytes:
    from marchproxy_common.wire.postgres import encoder as enc

    return enc.startup_message({"user": user, "database": db})


async def _read_until_ready(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while not data.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = await reader.read(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x00\x00\x00\x08",  # unknown message type
        b"Q\x00\x00\x00\x02",  # length shorter than itself
        b"Q\x7f\x00\x00\x00" + b"x" * 16,  # oversized (max_packet_size is 4096 here)
    ],
)
async def test_malformed_message_closes_only_that_client(bad: bytes) -> None:
    async with (
        running_dblb(pg_config(max_packet_size=4096)) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as good,
    ):
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(_startup())
            await _read_until_ready(reader)
            writer.write(bad)
            reply = await reader.read()  # until EOF: the proxy closes us
            writer.close()
        assert reply.startswith(b"E")
        assert b"C08P01\x00" in reply
        cur = await good.execute("select 'still fine'")
        assert await cur.fetchone() == ("still fine",)


async def test_bad_startup_packet_is_rejected() -> None:
    async with running_dblb(pg_config()) as h:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(struct.pack("!I", 1_000_000) + b"\x00" * 8)  # > MAX_STARTUP_PACKET
            reply = await reader.read()
            writer.close()
        assert b"C08P01\x00" in reply


async def test_query_wait_timeout_gives_a_clear_error() -> None:
    cfg = pg_config(default_pool_size=1, query_wait_timeout=0.5)
    async with running_dblb(cfg) as h:
        holder = await psycopg.AsyncConnection.connect(dsn(h.port))
        try:
            await holder.execute("select 1")  # transaction stays open: the only server is held
            waiter = await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True)
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
                await waiter.execute("select 1")
            await waiter.close()
        finally:
            await holder.close()


async def test_max_client_conn() -> None:
    async with running_dblb(pg_config(max_client_conn=2)) as h:
        a = await psycopg.AsyncConnection.connect(dsn(h.port))
        b = await psycopg.AsyncConnection.connect(dsn(h.port))
        try:
            with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
                await psycopg.AsyncConnection.connect(dsn(h.port))
        finally:
            await a.close()
            await b.close()


async def test_unknown_database_is_refused() -> None:
    cfg = pg_config(databases={"known": {"host": "127.0.0.1", "port": 5432, "dbname": "test"}})
    async with running_dblb(cfg) as h:
        with pytest.raises(psycopg.OperationalError, match="no such database"):
            await psycopg.AsyncConnection.connect(dsn(h.port, dbname="unknown"))
        async with await psycopg.AsyncConnection.connect(dsn(h.port, dbname="known")) as c:
            cur = await c.execute("select current_database()")
            assert await cur.fetchone() == ("test",)


async def test_prepared_statement_cache_eviction_and_discard_in_transaction_mode() -> None:
    """psycopg evicting its statement cache (DEALLOCATE/Close) and SQL DISCARD ALL keep working."""
    async with (
        running_dblb(pg_config(default_pool_size=2)) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c,
    ):
        c.prepare_threshold = 0
        c.prepared_max = 2  # every third distinct query evicts one
        for round_ in range(3):
            for i in range(6):
                cur = await c.execute(f"select {i} + %s::int", (round_,), prepare=True)
                assert await cur.fetchone() == (i + round_,)
        await c.execute("discard all")
        for i in range(3):
            cur = await c.execute("select 100 + %s::int", (i,), prepare=True)
            assert await cur.fetchone() == (100 + i,)


async def _terminate_backends(app: str) -> int:
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
        cur = await d.execute(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name = %s",
            (app,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_dead_servers_are_replaced_and_linked_client_gets_an_error() -> None:
    app = unique("mp_dblb_dead")
    async with running_dblb(pg_config(default_pool_size=2)) as h:
        async with await psycopg.AsyncConnection.connect(
            dsn(h.port, application_name=app), autocommit=True
        ) as c:
            await c.execute("select 1")
            assert await _terminate_backends(app) == 1  # idle server dies
            async with asyncio.timeout(10):
                while h.manager.pools[("test", "postgres")].servers:
                    await asyncio.sleep(0.02)
            cur = await c.execute("select 'replaced'")  # a fresh server is opened
            assert await cur.fetchone() == ("replaced",)
        tx = await psycopg.AsyncConnection.connect(dsn(h.port, application_name=app))
        try:
            await tx.execute("select 1")  # holds its server inside a transaction
            assert await _terminate_backends(app) == 1
            with pytest.raises(psycopg.OperationalError):
                await tx.execute("select 2")
        finally:
            await tx.close()


async def test_server_idle_timeout_and_lifetime() -> None:
    cfg = pg_config(server_idle_timeout=0.2, server_lifetime=0.5, default_pool_size=2)
    async with (
        running_dblb(cfg) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c,
    ):
        await c.execute("select 1")
        pool = h.manager.pools[("test", "postgres")]
        first = next(iter(pool.servers))
        async with asyncio.timeout(10):
            while pool.servers:  # the janitor closes the idle server
                await asyncio.sleep(0.05)
        assert first.state == "closed"
        cur = await c.execute("select 2")
        assert await cur.fetchone() == (2,)


@pytest.mark.parametrize("mode", MODES)
async def test_copy_and_large_messages(mode: str) -> None:
    table = unique("mp_dblb_copy")
    async with (
        running_dblb(pg_config(pool_mode=mode, default_pool_size=2)) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c,
    ):
        try:
            await c.execute(f"create table {table} (id int, payload text)")
            big = "x" * 300_000  # spans many reads in both directions
            cur = c.cursor()
            async with cur.copy(f"copy {table} (id, payload) from stdin") as copy:
                for i in range(200):
                    await copy.write_row((i, big if i == 7 else f"row{i}"))
            rows = []
            async with cur.copy(
                f"copy (select id, payload from {table} order by id) to stdout"
            ) as copy:
                async for row in copy.rows():
                    rows.append(row)
            assert len(rows) == 200 and rows[7][1] == big and rows[199] == ("199", "row199")
            cur2 = await c.execute("select length(%s::text)", (big * 3,))
            assert await cur2.fetchone() == (900_000,)
        finally:
            await c.execute(f"drop table if exists {table}")


async def test_config_changes_apply_and_invalid_ones_are_rejected() -> None:
    def cfg(dbname: str) -> dict[str, Any]:
        return pg_config(databases={"app": {"host": "127.0.0.1", "port": 5432, "dbname": dbname}})

    async def current(port: int) -> Any:
        async with await psycopg.AsyncConnection.connect(dsn(port, dbname="app")) as c:
            cur = await c.execute("select current_database()")
            return await cur.fetchone()

    async with running_dblb(cfg("test")) as h:
        assert await current(h.port) == ("test",)
        bad = {"modules": [{"name": "dblb", "config": {"pool_mode": "bogus"}}]}
        errors = await h.apply_config(bad)
        assert errors and "pool_mode" in errors[0]
        assert await current(h.port) == ("test",)  # previous config still in force
        good = {"modules": [{"name": "dblb", "config": cfg("postgres")}]}
        assert await h.apply_config(good) == []
        assert await current(h.port) == ("postgres",)


async def test_prepared_statements_hop_servers_under_concurrency() -> None:
    """30 clients on 3 servers, each mixing prepared, unprepared and pipelined queries: every
    statement must be re-prepared where it lands and every answer must be the client's own."""
    rng = random.Random(7)
    queries = [f"select %s::int * {k} + {k}" for k in range(6)]

    async def client(n: int, port: int) -> None:
        async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as c:
            c.prepare_threshold = rng.choice([0, 1, 2])
            plan = [(rng.randrange(6), rng.randrange(1000), rng.random()) for _ in range(25)]
            for k, arg, how in plan:
                if how < 0.3:
                    async with c.pipeline():
                        a = await c.execute(queries[k], (arg,), prepare=True)
                        b = await c.execute(queries[(k + 1) % 6], (arg + n,))
                    assert await a.fetchone() == (arg * k + k,)
                    k2 = (k + 1) % 6
                    assert await b.fetchone() == ((arg + n) * k2 + k2,)
                elif how < 0.5:
                    async with c.transaction():
                        cur = await c.execute(queries[k], (arg,), prepare=True)
                        assert await cur.fetchone() == (arg * k + k,)
                else:
                    cur = await c.execute(queries[k], (arg,))
                    assert await cur.fetchone() == (arg * k + k,)

    async with running_dblb(pg_config(default_pool_size=3, query_wait_timeout=60)) as h:
        async with asyncio.timeout(90):
            await asyncio.gather(*[client(n, h.port) for n in range(30)])
        pool = h.manager.pools[("test", "postgres")]
        assert len(pool.servers) <= 3


async def test_synthesized_parse_complete_keeps_response_order() -> None:
    """Raw protocol: Parses of statements the server already has are answered in order."""
    from marchproxy_common.wire.postgres import BackendDecoder
    from marchproxy_common.wire.postgres import encoder as enc

    q1, q2 = b"select 1 + $1::int", b"select 2 + $1::int"

    def bind(stmt: bytes, value: bytes) -> bytes:
        body = b"\x00" + stmt + b"\x00" + struct.pack("!hhi", 0, 1, len(value)) + value
        return enc.message(b"B", body + struct.pack("!h", 0))

    execute = enc.message(b"E", b"\x00" + struct.pack("!i", 0))

    async def conversation(port: int, batch: bytes, n_ready: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(enc.startup_message({"user": "postgres", "database": "test"}))
            await _read_until_ready(reader)
            writer.write(batch)
            decoder = BackendDecoder()
            types: list[bytes] = []
            while types.count(b"Z") < n_ready:
                chunk = await reader.read(65536)
                assert chunk
                types += [bytes((m.type,)) for m in decoder.feed(chunk)]
            return types
        finally:
            writer.close()

    p1, p2 = enc.parse(b"a", q1, b"\x00\x00"), enc.parse(b"b", q2, b"\x00\x00")
    async with running_dblb(pg_config(default_pool_size=1)) as h:
        async with asyncio.timeout(20):
            # first client: the single server learns both statements
            first = await conversation(h.port, p1 + p2 + enc.sync(), 1)
            assert first == [b"1", b"1", b"Z"]
            # second client: both Parses are synthesized, queued behind the first's answer
            second = await conversation(
                h.port,
                p1
                + p2
                + bind(b"b", b"5")
                + execute
                + enc.sync()
                + p1
                + bind(b"a", b"7")
                + execute
                + enc.sync(),
                2,
            )
            assert second == [b"1", b"1", b"2", b"D", b"C", b"Z", b"1", b"2", b"D", b"C", b"Z"]


async def test_read_write_split_is_opt_in_per_transaction() -> None:
    """The 'replica' here is the same Postgres under another dbname, so answers show the route."""
    cfg = pg_config(
        databases={
            "app": {
                "host": "127.0.0.1",
                "port": 5432,
                "dbname": "test",
                "replicas": [{"host": "127.0.0.1", "port": 5432, "dbname": "postgres"}],
            }
        }
    )
    async with (
        running_dblb(cfg) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="app"), autocommit=True) as c,
    ):

        async def db(sql: str, *params: Any) -> Any:
            cur = await c.execute(sql, params or None)
            row = await cur.fetchone()
            return row[0] if row else None

        assert await db("select current_database()") == "test"
        assert await db("/* marchproxy:replica */ select current_database()") == "postgres"
        assert await db("/* marchproxy:replica */ select current_database() || %s", "!") == (
            "postgres!"
        )
        await c.execute("begin read only")
        assert await db("select current_database()") == "postgres"
        await c.execute("commit")
        await c.execute("begin")
        assert await db("select current_database()") == "test"
        await c.execute("commit")
        rc, out = await run_client(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(h.port),
            "-U",
            "postgres",
            "pgbouncer",
            "-At",
            "-c",
            "SHOW POOLS",
        )
        assert rc == 0 and "|replica0" in out and "|primary" in out, out
