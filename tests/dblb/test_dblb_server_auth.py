"""DBLB logging in to a real Postgres that requires passwords (SCRAM, md5, cleartext).

The machine's Postgres on 5432 trusts every local connection, and its pg_hba.conf is not ours
to change. So these tests run a private, throwaway cluster (initdb in a temporary directory, its
own pg_hba.conf, a port from ``free_port``), stopped and removed when the module ends.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from marchproxy_common.wire.postgres.auth import ScramVerifier, md5_hash
from tests.conftest import free_port
from tests.dblb.dblb_helpers import running_dblb

pytestmark = pytest.mark.integration
ROLES = {
    # role: (password_encryption, password, pg_hba method)
    "mp_scram": ("scram-sha-256", "s3cret-scram", "scram-sha-256"),
    "mp_md5": ("md5", "s3cret-md5", "md5"),
    "mp_clear": ("scram-sha-256", "s3cret-clear", "password"),
}
#: runs auth_query (reading pg_authid needs a superuser)
AUTH_USER, AUTH_PASSWORD = "mp_auth", "s3cret-auth"


@dataclass(frozen=True)
class PrivatePostgres:
    port: int
    socket_dir: str
    #: pg_authid.rolpassword of each role, read as superuser
    stored: dict[str, str] = field(default_factory=dict)

    def superuser(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=self.socket_dir, port=self.port, user="postgres", dbname="postgres"
        )


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    assert found, f"{name} not found: the tests need the PostgreSQL server binaries"
    return found


def _as_postgres(argv: list[str]) -> list[str]:
    """Postgres refuses to run as root: run it as the postgres OS user then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    base = tempfile.mkdtemp(prefix="mp_dblb_pg_")
    if os.geteuid() == 0:
        pg_user = pwd.getpwnam("postgres")
        os.chown(base, pg_user.pw_uid, pg_user.pw_gid)
    data = os.path.join(base, "data")
    pg_ctl = _pg_bin("pg_ctl")
    port = free_port()
    started = False
    try:
        initdb = [_pg_bin("initdb"), "-D", data, "-U", "postgres", "-A", "trust"]
        subprocess.run(
            _as_postgres([*initdb, "--no-sync", "-E", "UTF8"]),
            check=True,
            capture_output=True,
            timeout=120,
        )
        hba = ["local all all trust"]
        hba += [f"host all {role} 127.0.0.1/32 {method}" for role, (_, _, method) in ROLES.items()]
        hba += ["host all all 127.0.0.1/32 scram-sha-256"]
        with open(os.path.join(data, "pg_hba.conf"), "w") as f:
            f.write("\n".join(hba) + "\n")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off "
            "-c shared_buffers=16MB -c max_connections=40"
        )
        started = True
        start = [pg_ctl, "-D", data, "-o", options, "-l", f"{base}/log", "-w", "-t", "60"]
        subprocess.run(_as_postgres([*start, "start"]), check=True, capture_output=True, timeout=90)
        pg = PrivatePostgres(port, base)
        with pg.superuser() as conn:
            conn.autocommit = True
            for role, (encryption, password, _) in ROLES.items():
                conn.execute(f"set password_encryption = '{encryption}'")
                conn.execute(f"create role {role} login password '{password}'")
                row = conn.execute(
                    "select rolpassword from pg_authid where rolname = %s", (role,)
                ).fetchone()
                assert row is not None and row[0]
                pg.stored[role] = str(row[0])
            conn.execute("set password_encryption = 'scram-sha-256'")
            conn.execute(f"create role {AUTH_USER} login superuser password '{AUTH_PASSWORD}'")
        yield pg
    finally:
        if started:
            subprocess.run(
                _as_postgres([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


def test_private_cluster_really_requires_passwords(private_pg: PrivatePostgres) -> None:
    for role in ROLES:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(
                host="127.0.0.1",
                port=private_pg.port,
                user=role,
                dbname="postgres",
                password="wrong",
            )


def test_our_scram_and_md5_secrets_match_what_postgres_stores(private_pg: PrivatePostgres) -> None:
    stored = ScramVerifier.parse(private_pg.stored["mp_scram"])
    assert stored is not None
    ours = ScramVerifier.from_password(
        ROLES["mp_scram"][1], salt=stored.salt, iterations=stored.iterations
    )
    assert ours == stored
    assert str(ours) == private_pg.stored["mp_scram"]
    assert private_pg.stored["mp_md5"] == md5_hash("mp_md5", ROLES["mp_md5"][1])


def _databases(pg: PrivatePostgres, **extra: dict[str, Any]) -> dict[str, Any]:
    dbs: dict[str, Any] = {
        role: {
            "host": "127.0.0.1",
            "port": pg.port,
            "dbname": "postgres",
            "user": role,
            "password": password,
        }
        for role, (_, password, _) in ROLES.items()
    }
    dbs.update(extra)
    return {"pool_mode": "transaction", "default_pool_size": 2, "databases": dbs}


async def _whoami(port: int, db: str, user: str = "postgres", password: str = "") -> Any:
    conninfo = f"host=127.0.0.1 port={port} user={user} dbname={db}"
    if password:
        conninfo += f" password={password}"
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as c:
        cur = await c.execute("select current_user, %s::int + 1", (41,))
        return await cur.fetchone()


async def test_server_login_with_scram_md5_and_cleartext(private_pg: PrivatePostgres) -> None:
    md5_stored = md5_hash("mp_md5", ROLES["mp_md5"][1])
    cfg = _databases(
        private_pg,
        # a configured md5 hash (as in pg_authid) logs in without the plain password
        md5_hashed={
            "host": "127.0.0.1",
            "port": private_pg.port,
            "dbname": "postgres",
            "user": "mp_md5",
            "password": md5_stored,
        },
        wrong={
            "host": "127.0.0.1",
            "port": private_pg.port,
            "dbname": "postgres",
            "user": "mp_scram",
            "password": "nope",
        },
    )
    async with running_dblb(cfg) as h:
        for role in ROLES:
            assert await _whoami(h.port, role) == (role, 42)
        assert await _whoami(h.port, "md5_hashed") == ("mp_md5", 42)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await _whoami(h.port, "wrong")
        servers = [s for p in h.manager.pools.values() for s in p.servers]
        assert servers and all(s.state == "idle" for s in servers)


async def test_client_auth_with_a_postgres_generated_verifier(private_pg: PrivatePostgres) -> None:
    """Clients authenticate to us with SCRAM against the verifier Postgres stored."""
    cfg = _databases(private_pg)
    cfg.update(
        auth_type="scram-sha-256",
        users={"mp_scram": {"password": private_pg.stored["mp_scram"]}},
    )
    async with running_dblb(cfg) as h:
        got = await _whoami(h.port, "mp_scram", user="mp_scram", password=ROLES["mp_scram"][1])
        assert got == ("mp_scram", 42)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await _whoami(h.port, "mp_scram", user="mp_scram", password="wrong")


@pytest.mark.parametrize("role", sorted(ROLES))
async def test_passthrough_against_the_real_server(private_pg: PrivatePostgres, role: str) -> None:
    cfg = {
        "auth_type": "passthrough",
        "databases": {"*": {"host": "127.0.0.1", "port": private_pg.port, "dbname": "postgres"}},
    }
    async with running_dblb(cfg) as h:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await _whoami(h.port, "app", user=role, password="wrong")
        for _ in range(2):
            got = await _whoami(h.port, "app", user=role, password=ROLES[role][1])
            assert got == (role, 42)
        assert h.auth_failures == 1


def _auth_query_config(pg: PrivatePostgres, auth_type: str, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "auth_type": auth_type,
        "auth_user": AUTH_USER,
        "users": {AUTH_USER: {"password": AUTH_PASSWORD}},
        "default_pool_size": 2,
        "databases": {"*": {"host": "127.0.0.1", "port": pg.port, "dbname": "postgres"}},
    }
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize(
    ("auth_type", "role"),
    [
        ("scram-sha-256", "mp_scram"),  # SCRAM verifier: server login with the client's keys
        ("md5", "mp_md5"),  # md5 hash: server login with the hash
        ("md5", "mp_scram"),  # a SCRAM secret with auth_type md5: SCRAM is used
    ],
)
async def test_auth_query_authenticates_against_the_servers_secret(
    private_pg: PrivatePostgres, auth_type: str, role: str
) -> None:
    password = ROLES[role][1]
    async with running_dblb(_auth_query_config(private_pg, auth_type)) as h:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await _whoami(h.port, "app", user=role, password="wrong")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await _whoami(h.port, "app", user="mp_nobody", password="x")
        assert await _whoami(h.port, "app", user=role, password=password) == (role, 42)
        # two transactions at once: a second server login, again without the password
        conninfo = f"host=127.0.0.1 port={h.port} user={role} dbname=app password={password}"
        a = await psycopg.AsyncConnection.connect(conninfo)
        b = await psycopg.AsyncConnection.connect(conninfo)
        try:
            for c in (a, b):
                cur = await c.execute("select current_user")
                assert await cur.fetchone() == (role,)
            pool = h.manager.pools[("app", role)]
            assert len(pool.servers) == 2 and pool.stats.server_login_errors == 0
            # the proxy never saw the password: it logged in with the hash or the SCRAM keys
            assert pool.server_password in (None, private_pg.stored[role])
            assert (pool.scram_keys is not None) is private_pg.stored[role].startswith("SCRAM")
        finally:
            await a.close()
            await b.close()
        assert h.auth_failures == 2


async def test_auth_query_that_cannot_run_is_reported(private_pg: PrivatePostgres) -> None:
    cfg = _auth_query_config(private_pg, "scram-sha-256", users={AUTH_USER: {"password": "bad"}})
    async with running_dblb(cfg) as h:
        with pytest.raises(psycopg.OperationalError, match="auth_query failed"):
            await _whoami(h.port, "app", user="mp_scram", password=ROLES["mp_scram"][1])
