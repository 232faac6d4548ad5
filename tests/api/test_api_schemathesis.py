"""schemathesis (CLI, a bounded run) against /api/openapi.json of a real API on real Postgres:
no 5xx, every status code documented, every response matching its schema."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
#: keep the whole run well under a minute on a busy 2-core machine
MAX_EXAMPLES = "5"
MAX_TIME = "30"


@pytest.mark.timeout(120)
async def test_schemathesis_no_5xx_no_schema_violations(pg_url, api_factory, tmp_path) -> None:
    st = Path(sys.executable).parent / "schemathesis"
    async with api_factory(pg_url, state_poll_max=0.5, grpc_timeout=0.3) as api:
        proc = await asyncio.create_subprocess_exec(
            str(st),
            "run",
            api.url + "/api/openapi.json",
            "-H",
            f"Authorization: Bearer {api.token}",
            "-H",
            "X-Cluster-Api-Key: test-cluster-key",
            "--checks",
            "not_a_server_error,status_code_conformance,"
            "response_schema_conformance,content_type_conformance",
            "--phases",
            "coverage,fuzzing",
            "-n",
            MAX_EXAMPLES,
            "--max-time",
            MAX_TIME,
            "--seed",
            "1",
            "--request-timeout",
            "15",
            # one worker: with two threads a run once died inside schemathesis (an
            # AssertionError in hypothesis's lambda-source reflection, whose caches are
            # module-level and shared by the threads), nothing of ours involved
            "-w",
            "1",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        try:
            async with asyncio.timeout(110):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
