"""Config updates under live clients: a database's target changes or disappears."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from tests.dblb.dblb_helpers import dsn, pg_config, running_dblb

pytestmark = pytest.mark.integration


def _app_config(dbname: str | None, **kw: Any) -> dict[str, Any]:
    databases = (
        {} if dbname is None else {"app": {"host": "127.0.0.1", "port": 5432, "dbname": dbname}}
    )
    return pg_config(databases=databases, **kw)


async def _apply(h: Any, config: dict[str, Any]) -> None:
    assert await h.apply_config({"modules": [{"name": "dblb", "config": config}]}) == []


async def _current_db(c: psycopg.AsyncConnection[Any]) -> str:
    cur = await c.execute("select current_database()")
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_target_change_moves_transaction_clients_without_a_login_storm() -> None:
    cfg = dict(default_pool_size=2, query_wait_timeout=5)
    async with (
        running_dblb(_app_config("test", **cfg)) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="app"), autocommit=True) as c,
    ):
        assert await _current_db(c) == "test"
        logins = h.manager.server_logins
        await _apply(h, _app_config("postgres", **cfg))
        async with asyncio.timeout(20):
            for _ in range(20):  # every transaction after the change runs on the new target
                assert await _current_db(c) == "postgres"
            # a transaction open across a second change finishes where it started
            async with c.transaction():
                assert await _current_db(c) == "postgres"
                await _apply(h, _app_config("test", **cfg))
                assert await _current_db(c) == "postgres"
            assert await _current_db(c) == "test"
        # one login per change (this single client never needs two servers at once)
        assert h.manager.server_logins - logins <= 2
        async with asyncio.timeout(10):
            while h.manager.retired:  # the retired pools drain and are forgotten
                await asyncio.sleep(0.05)


async def test_target_change_in_session_mode_keeps_linked_clients_and_moves_waiters() -> None:
    cfg = dict(pool_mode="session", default_pool_size=1, query_wait_timeout=10)
    async with running_dblb(_app_config("test", **cfg)) as h:
        a = await psycopg.AsyncConnection.connect(dsn(h.port, dbname="app"), autocommit=True)
        b = await psycopg.AsyncConnection.connect(dsn(h.port, dbname="app"), autocommit=True)
        try:
            assert await _current_db(a) == "test"  # a holds the only server for its session
            b_query = asyncio.ensure_future(_current_db(b))
            async with asyncio.timeout(10):
                while not h.manager.pools[("app", "postgres")].waiters:
                    await asyncio.sleep(0.02)
            logins = h.manager.server_logins
            await _apply(h, _app_config("postgres", **cfg))
            async with asyncio.timeout(15):
                assert await b_query == "postgres"  # the waiter moved to the new target
                assert await _current_db(a) == "test"  # a's session keeps its server
                await a.execute("set application_name = 'still here'")
            assert h.manager.server_logins - logins == 1
            await a.close()
            async with asyncio.timeout(10):
                while h.manager.retired:  # a's server is closed, not parked
                    await asyncio.sleep(0.05)
            assert h.manager.server_logins - logins == 1
        finally:
            await a.close()
            await b.close()


async def test_removed_database_keeps_serving_its_clients_until_they_leave() -> None:
    cfg = dict(default_pool_size=2, query_wait_timeout=5)
    async with (
        running_dblb(_app_config("test", **cfg)) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="app"), autocommit=True) as c,
    ):
        assert await _current_db(c) == "test"
        logins = h.manager.server_logins
        await _apply(h, _app_config(None, **cfg))
        async with asyncio.timeout(20):
            for _ in range(10):
                assert await _current_db(c) == "test"
        assert h.manager.server_logins - logins == 1  # then its new server stays parked for it
        with pytest.raises(psycopg.OperationalError, match="no such database"):
            await psycopg.AsyncConnection.connect(dsn(h.port, dbname="app"))
