"""The real ``python -m marchproxy_api`` process: migrate, then serve on embedded SQLite with a
generated admin password printed once, and exit 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import aiohttp
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration


async def test_process_migrate_serve_and_generated_admin(tmp_path) -> None:
    env = {
        **os.environ,
        "SQLITE_PATH": str(tmp_path / "api.sqlite3"),
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "MARCHPROXY_ADMIN_PASSWORD": "",
        "LOG_FORMAT": "console",
        "API_HOST": "127.0.0.1",
    }
    mig = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marchproxy_api",
        "migrate",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await mig.communicate()
    assert mig.returncode == 0, err.decode()

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marchproxy_api",
        env={**env, "API_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        password = ""
        async with asyncio.timeout(60):
            while not password:
                line = (await proc.stderr.readline()).decode()
                assert line, "process exited before printing the admin password"
                m = re.search(r"created user 'admin' with password (\S+)", line)
                password = m.group(1) if m else ""
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with http.post(
                            f"http://127.0.0.1:{port}/api/v1/auth/login",
                            json={"username": "admin", "password": password},
                        ) as resp:
                            assert resp.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = await proc.stderr.read()
        assert await proc.wait() == 0
        assert b"with password" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
