"""Shared fixtures for DBLB tests: an in-process DBLB on port 0 in front of the real Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from marchproxy_dblb.config import DblbSettings
from marchproxy_dblb.module import DblbHooks

PG_HOST = "127.0.0.1"
PG_PORT = 5432
DIRECT_DSN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=test"


def settings(**kw: Any) -> DblbSettings:
    base: dict[str, Any] = {
        "data_port": 0,
        "register_with_nlb": False,
        "proxy_protocol": "off",
        "mysql_port": -1,
    }
    base.update(kw)
    return DblbSettings(**base)


def pg_config(**kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "pool_mode": "transaction",
        "default_pool_size": 5,
        "databases": {"*": {"host": PG_HOST, "port": PG_PORT}},
    }
    cfg.update(kw)
    return cfg


@contextlib.asynccontextmanager
async def running_dblb(config: dict[str, Any], **settings_kw: Any) -> AsyncIterator[DblbHooks]:
    hooks = DblbHooks(settings(**settings_kw))
    addr = await hooks.start_data_plane()
    hooks.port = addr.port  # type: ignore[attr-defined]
    try:
        errors = await hooks.apply_config({"modules": [{"name": "dblb", "config": config}]})
        assert errors == []
        yield hooks
    finally:
        await hooks.close()


def dsn(port: int, dbname: str = "test", user: str = "postgres", **extra: str) -> str:
    parts = [f"host=127.0.0.1 port={port} user={user} dbname={dbname}"]
    parts += [f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts)


def unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


@pytest.fixture
async def direct() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await psycopg.AsyncConnection.connect(DIRECT_DSN, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for localhost (openssl req -x509)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
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
    try:
        async with asyncio.timeout(60):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return cert, key


CLIENT_ENV = {**os.environ, "PGCONNECT_TIMEOUT": "10"}


async def run_client(
    *argv: str, timeout: float = 60, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a client program (psql, pgbench, ...) with CLIENT_ENV plus ``env``; (exit code,
    stdout and stderr). It is killed if it outlives ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**CLIENT_ENV, **(env or {})},
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode()


async def psql(
    port: int,
    *sql: str,
    user: str = "postgres",
    database: str = "pgbouncer",
    password: str | None = None,
) -> tuple[int, str]:
    """psql -c for each of ``sql`` (on the admin console by default); (exit code, output)."""
    args = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, database, "-At"]
    for s in sql:
        args += ["-c", s]
    env = {"PGPASSWORD": password} if password is not None else None
    return await run_client(*args, timeout=30, env=env)
