"""/api/openapi.json documents, per operation, exactly the statuses it can answer, and a
response schema for every JSON answer; each documented status is produced for real."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration
V = "/api/v1"

EXPECTED = {
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/api/v1/system/health"): {"200"},
    ("post", V + "/auth/login"): {"200", "400", "401", "413", "422", "429", "503"},
    ("get", V + "/modules"): {"200", "304", "401", "422", "503"},
    ("post", V + "/modules"): {"201", "400", "401", "403", "409", "413", "422", "503"},
    ("get", V + "/modules/{module_id}"): {"200", "304", "401", "404", "503"},
    ("delete", V + "/modules/{module_id}"): {"204", "401", "403", "404", "503"},
    ("post", V + "/modules/{module_id}/health"): {"200", "401", "404", "503"},
    ("post", V + "/modules/{module_id}/disable"): {"200", "401", "403", "404", "503"},
    ("post", V + "/modules/{module_id}/routes/{route_id}/enable"): {
        "200",
        "401",
        "403",
        "404",
        "409",
        "503",
    },
    ("post", V + "/modules/{module_id}/deployments/{deployment_id}/promote"): {
        "200",
        "202",
        "400",
        "401",
        "403",
        "404",
        "409",
        "413",
        "422",
        "503",
    },
    ("get", V + "/state/{component}"): {"200", "304", "401", "403", "404", "422", "503"},
    ("get", V + "/routing/conflicts"): {"200", "304", "401", "503"},
}


async def test_each_operation_documents_only_what_it_can_answer(api) -> None:
    status, doc = await api.call("GET", "/api/openapi.json")
    assert status == 200
    for (method, path), codes in EXPECTED.items():
        assert set(doc["paths"][path][method]["responses"]) == codes, (method, path)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for code, resp in op["responses"].items():
                content = resp.get("content", {}).get("application/json")
                if content is not None and path != "/api/openapi.json":
                    assert content["schema"] != {"type": "object"}, (method, path, code)
    snapshot = doc["paths"][V + "/state/{component}"]["get"]["responses"]["200"]
    ref = snapshot["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert {"component", "version", "modules", "routes"} <= set(
        doc["components"]["schemas"][ref]["properties"]
    )


async def test_documented_statuses_happen(api) -> None:
    viewer_pw = "password-123"
    status, _ = await api.call(
        "POST", V + "/users", {"username": "doc-viewer", "password": viewer_pw, "role": "viewer"}
    )
    assert status == 201
    viewer = (await api.login("doc-viewer", viewer_pw))["access_token"]
    status, _ = await api.call("POST", V + "/modules", {"name": "doc", "type": "ALB"})
    assert status == 201
    seen = {
        (await api.call("POST", V + "/modules", {"name": "doc", "type": "ALB"}))[0],
        (await api.call("POST", V + "/modules", {"name": "doc", "type": "NOPE"}))[0],
        (await api.call("POST", V + "/modules", {"name": "x"}, token=viewer))[0],
        (await api.call("POST", V + "/modules", {"name": "x"}, token=""))[0],
        (await api.call("GET", V + "/modules/999999"))[0],
        (await api.call("GET", V + "/modules?limit=-1"))[0],
    }
    assert seen == {409, 422, 403, 401, 404}
    async with api.http.post(
        api.url + V + "/modules",
        data=b"{",
        headers={**api.headers(), "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    hdr = {"X-Cluster-Api-Key": api.settings.cluster_api_key}
    status, snap = await api.call("GET", V + "/state/alb?after=0&timeout=0", token="", headers=hdr)
    assert status == 200 and snap["component"] == "alb"
    status, _ = await api.call(
        "GET", f"{V}/state/alb?after={snap['version']}&timeout=0", token="", headers=hdr
    )
    assert status == 304
    status, _ = await api.call("GET", V + "/state/alb?after=0&timeout=0", token=viewer)
    assert status == 403
    status, metrics = await api.call("GET", V + "/modules/metrics")
    assert status == 200 and isinstance(metrics, dict)
