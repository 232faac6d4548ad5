"""Shutdown is bounded: a step that hangs is logged and the steps after it still run."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

import marchproxy_api.app as api_app
from marchproxy_api.keys import publisher_key
from tests.api.conftest import make_settings, start_api

pytestmark = pytest.mark.integration


async def test_a_hung_shutdown_step_is_logged_and_the_rest_still_run(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_app, "SHUTDOWN_STEP_TIMEOUT", 0.3)
    runner, _, app = await start_api(make_settings(pg_url))
    publisher = app[publisher_key]
    real_stop = publisher.stop
    forever = asyncio.Event()

    async def hangs() -> None:
        await real_stop()  # let go of Redis, then never return, as a stuck client would
        await forever.wait()

    publisher.stop = hangs  # type: ignore[method-assign]
    with capture_logs() as logs:
        async with asyncio.timeout(30):
            await runner.cleanup()
    timed_out = [e for e in logs if e["event"] == "shutdown_step_timed_out"]
    assert [e["step"] for e in timed_out] == ["publisher"]
    # the steps after the hung one ran (gRPC clients, database): the last line is logged
    assert any(e["event"] == "api_stopped" for e in logs)
