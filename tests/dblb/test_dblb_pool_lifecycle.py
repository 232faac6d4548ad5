"""Server reuse: session reset between clients, min_pool_size, server_lifetime."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from tests.dblb.dblb_helpers import DIRECT_DSN, dsn, pg_config, running_dblb, unique

pytestmark = pytest.mark.integration


async def _one(c: psycopg.AsyncConnection[Any], sql: str, *params: Any) -> Any:
    cur = await c.execute(sql, params or None)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _dirty_session(port: int) -> int:
    """Leave session state behind on the server; returns its backend pid."""
    async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as c:
        c.prepare_threshold = 100  # only the statement marked prepare=True is prepared
        await c.execute("set work_mem = '7777kB'")
        await c.execute("create temp table mp_leak (x int)")
        await c.execute("prepare mp_sql_stmt as select 1")
        await c.execute("select %s::int", (1,), prepare=True)  # a protocol-level statement
        await c.execute("select pg_advisory_lock(7777)")
        assert await _one(c, "select count(*) from pg_prepared_statements") == 2
        return int(await _one(c, "select pg_backend_pid()"))


async def _session_state(port: int) -> tuple[int, str, int, int, int]:
    async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as c:
        return (
            int(await _one(c, "select pg_backend_pid()")),
            str(await _one(c, "show work_mem")),
            int(await _one(c, "select count(*) from pg_prepared_statements")),
            int(await _one(c, "select count(*) from pg_class where relname = 'mp_leak'")),
            int(
                await _one(
                    c,
                    "select count(*) from pg_locks where locktype = 'advisory' "
                    "and pid = pg_backend_pid()",
                )
            ),
        )


async def _default_work_mem() -> str:
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
        return str(await _one(d, "show work_mem"))


async def test_session_mode_discard_all_leaves_nothing_for_the_next_client() -> None:
    default = await _default_work_mem()
    async with running_dblb(pg_config(pool_mode="session", default_pool_size=1)) as h:
        pid = await _dirty_session(h.port)
        assert await _session_state(h.port) == (pid, default, 0, 0, 0)  # same server, clean


async def test_session_mode_runs_the_configured_reset_query_instead() -> None:
    """RESET work_mem only: the setting is reset, the temp table (session state DISCARD ALL
    would drop) is still there, which shows which query ran."""
    default = await _default_work_mem()
    cfg = pg_config(pool_mode="session", default_pool_size=1, server_reset_query="RESET work_mem")
    async with running_dblb(cfg) as h:
        pid = await _dirty_session(h.port)
        got_pid, work_mem, _, temp_tables, _ = await _session_state(h.port)
        assert (got_pid, work_mem, temp_tables) == (pid, default, 1)


async def test_min_pool_size_is_kept_without_load() -> None:
    app = unique("mp_dblb_min")
    cfg = pg_config(default_pool_size=5, min_pool_size=2, server_idle_timeout=0.2)
    async with (
        running_dblb(cfg) as h,
        await psycopg.AsyncConnection.connect(
            dsn(h.port, application_name=app), autocommit=True
        ) as c,
    ):
        await c.execute("select 1")
        pool = h.manager.pools[("test", "postgres")]
        async with asyncio.timeout(10):
            while len(pool.servers) < 2:  # filled up by the janitor, no client asks
                await asyncio.sleep(0.05)
        # a burst needs more servers; once idle, they shrink back to min_pool_size, not 0
        others = [
            await psycopg.AsyncConnection.connect(dsn(h.port, application_name=app))
            for _ in range(3)
        ]
        try:
            for o in others:
                await o.execute("select 1")  # each holds a server (open transaction)
            assert len(pool.servers) == 3  # the two kept ones and one more
        finally:
            for o in others:
                await o.close()
        async with asyncio.timeout(10):
            while len(pool.servers) > 2:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # a janitor round or more: still two
        assert len(pool.servers) == 2
        async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
            n = await _one(
                d, "select count(*) from pg_stat_activity where application_name = %s", app
            )
        assert n == 2


async def test_server_lifetime_replaces_servers_but_not_inside_a_transaction() -> None:
    cfg = pg_config(default_pool_size=1, server_lifetime=0.5, server_idle_timeout=600)
    async with (
        running_dblb(cfg) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c,
    ):
        first = await _one(c, "select pg_backend_pid()")
        async with c.transaction():
            assert await _one(c, "select pg_backend_pid()") == first
            await asyncio.sleep(1.2)  # past its lifetime, but linked: it is kept
            assert await _one(c, "select pg_backend_pid()") == first
        # released after its lifetime: closed, and the next transaction gets a new one
        second = await _one(c, "select pg_backend_pid()")
        assert second != first
        await asyncio.sleep(1.5)  # idle past its lifetime: the janitor closes it
        pool = h.manager.pools[("test", "postgres")]
        async with asyncio.timeout(10):
            while pool.servers:
                await asyncio.sleep(0.05)
        assert await _one(c, "select pg_backend_pid()") not in (first, second)
