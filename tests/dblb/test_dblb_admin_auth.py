"""Admin console with psql, metrics, client/server authentication, and the module runtime."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client import generate_latest

from marchproxy_common.module.runtime import run_module
from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_common.wire.postgres.auth import ScramVerifier, md5_hash
from marchproxy_common.wire.proxy_protocol import build_v2
from marchproxy_dblb.module import DblbHooks
from tests.conftest import free_port
from tests.dblb.dblb_helpers import (
    DIRECT_DSN,
    dsn,
    pg_config,
    psql,
    run_client,
    running_dblb,
    settings,
)

pytestmark = pytest.mark.integration


async def test_admin_console_with_psql() -> None:
    async with (
        running_dblb(pg_config(default_pool_size=3, admin_users=["postgres"])) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c,
    ):
        for _ in range(3):
            await c.execute("select 1")
        rc, out = await psql(h.port, "SHOW POOLS", "SHOW STATS")
        assert rc == 0, out
        pools = [line.split("|") for line in out.splitlines()]
        assert pools[0][:2] == ["test", "postgres"]
        assert pools[0][9] == "transaction"
        stats = pools[1]
        assert int(stats[2]) >= 3 and int(stats[3]) >= 3  # xacts and queries
        rc, out = await psql(h.port, "SHOW CLIENTS", "SHOW SERVERS", database="marchproxy")
        assert rc == 0, out
        assert out.count("\nC|") + out.startswith("C|") >= 2  # this psql and the psycopg
        assert "|test|idle|127.0.0.1|5432|" in out
        rc, out = await psql(h.port, "SHOW DATABASES", "SHOW VERSION", "RELOAD")
        assert rc == 0 and "MarchProxy DBLB" in out and "RELOAD" not in out.split("\n")[0]
        rc, out = await psql(h.port, "SHOW NONSENSE")
        assert rc != 0 and "unsupported admin command" in out

        # PAUSE waits for active servers, new work queues until RESUME
        rc, out = await psql(h.port, "PAUSE")
        assert rc == 0, out
        blocked = asyncio.ensure_future(c.execute("select 'after resume'"))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        rc, out = await psql(h.port, "RESUME")
        assert rc == 0, out
        async with asyncio.timeout(10):
            cur = await blocked
        assert await cur.fetchone() == ("after resume",)


async def test_metrics_exported() -> None:
    async with (
        running_dblb(pg_config()) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port), autocommit=True) as c,
    ):
        await c.execute("select 1")
        text = generate_latest(h.metrics_registry).decode()
    assert (
        'marchproxy_dblb_queries_total{database="test",pool_mode="transaction",role="primary",'
        'user="postgres"}' in text
    )
    assert "marchproxy_dblb_pool_servers" in text
    assert "marchproxy_dblb_transaction_duration_seconds_total" in text
    assert "marchproxy_dblb_client_wait_seconds_total" in text


@pytest.mark.parametrize(
    ("front_auth", "secret"),
    [
        ("scram-sha-256", "s3cret"),
        ("scram-sha-256", str(ScramVerifier.from_password("s3cret"))),
        ("md5", "s3cret"),
        ("md5", md5_hash("postgres", "s3cret")),
        ("cleartext", "s3cret"),
    ],
)
async def test_client_auth_and_scram_server_login(front_auth: str, secret: str) -> None:
    """Chain two DBLBs: the inner one asks for SCRAM, the outer logs in to it as a client."""
    inner_cfg = pg_config(auth_type="scram-sha-256", users={"postgres": {"password": "s3cret"}})
    async with running_dblb(inner_cfg) as inner:
        outer_cfg = pg_config(
            auth_type=front_auth,
            users={"postgres": {"password": secret}},
            databases={
                "*": {"host": "127.0.0.1", "port": inner.port, "password": "s3cret"},
            },
        )
        async with running_dblb(outer_cfg) as outer:
            async with await psycopg.AsyncConnection.connect(
                dsn(outer.port, password="s3cret"), autocommit=True
            ) as c:
                cur = await c.execute("select 'through two'")
                assert await cur.fetchone() == ("through two",)
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(dsn(outer.port, password="wrong"))
            rc, out = await psql(outer.port, "select 7", password="s3cret", database="test")
            assert rc == 0 and out.strip() == "7", out
            assert outer.auth_failures == 1


async def test_server_login_failure_reaches_waiting_client() -> None:
    inner_cfg = pg_config(auth_type="md5", users={"postgres": {"password": "right"}})
    async with running_dblb(inner_cfg) as inner:
        outer_cfg = pg_config(
            databases={"*": {"host": "127.0.0.1", "port": inner.port, "password": "wrong"}}
        )
        async with running_dblb(outer_cfg) as outer:
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(dsn(outer.port))


async def test_proxy_protocol_v2_source_is_the_client_address() -> None:
    async with running_dblb(pg_config(), proxy_protocol="optional") as h:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(build_v2(("203.0.113.7", 40000), ("127.0.0.1", h.port)))
            writer.write(enc.startup_message({"user": "postgres", "database": "test"}))
            data = b""
            while not data.endswith(enc.ready_for_query()):
                chunk = await reader.read(65536)
                assert chunk
                data += chunk
            rc, out = await psql(h.port, "SHOW CLIENTS")
            writer.close()
        assert rc == 0, out
        assert "|203.0.113.7|40000|" in out


async def test_module_runtime_serves_dblb() -> None:
    s = settings(admin_port=0, grpc_port=0, register_with_nlb=False, proxy_protocol="optional")
    hooks = DblbHooks(s)
    async with run_module(s, hooks) as rt:
        await hooks.apply_config({"modules": [{"name": "dblb", "config": pg_config()}]})
        port = rt.data_address.port
        async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as c:
            cur = await c.execute("select 'via runtime'")
            assert await cur.fetchone() == ("via runtime",)
        async with httpx.AsyncClient() as http:
            url = f"http://{rt.admin_address.host}:{rt.admin_address.port}"
            metrics = (await http.get(f"{url}/metrics")).text
            status = (await http.get(f"{url}/status")).json()
        assert "marchproxy_dblb_queries_total" in metrics
        assert status["pools"][0]["database"] == "test"
        # `make test` runs tests/dblb a second time on the compiled build (make native)
        assert status["build"] == os.environ.get("MARCHPROXY_EXPECT_BUILD", "interpreted")


async def test_passthrough_auth_checks_the_password_with_the_server() -> None:
    inner_cfg = pg_config(auth_type="scram-sha-256", users={"postgres": {"password": "s3cret"}})
    async with running_dblb(inner_cfg) as inner:
        outer_cfg = pg_config(
            auth_type="passthrough", databases={"*": {"host": "127.0.0.1", "port": inner.port}}
        )
        async with running_dblb(outer_cfg) as outer:
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(dsn(outer.port, password="wrong"))
            for _ in range(2):  # second time from the verified-password cache
                async with await psycopg.AsyncConnection.connect(
                    dsn(outer.port, password="s3cret"), autocommit=True
                ) as c:
                    cur = await c.execute("select 'passed through'")
                    assert await cur.fetchone() == ("passed through",)
            assert outer.auth_failures == 1
            assert inner.auth_failures == 1


async def test_client_tls_with_psql_and_psycopg(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-days",
        "1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(60):
        assert await proc.wait() == 0
    cfg = pg_config(client_tls_mode="require", client_tls_cert=str(cert), client_tls_key=str(key))
    async with running_dblb(cfg) as h:
        conninfo = f"host=127.0.0.1 port={h.port} user=postgres dbname=test sslmode=require"
        rc, out = await run_client(
            "psql", conninfo, "-At", "-c", "\\conninfo", "-c", "select 'over tls'", timeout=30
        )
        assert rc == 0, out
        assert "SSL connection" in out and "over tls" in out
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as c:
            assert c.pgconn.ssl_in_use
            cur = await c.execute("select %s::int + 1", (41,))
            assert await cur.fetchone() == (42,)
        with pytest.raises(psycopg.OperationalError, match="TLS is required"):
            await psycopg.AsyncConnection.connect(dsn(h.port, sslmode="disable"))


async def test_server_tls_to_a_tls_server_and_require_refusal(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-days",
        "1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(60):
        assert await proc.wait() == 0
    inner_cfg = pg_config(
        client_tls_mode="require", client_tls_cert=str(cert), client_tls_key=str(key)
    )
    async with running_dblb(inner_cfg) as inner:
        outer_cfg = pg_config(
            server_tls_mode="require",
            server_tls_ca=str(cert),  # verified: the certificate names 127.0.0.1
            databases={"*": {"host": "127.0.0.1", "port": inner.port}},
        )
        async with (
            running_dblb(outer_cfg) as outer,
            await psycopg.AsyncConnection.connect(dsn(outer.port), autocommit=True) as c,
        ):
            cur = await c.execute("select 'tls upstream'")
            assert await cur.fetchone() == ("tls upstream",)
            servers = outer.manager.pools[("test", "postgres")].servers
            assert servers and all(s.tls for s in servers)
    async with await psycopg.AsyncConnection.connect(DIRECT_DSN) as d:
        cur = await d.execute("show ssl")
        row = await cur.fetchone()
    if row == ("off",):  # a Postgres without TLS: require must refuse, not fall back
        async with running_dblb(pg_config(server_tls_mode="require")) as h:
            with pytest.raises(psycopg.OperationalError, match="TLS"):
                await psycopg.AsyncConnection.connect(dsn(h.port))
    async with (
        running_dblb(pg_config(server_tls_mode="prefer")) as h,
        await psycopg.AsyncConnection.connect(dsn(h.port)) as c,
    ):
        cur = await c.execute("select 1")
        assert await cur.fetchone() == (1,)


async def test_main_with_static_yaml_config(tmp_path: Path) -> None:
    """`python -m marchproxy_dblb --config file.yaml`, no API and no NLB, serves psql."""
    import sys

    port = free_port()
    cfg = tmp_path / "dblb.yaml"
    cfg.write_text(
        "modules:\n"
        "  - name: dblb\n"
        "    config:\n"
        "      pool_mode: session\n"
        "      databases:\n"
        "        app: {host: 127.0.0.1, port: 5432, dbname: test}\n"
    )
    env = {
        **os.environ,
        "DATA_PORT": str(port),
        "REGISTER_WITH_NLB": "false",
        "LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marchproxy_dblb",
        "--config",
        str(cfg),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    assert proc.returncode is None, await proc.stderr.read()  # type: ignore[union-attr]
                    await asyncio.sleep(0.1)
            rc, out = await psql(port, "select current_database()", database="app")
            assert rc == 0 and out.strip() == "test", out
            proc.terminate()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
