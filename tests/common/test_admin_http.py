"""The admin HTTP surface over a real socket: /status stays valid JSON whatever it reports."""

from __future__ import annotations

import json
import math

import aiohttp

from marchproxy_common.admin_http import AdminServer


async def test_status_reports_non_finite_numbers_as_null() -> None:
    status = {"cpu_percent": math.nan, "load": [1.5, math.inf], "nested": {"x": -math.inf}}
    admin = AdminServer(registries=[], status=lambda: status)
    port = await admin.start("127.0.0.1", 0)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/status") as resp,
        ):
            assert resp.status == 200
            text = await resp.text()
    finally:
        await admin.stop()
    # strict parsing: Python's json accepts NaN by default, RFC 8259 does not
    body = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert body == {"cpu_percent": None, "load": [1.5, None], "nested": {"x": None}}


async def test_unknown_paths_and_methods_get_the_error_shape() -> None:
    admin = AdminServer(registries=[], status=dict, ready=lambda: (False, "starting"))
    port = await admin.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/nope") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"] == "not_found"
            async with session.post(f"{base}/metrics") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "GET,HEAD"
                assert (await resp.json())["error"] == "method_not_allowed"
            async with session.get(f"{base}/readyz") as resp:
                assert resp.status == 503
                assert await resp.json() == {
                    "error": "not_ready",
                    "message": "starting",
                    "details": {},
                }
            async with session.head(f"{base}/healthz") as resp:
                assert resp.status == 200
                assert await resp.read() == b""
    finally:
        await admin.stop()
