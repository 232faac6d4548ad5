"""OpenAPI 3 generated from the endpoint table and the same pydantic models that validate."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from .endpoints import Endpoint
from .schemas import MAX_ID, ErrorOut

REF = "#/components/schemas/{model}"
SWAGGER_UI_VERSION = "5.17.14"
SWAGGER_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MarchProxy API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/api/openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>
"""

_ERRORS = {
    400: "Malformed request",
    401: "Missing or invalid credentials",
    403: "Role not allowed",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    422: "Validation error (field details)",
    429: "Rate limited",
    503: "Database unavailable, or the API is still starting (Retry-After)",
}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        for name, sub in schema.pop("$defs", {}).items():
            self.components.setdefault(name, sub)
        self.components.setdefault(model.__name__, schema)
        return {"$ref": REF.format(model=model.__name__)}


def _parameters(ep: Endpoint, schemas: _Schemas) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for name in [p.strip("{}") for p in ep.path.split("/") if p.startswith("{")]:
        schema: dict[str, Any]
        if name in ep.enums:
            schema = {"type": "string", "enum": list(ep.enums[name])}
        else:
            schema = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    if ep.query is not None:
        full = ep.query.model_json_schema(ref_template=REF)
        for sub_name, sub in full.pop("$defs", {}).items():
            schemas.components.setdefault(sub_name, sub)
        for name, prop in full.get("properties", {}).items():
            prop = dict(prop)
            prop.pop("title", None)
            params.append({"name": name, "in": "query", "required": False, "schema": prop})
    return params


def error_statuses(ep: Endpoint) -> list[int]:
    """The error statuses ``ep`` can answer, and only those (schemathesis holds us to it)."""
    codes = {c for c in ep.extra_statuses if c in _ERRORS}
    if ep.body is not None:
        codes |= {400, 413, 422}  # not JSON, over client_max_size, fails its model
    if ep.query is not None:
        codes.add(422)
    if ep.auth != "public":
        codes.add(401)
    if ep.auth in ("operator", "admin", "cluster"):  # every valid token is at least viewer
        codes.add(403)
    if "{" in ep.path:
        codes.add(404)
    if ep.needs_db:
        codes.add(503)
    return sorted(codes)


def _operation(ep: Endpoint, schemas: _Schemas) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": ep.summary,
        "operationId": ep.method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", ep.path).rstrip("_"),
        "tags": [ep.tag],
    }
    params = _parameters(ep, schemas)
    if params:
        op["parameters"] = params
    if ep.body is not None:
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": schemas.ref(ep.body)}},
        }
    responses: dict[str, Any] = {}
    if ep.status == 204:
        responses["204"] = {"description": "No content"}
    elif ep.raw_response:
        responses[str(ep.status)] = {
            "description": "OK",
            "content": {ep.raw_response: {"schema": {"type": "string"}}},
        }
    elif ep.response is not None:
        responses[str(ep.status)] = {
            "description": "OK",
            "content": {"application/json": {"schema": schemas.ref(ep.response, "serialization")}},
        }
    else:
        responses[str(ep.status)] = {
            "description": "OK",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    if ep.method == "GET" and ep.etag:
        responses["304"] = {"description": "Not modified (If-None-Match matched the ETag)"}
    for extra in ep.extra_statuses:
        if 200 <= extra < 300 and ep.response is not None:
            schema = schemas.ref(ep.response, "serialization")
            responses[str(extra)] = {
                "description": "Accepted: goes on in the background",
                "content": {"application/json": {"schema": schema}},
            }
        elif extra not in _ERRORS:
            responses.setdefault(str(extra), {"description": "See summary"})
    err = schemas.ref(ErrorOut, "serialization")
    for code in error_statuses(ep):
        responses[str(code)] = {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": err}},
        }
    op["responses"] = responses
    if ep.auth == "cluster":
        op["security"] = [{"bearerAuth": []}, {"clusterKey": []}]
    elif ep.auth != "public":
        op["security"] = [{"bearerAuth": []}]
    else:
        op["security"] = []
    return op


def build_openapi(endpoints: list[Endpoint], version: str) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MarchProxy API",
            "version": version,
            "description": "Control plane of MarchProxy: modules, routes, scaling, deployments, "
            "services, desired state. Errors: {error, message, details}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "clusterKey": {"type": "apiKey", "in": "header", "name": "X-Cluster-Api-Key"},
            },
        },
        "security": [{"bearerAuth": []}],
    }
