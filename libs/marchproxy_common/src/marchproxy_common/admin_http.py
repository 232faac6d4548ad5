"""The operator HTTP surface every service exposes: /healthz, /readyz, /metrics, /status.

Errors use seed 002's JSON shape ``{"error", "message", "details"}``; nothing here ever returns
a stack trace.

Served by the shared small HTTP/1.1 server (``marchproxy_common.http1``) with a fixed path
table: four GET paths need no router, and a service whose data plane does not use aiohttp
does not import it at all (~6.8 MiB of idle RSS in the AILB, benchmarks/ailb/README.md).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from marchproxy_common.http1 import Answer, HttpServer, Limits, Request, Response

StatusFn = Callable[[], Mapping[str, Any]]
ReadyFn = Callable[[], tuple[bool, str]]
Handler = Callable[[Request], Awaitable[Response]]
JSON_CT = "application/json; charset=utf-8"
#: the admin paths take no request body
ADMIN_LIMITS = Limits(max_body=64 * 1024, max_pipelined=4)

#: how long stop() lets a request in progress finish (idle keep-alive connections close at once)
SHUTDOWN_TIMEOUT_S = 60.0

_log = structlog.get_logger("marchproxy.admin")


def json_response(
    obj: Any, *, status: int = 200, dumps: Callable[[Any], str] = json.dumps
) -> Response:
    return Response(dumps(obj).encode(), status=status, content_type=JSON_CT)


def error_response(status: int, error: str, message: str, **details: Any) -> Response:
    body = {"error": error, "message": message, "details": details}
    return json_response(body, status=status)


class AdminServer:
    """A small HTTP server answering GET (and HEAD) on its four paths."""

    def __init__(
        self,
        *,
        registries: Iterable[CollectorRegistry],
        status: StatusFn,
        ready: ReadyFn = lambda: (True, "ready"),
    ) -> None:
        self._registries = list(registries)
        self._status = status
        self._ready = ready
        self._routes: dict[str, Handler] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/status": self._status_handler,
        }
        self._server: HttpServer | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.port = 0

    def add_registry(self, registry: CollectorRegistry) -> None:
        self._registries.append(registry)

    async def _handle(self, request: Request) -> Answer:
        handler = self._routes.get(request.path)
        if handler is None:
            return error_response(404, "not_found", "Not Found")
        if request.method not in ("GET", "HEAD"):  # HEAD: the server sends the headers only
            resp = error_response(405, "method_not_allowed", "Method Not Allowed")
            resp.headers["Allow"] = "GET,HEAD"
            return resp
        try:
            return await handler(request)
        except Exception:
            _log.exception("admin_handler_failed", path=request.path)
            return error_response(500, "internal_error", "internal error")

    async def _healthz(self, request: Request) -> Response:
        return Response(b"OK")

    async def _readyz(self, request: Request) -> Response:
        ok, reason = self._ready()
        if ok:
            return Response(b"OK")
        return error_response(503, "not_ready", reason)

    async def _metrics(self, request: Request) -> Response:
        body = b"".join(generate_latest(r) for r in self._registries)
        return Response(body, content_type=CONTENT_TYPE_LATEST)

    async def _status_handler(self, request: Request) -> Response:
        return json_response(
            _finite(self._status()),
            dumps=lambda o: json.dumps(o, default=str, allow_nan=False),
        )

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        self._server = HttpServer(self._handle, limits=ADMIN_LIMITS, error=error_response)
        self._listener = await asyncio.get_running_loop().create_server(
            self._server, host, port, reuse_address=True, reuse_port=reuse_port
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening, close idle connections, let requests in progress finish."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._server is not None:
            await asyncio.sleep(0)  # requests accepted just before close() start being handled
            await self._server.shutdown(SHUTDOWN_TIMEOUT_S)
            self._server = None


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON (RFC 8259 section 6): report them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
