"""The one exception handlers raise; the middleware turns it into seed 002's JSON error shape."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = details
        self.headers: dict[str, str] = {}


def not_found(what: str, ident: object) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident} not found", resource=what, id=str(ident))


def conflict(message: str, **details: Any) -> ApiError:
    return ApiError(409, "conflict", message, **details)
