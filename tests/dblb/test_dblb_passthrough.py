"""Passthrough auth: passwords the server accepted are trusted for a while, not forever."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from tests.dblb.dblb_helpers import pg_config, running_dblb

pytestmark = pytest.mark.integration


def _inner(password: str) -> dict[str, Any]:
    """The 'server': a DBLB that asks for SCRAM in front of the real Postgres."""
    return pg_config(auth_type="scram-sha-256", users={"postgres": {"password": password}})


async def _set_inner_password(inner: Any, password: str) -> None:
    snapshot = {"modules": [{"name": "dblb", "config": _inner(password)}]}
    assert await inner.apply_config(snapshot) == []


def _conninfo(port: int, password: str) -> str:
    return f"host=127.0.0.1 port={port} user=postgres dbname=test password={password}"


async def _select(port: int, password: str) -> Any:
    async with await psycopg.AsyncConnection.connect(
        _conninfo(port, password), autocommit=True
    ) as c:
        cur = await c.execute("select 'in'")
        return await cur.fetchone()


async def test_verified_password_expires_after_auth_cache_ttl() -> None:
    async with running_dblb(_inner("old")) as inner:
        outer_cfg = pg_config(
            auth_type="passthrough",
            auth_cache_ttl=0.5,
            databases={"*": {"host": "127.0.0.1", "port": inner.port}},
        )
        async with running_dblb(outer_cfg) as outer:
            assert await _select(outer.port, "old") == ("in",)
            assert await _select(outer.port, "old") == ("in",)  # from the cache
            await _set_inner_password(inner, "new")
            await asyncio.sleep(0.6)
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(_conninfo(outer.port, "old"))
            assert await _select(outer.port, "new") == ("in",)


async def test_server_auth_failure_forgets_verified_passwords() -> None:
    async with running_dblb(_inner("old")) as inner:
        outer_cfg = pg_config(
            auth_type="passthrough",
            default_pool_size=1,
            server_lifetime=0.2,  # the pool's server is replaced (a new login) when idle
            databases={"*": {"host": "127.0.0.1", "port": inner.port}},
        )
        async with running_dblb(outer_cfg) as outer:
            c = await psycopg.AsyncConnection.connect(_conninfo(outer.port, "old"), autocommit=True)
            try:
                await c.execute("select 1")
                await _set_inner_password(inner, "new")
                pool = outer.manager.pools[("test", "postgres")]
                async with asyncio.timeout(10):
                    while pool.servers:  # the janitor closes the expired idle server
                        await asyncio.sleep(0.05)
                # the pool logs in again with the password it learnt: refused
                with pytest.raises(psycopg.OperationalError, match="password authentication"):
                    await c.execute("select 2")
            finally:
                await c.close()
            # the old password is no longer taken from the cache (default TTL: 300 s)
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(_conninfo(outer.port, "old"))
            assert await _select(outer.port, "new") == ("in",)
