from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


async def test_root_and_openapi(api) -> None:
    status, body = await api.call("GET", "/")
    assert status == 200
    status, doc = await api.call("GET", "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "/api/v1/modules" in doc["paths"]
    status, body = await api.call("GET", "/readyz")
    assert status == 200, body
