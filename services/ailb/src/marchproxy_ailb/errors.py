"""The one AILB exception type: an error answered to the client in OpenAI's error JSON shape."""

from __future__ import annotations

import json
from collections.abc import Mapping


class GatewayError(Exception):
    """``{"error": {"message", "type", "param", "code"}}`` with an HTTP status and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": err}).encode()


class UpstreamError(Exception):
    """An upstream call failed; ``retryable`` errors move on to the next deployment."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.body = body


def retryable_status(status: int) -> bool:
    return status == 429 or status >= 500 or status == 408


def upstream_to_gateway(err: UpstreamError) -> GatewayError:
    """The client sees the upstream's OpenAI-shaped error when it gave one, else a generic one."""
    etype, code = "api_error", None
    message = err.message
    if err.body:
        try:
            parsed = json.loads(err.body)
            inner = parsed.get("error") if isinstance(parsed, dict) else None
            if isinstance(inner, dict):
                message = str(inner.get("message") or message)
                etype = str(inner.get("type") or etype)
                code = inner.get("code")
            elif isinstance(inner, str):
                message = inner
        except ValueError:
            pass
    if err.status == 429:
        etype = "rate_limit_error" if etype == "api_error" else etype
    status = err.status if 400 <= err.status < 600 else 502
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(err.retry_after + 0.999)))
    return GatewayError(status, message, type=etype, code=code, headers=headers)
