"""Errors in seed 002's shape ``{"error", "message", "details"}``; never a stack trace."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .errors import ApiError
from .keys import metrics_key

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_log = structlog.get_logger("marchproxy.api")


def error_response(
    status: int, error: str, message: str, details: dict[str, Any] | None = None
) -> web.Response:
    return web.json_response(
        {"error": error, "message": message, "details": details or {}}, status=status
    )


def _db_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | PoolTimeoutError | ConnectionError | OSError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except ApiError as exc:
        status = exc.status
        resp = error_response(exc.status, exc.error, exc.message, exc.details)
        resp.headers.update(exc.headers)
        return resp
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.reason)
    except IntegrityError:
        status = 409
        return error_response(409, "conflict", "the write conflicts with existing data")
    except DataError as exc:
        status = 422
        return error_response(
            422,
            "validation_error",
            "a value was rejected by the database",
            {"reason": str(exc.orig)[:200]},
        )
    except Exception as exc:
        if _db_unavailable(exc):
            status = 503
            _log.warning("database_unavailable", path=request.path, error=str(exc)[:200])
            resp = error_response(503, "database_unavailable", "the database is unavailable")
            resp.headers["Retry-After"] = "5"
            return resp
        _log.exception("handler_failed", path=request.path)
        return error_response(500, "internal_error", "internal error")
    finally:
        metrics = request.app.get(metrics_key)
        if metrics is not None:
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            metrics.observe(request.method, name, status, time.perf_counter() - started)
