"""Admin console: who may change the pooler, PAUSE/RESUME of one database, RELOAD, stats."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import psycopg
import pytest

from marchproxy_common.wire.postgres import BackendDecoder
from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_dblb.module import DblbHooks
from tests.dblb.dblb_helpers import (
    dsn,
    pg_config,
    psql,
    running_dblb,
    self_signed_cert,
    settings,
)

pytestmark = pytest.mark.integration
TWO_DATABASES = {
    "a": {"host": "127.0.0.1", "port": 5432, "dbname": "test"},
    "b": {"host": "127.0.0.1", "port": 5432, "dbname": "test"},
}


async def test_without_admin_users_the_console_is_read_only() -> None:
    async with running_dblb(pg_config()) as h:
        rc, out = await psql(h.port, "SHOW POOLS", "SHOW VERSION")
        assert rc == 0 and "MarchProxy DBLB" in out, out
        for command in ("PAUSE", "RESUME", "RELOAD", "PAUSE test"):
            rc, out = await psql(h.port, command)
            assert rc != 0 and "only users listed in admin_users" in out, (command, out)
        assert not h.manager.paused and not h.manager.paused_databases


async def test_admin_and_stats_users() -> None:
    cfg = pg_config(admin_users=["boss"], stats_users=["watcher"])
    async with running_dblb(cfg) as h:
        rc, out = await psql(h.port, "SHOW POOLS", "PAUSE", "RESUME", user="boss")
        assert rc == 0, out
        rc, out = await psql(h.port, "SHOW STATS", user="watcher")
        assert rc == 0, out
        rc, out = await psql(h.port, "PAUSE", user="watcher")
        assert rc != 0 and "not allowed" in out, out
        rc, out = await psql(h.port, "SHOW POOLS", user="postgres")
        assert rc != 0 and "not allowed on the admin console" in out, out
        assert not h.manager.paused


async def test_pause_one_database_leaves_the_others_running() -> None:
    cfg = pg_config(admin_users=["postgres"], databases=TWO_DATABASES)
    async with (
        running_dblb(cfg) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="a"), autocommit=True) as a,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="b"), autocommit=True) as b,
    ):
        await a.execute("select 1")
        rc, out = await psql(h.port, "PAUSE a")
        assert rc == 0, out
        blocked = asyncio.ensure_future(a.execute("select 'a after resume'"))
        async with asyncio.timeout(10):
            for _ in range(5):  # b keeps working while a waits
                cur = await b.execute("select 'b runs'")
                assert await cur.fetchone() == ("b runs",)
        assert not blocked.done()
        rc, out = await psql(h.port, "SHOW POOLS")
        assert rc == 0 and "a|postgres|0|1|" in out, out  # a's client is waiting
        rc, out = await psql(h.port, "RESUME a")
        assert rc == 0, out
        async with asyncio.timeout(10):
            cur = await blocked
        assert await cur.fetchone() == ("a after resume",)
        rc, out = await psql(h.port, "PAUSE nosuchdb")
        assert rc != 0 and 'no such database: "nosuchdb"' in out, out


async def test_pause_one_database_waits_for_its_active_transaction() -> None:
    cfg = pg_config(admin_users=["postgres"], databases=TWO_DATABASES)
    async with (
        running_dblb(cfg) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="a")) as a,
        await psycopg.AsyncConnection.connect(dsn(h.port, dbname="b")) as b,
    ):
        await a.execute("select 1")  # a's transaction holds a server
        await b.execute("select 1")  # and b's: PAUSE a must not wait for it
        pause = asyncio.ensure_future(psql(h.port, "PAUSE a"))
        await asyncio.sleep(0.5)
        assert not pause.done()
        await a.commit()
        async with asyncio.timeout(10):
            rc, out = await pause
        assert rc == 0, out
        await b.commit()
        rc, out = await psql(h.port, "RESUME")  # RESUME without a name resumes everything
        assert rc == 0 and not h.manager.paused_databases, out


def _served_certificate(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(enc.ssl_request())
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw) as tls:
            cert = tls.getpeercert(binary_form=True)
    assert cert is not None
    return cert


async def test_reload_reapplies_the_desired_state_and_rereads_tls_files(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    cert, key = await self_signed_cert(first)
    new_cert, new_key = await self_signed_cert(second)
    cfg = pg_config(
        admin_users=["postgres"],
        client_tls_mode="allow",
        client_tls_cert=str(cert),
        client_tls_key=str(key),
    )
    async with running_dblb(cfg) as h:
        before = await asyncio.to_thread(_served_certificate, h.port)
        assert before == ssl.PEM_cert_to_DER_cert(cert.read_text())
        cert.write_bytes(new_cert.read_bytes())  # the files are rotated in place
        key.write_bytes(new_key.read_bytes())
        rc, out = await psql(h.port, "RELOAD")
        assert rc == 0 and out.strip() == "RELOAD", out
        after = await asyncio.to_thread(_served_certificate, h.port)
        assert after == ssl.PEM_cert_to_DER_cert(new_cert.read_text()) != before
        key.write_text("not a key")  # a broken reload is reported and changes nothing
        rc, out = await psql(h.port, "RELOAD")
        assert rc != 0 and "RELOAD failed: client TLS" in out, out
        assert await asyncio.to_thread(_served_certificate, h.port) == after


async def test_reload_without_any_configuration_source_says_so() -> None:
    hooks = DblbHooks(settings())
    addr = await hooks.start_data_plane()
    try:
        hooks.config = hooks.manager.config = hooks.config.model_copy(
            update={"admin_users": ["postgres"]}
        )
        rc, out = await psql(addr.port, "RELOAD")
        assert rc != 0 and "RELOAD failed: not applicable" in out, out
    finally:
        await hooks.close()


async def test_show_stats_includes_replica_pools() -> None:
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
        await c.execute("select 1")
        await c.execute("/* marchproxy:replica */ select 1")
        rc, out = await psql(h.port, "SHOW STATS")
        assert rc == 0, out
        rows: dict[str, Any] = {line.split("|")[-1]: line.split("|") for line in out.splitlines()}
        assert set(rows) == {"primary", "replica0"}
        assert int(rows["replica0"][3]) >= 1  # its query count


async def test_pipelined_commands_are_answered_in_order() -> None:
    """A client may send several queries before reading: a PAUSE (which waits for active
    servers) is answered before the SHOW sent after it, and the queue of commands is bounded."""
    async with running_dblb(pg_config(admin_users=["postgres"])) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        try:
            writer.write(enc.startup_message({"user": "postgres", "database": "pgbouncer"}))
            decoder = BackendDecoder()

            async def until_ready(n: int) -> list[Any]:
                msgs: list[Any] = []
                async with asyncio.timeout(30):
                    while sum(m.type == ord("Z") for m in msgs) < n:
                        chunk = await reader.read(65536)
                        assert chunk
                        msgs += decoder.feed(chunk)
                return msgs

            await until_ready(1)
            writer.write(enc.query("PAUSE") + enc.query("SHOW VERSION") + enc.query("RESUME"))
            msgs = await until_ready(3)
            tags = [m.body.rstrip(b"\x00") for m in msgs if m.type == ord("C")]
            assert tags == [b"PAUSE", b"SHOW", b"RESUME"], msgs
            writer.write(enc.query("SHOW VERSION") * 200)  # far more than may queue
            rest: list[Any] = []
            async with asyncio.timeout(30):
                while chunk := await reader.read(65536):  # until the DBLB closes
                    rest += decoder.feed(chunk)
            errors = [m for m in rest if m.type == ord("E")]
            assert len(errors) == 1 and b"admin commands queued" in errors[0].body, rest[-3:]
        finally:
            writer.close()
