"""One table of endpoints drives both the aiohttp router and the OpenAPI document.

Each :class:`Endpoint` names its handler, the role it needs, and the pydantic models of its
query, body and response; :func:`wrap` authenticates, validates (422 with field details) and
serialises, so the document can never drift from what the code accepts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .errors import ApiError
from .keys import readiness_key, settings_key
from .schemas import MAX_ID
from .security import (
    CLUSTER_PRINCIPAL,
    AuthError,
    Principal,
    Role,
    decode_token,
    keys_equal,
)

Auth = Literal["public", "viewer", "operator", "admin", "cluster"]
CLUSTER_KEY_HEADER = "X-Cluster-Api-Key"
MAX_BODY_BYTES = 4 * 1024 * 1024
_PARAM = re.compile(r"\{(\w+)\}")


@dataclass
class Ctx:
    request: web.Request
    principal: Principal | None
    params: dict[str, int]
    query: Any = None
    body: Any = None

    @property
    def app(self) -> web.Application:
        return self.request.app

    @property
    def actor(self) -> str:
        return self.principal.name if self.principal else "anonymous"


Result = BaseModel | dict[str, Any] | list[Any] | web.StreamResponse | None
HandlerFn = Callable[[Ctx], Awaitable[Result]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    fn: HandlerFn
    summary: str
    tag: str
    auth: Auth = "viewer"
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    extra_statuses: tuple[int, ...] = ()
    #: path params that are not integer ids (name -> allowed values)
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    etag: bool = True
    raw_response: str = ""  # content type when the handler returns non-JSON
    #: False for the few endpoints that answer without the database (liveness, docs, metrics)
    needs_db: bool = True

    @property
    def aiohttp_path(self) -> str:
        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in self.enums:
                return "{" + name + ":(" + "|".join(self.enums[name]) + ")}"
            return "{" + name + r":\d+}"

        return _PARAM.sub(repl, self.path)


def validation_error(exc: ValidationError, where: str) -> ApiError:
    fields = [
        {
            "loc": [where, *[str(p) for p in err["loc"]]],
            "msg": err["msg"],
            "type": err["type"],
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]
    return ApiError(422, "validation_error", f"invalid {where}", fields=fields)


def authenticate(request: web.Request, auth: Auth) -> Principal | None:
    if auth == "public":
        return None
    settings = request.app[settings_key]
    if auth == "cluster":
        key = request.headers.get(CLUSTER_KEY_HEADER)
        if key is not None:
            if keys_equal(key, settings.effective_cluster_api_key):
                return CLUSTER_PRINCIPAL
            raise _unauthorized("invalid cluster API key")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing bearer token")
    try:
        claims = decode_token(settings.effective_secret_key, token.strip(), "access")
    except AuthError as exc:
        raise _unauthorized(exc.message) from None
    principal = Principal(
        name=str(claims.get("name", "")), role=Role[claims["role"]], user_id=int(claims["sub"])
    )
    needed = Role.admin if auth == "cluster" else Role[auth]
    if principal.role < needed:
        raise ApiError(
            403, "forbidden", f"this action needs the {needed.name} role", role=principal.role.name
        )
    return principal


def not_ready(reason: str) -> ApiError:
    err = ApiError(503, "not_ready", "the API is starting: the database is not reachable yet")
    err.details["reason"] = reason
    err.headers["Retry-After"] = "2"
    return err


def _unauthorized(message: str) -> ApiError:
    err = ApiError(401, "unauthorized", message)
    err.headers["WWW-Authenticate"] = "Bearer"
    return err


async def _read_body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.read() if request.can_read_body else b""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", "request body too large")
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_request", "request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, "body") from None


def json_body(data: Any, status: int, request: web.Request, etag: bool) -> web.Response:
    text = json.dumps(data, separators=(",", ":"), default=str)
    if etag and request.method == "GET" and status == 200:
        tag = '"' + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest() + '"'
        inm = request.headers.get("If-None-Match", "")
        if tag in [t.strip() for t in inm.split(",")] or inm.strip() == "*":
            return web.Response(status=304, headers={"ETag": tag})
        return web.Response(
            text=text, status=status, content_type="application/json", headers={"ETag": tag}
        )
    return web.Response(text=text, status=status, content_type="application/json")


def wrap(ep: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        if ep.needs_db and not request.app[readiness_key].ready:
            raise not_ready(request.app[readiness_key].reason)
        principal = authenticate(request, ep.auth)
        params: dict[str, int] = {}
        for name, value in request.match_info.items():
            if name in ep.enums:
                continue
            ident = int(value)
            if ident < 1 or ident > MAX_ID:
                raise ApiError(404, "not_found", f"{name} {value} not found")
            params[name] = ident
        ctx = Ctx(request=request, principal=principal, params=params)
        if ep.query is not None:
            try:
                ctx.query = ep.query.model_validate(dict(request.query))
            except ValidationError as exc:
                raise validation_error(exc, "query") from None
        if ep.body is not None:
            ctx.body = await _read_body(request, ep.body)
        result = await ep.fn(ctx)
        if isinstance(result, web.StreamResponse):
            return result
        if result is None:
            return web.Response(status=204)
        data = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        return json_body(data, ep.status, request, ep.etag)

    handler.__name__ = ep.fn.__name__
    return handler


def add_routes(app: web.Application, endpoints: list[Endpoint]) -> None:
    for ep in endpoints:
        app.router.add_route(ep.method, ep.aiohttp_path, wrap(ep), name=None)
