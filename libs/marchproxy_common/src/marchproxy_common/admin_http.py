"""The operator HTTP surface every service exposes: /healthz, /readyz, /metrics, /status.

Errors use seed 002's JSON shape ``{"error", "message", "details"}``; nothing here ever returns
a stack trace.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

StatusFn = Callable[[], Mapping[str, Any]]
ReadyFn = Callable[[], tuple[bool, str]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_log = structlog.get_logger("marchproxy.admin")


def error_response(status: int, error: str, message: str, **details: Any) -> web.Response:
    body = {"error": error, "message": message, "details": details}
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except Exception:
        _log.exception("admin_handler_failed", path=request.path)
        return error_response(500, "internal_error", "internal error")


class AdminServer:
    """A small aiohttp server; extra routes can be added before :meth:`start`."""

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
        self.app = web.Application(middlewares=[_errors], client_max_size=64 * 1024)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/status", self._status_handler)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add_registry(self, registry: CollectorRegistry) -> None:
        self._registries.append(registry)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, reason = self._ready()
        if ok:
            return web.Response(text="OK")
        return error_response(503, "not_ready", reason)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in self._registries)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(
            _finite(self._status()),
            dumps=lambda o: json.dumps(o, default=str, allow_nan=False),
        )

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, reuse_port=reuse_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON (RFC 8259 section 6): report them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
