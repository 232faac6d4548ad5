"""Routing from desired state: read/write split by SET TRANSACTION READ ONLY, user mapping."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from marchproxy_common.wire.postgres import Message
from marchproxy_common.wire.postgres.messages import F_QUERY
from marchproxy_dblb.frontends.postgres import (
    _BARE_BEGIN,
    _DEALLOCATE,
    _LOCAL_CANDIDATE,
    _wants_replica,
)
from tests.dblb.dblb_helpers import DIRECT_DSN, dsn, pg_config, psql, running_dblb, unique

#: the 'replica' is the same Postgres under another dbname, so current_database() shows the route
SPLIT = pg_config(
    databases={
        "app": {
            "host": "127.0.0.1",
            "port": 5432,
            "dbname": "test",
            "replicas": [{"host": "127.0.0.1", "port": 5432, "dbname": "postgres"}],
        }
    }
)


async def _db(c: psycopg.AsyncConnection[Any]) -> str:
    cur = await c.execute("select current_database()")
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _psql(port: int, db: str, sql: str) -> str:
    rc, out = await psql(port, sql, database=db)
    assert rc == 0, out
    return out


MODES = ["ISOLATION LEVEL SERIALIZABLE", "ISOLATION LEVEL READ COMMITTED", "READ ONLY"]
MODES += ["READ WRITE", "DEFERRABLE", "NOT DEFERRABLE"]


def _query(sql: str | bytes) -> Message:
    return Message(F_QUERY, (sql.encode() if isinstance(sql, str) else sql) + b"\x00")


@given(
    st.sampled_from(["BEGIN", "begin", "START TRANSACTION", "BEGIN WORK", "begin transaction"]),
    st.lists(st.sampled_from(MODES), max_size=3),
    st.sampled_from([" ", ", ", "  "]),
    st.sampled_from(["", ";", " ; "]),
)
def test_begin_classification_follows_the_grammar(
    begin: str, modes: list[str], sep: str, end: str
) -> None:
    sql = begin + (" " + sep.join(modes) if modes else "") + end
    m = _query(sql)
    read_only = "READ ONLY" in modes
    assert _wants_replica(m) is read_only
    # deferred (the next statement decides) only when the access mode is still open
    assert (_BARE_BEGIN.match(m.body) is not None) is not (read_only or "READ WRITE" in modes)
    assert _LOCAL_CANDIDATE.match(m.body) is not None  # the prefilter lets every BEGIN through
    follow = _query(f"SET TRANSACTION {sep.join(modes) or 'READ WRITE'}")
    assert _wants_replica(follow, after_begin=True) is read_only
    assert _wants_replica(_query(f"{sql.rstrip(' ;')}; SET TRANSACTION READ ONLY")) is True


@given(st.binary(max_size=300))
def test_the_local_answer_prefilter_passes_whatever_its_patterns_match(body: bytes) -> None:
    for text in (body, b" \tBEGIN" + body, b"\nDEALLOCATE " + body, b"start transaction" + body):
        if _BARE_BEGIN.match(text) or _DEALLOCATE.match(text.rstrip(b"\x00")):
            assert _LOCAL_CANDIDATE.match(text) is not None


@given(st.binary(max_size=300))
def test_classifiers_take_any_bytes(body: bytes) -> None:
    m = Message(F_QUERY, body)
    assert isinstance(_wants_replica(m), bool)
    assert isinstance(_wants_replica(m, after_begin=True), bool)
    if _BARE_BEGIN.match(body) is not None:
        assert not _wants_replica(m)


@pytest.mark.integration
async def test_set_transaction_read_only_as_first_statement_goes_to_a_replica() -> None:
    async with (
        running_dblb(SPLIT) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="app"), autocommit=True) as c,
    ):
        async with c.transaction():  # BEGIN, then SET TRANSACTION READ ONLY
            await c.execute("set transaction read only")
            assert await _db(c) == "postgres"
            cur = await c.execute("show transaction_read_only")
            assert await cur.fetchone() == ("on",)
            assert await _db(c) == "postgres"  # the whole transaction stays there
        async with c.transaction():  # BEGIN, then anything else: the primary
            assert await _db(c) == "test"
            cur = await c.execute("show transaction_read_only")
            assert await cur.fetchone() == ("off",)
        await c.execute("begin isolation level repeatable read")
        await c.execute("set transaction isolation level repeatable read, read only")
        assert await _db(c) == "postgres"
        cur = await c.execute("show transaction_isolation")
        assert await cur.fetchone() == ("repeatable read",)  # the deferred BEGIN was the client's
        await c.execute("commit")
        await c.execute("begin")  # an empty transaction
        await c.execute("rollback")
        assert await _db(c) == "test"
        # BEGIN and SET TRANSACTION READ ONLY in one simple query string (psql -c)
        out = await _psql(
            h.port, "app", "BEGIN; SET TRANSACTION READ ONLY; SELECT current_database(); COMMIT"
        )
        assert "postgres" in out.split()
        out = await _psql(h.port, "app", "BEGIN; SELECT current_database(); COMMIT")
        assert "test" in out.split()


@pytest.mark.integration
async def test_bare_begin_goes_to_the_server_at_once_without_replicas() -> None:
    app = unique("mp_dblb_begin")
    async with (
        running_dblb(pg_config()) as h,
        await psycopg.AsyncConnection.connect(
            dsn(h.port, application_name=app), autocommit=True
        ) as c,
        await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d,
    ):
        await c.execute("begin")
        cur = await d.execute(
            "select state from pg_stat_activity where application_name = %s", (app,)
        )
        assert await cur.fetchall() == [("idle in transaction",)]
        await c.execute("rollback")


@pytest.mark.integration
async def test_user_mapping_logs_in_as_the_configured_server_user() -> None:
    role = unique("mp_dblb_role")
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
        await d.execute(f"create role {role} login")
    try:
        cfg = pg_config(
            databases={
                "mapped": {"host": "127.0.0.1", "port": 5432, "dbname": "test", "user": role},
                "plain": {"host": "127.0.0.1", "port": 5432, "dbname": "test"},
            }
        )
        async with running_dblb(cfg) as h:
            for client_user in ("postgres", "someone_else"):
                async with await psycopg.AsyncConnection.connect(
                    dsn(h.port, dbname="mapped", user=client_user), autocommit=True
                ) as c:
                    cur = await c.execute("select current_user, session_user")
                    assert await cur.fetchone() == (role, role)
            async with await psycopg.AsyncConnection.connect(
                dsn(h.port, dbname="plain"), autocommit=True
            ) as c:
                cur = await c.execute("select current_user")
                assert await cur.fetchone() == ("postgres",)
            # one pool per client user, each logged in to the server as the mapped role
            mapped = {k: p for k, p in h.manager.pools.items() if k[0] == "mapped"}
            assert sorted(mapped) == [("mapped", "postgres"), ("mapped", "someone_else")]
            assert {p.server_user for p in mapped.values()} == {role}
            out = await _psql(h.port, "pgbouncer", "SHOW SERVERS")
            assert f"|{role}|test|" in out
    finally:
        async with await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True) as d:
            await d.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s",
                (role,),
            )
            await d.execute(f"drop role if exists {role}")
