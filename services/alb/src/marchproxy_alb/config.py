"""ALB settings (environment, read once) and the module config from desired state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field

from marchproxy_common.config import ModuleSettings

# Limits (names used across the data plane; each can be overridden in module config "limits")
MAX_REQUEST_LINE = 8 * 1024  # nginx large_client_header_buffers default
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
HEADER_TIMEOUT = 10.0  # slowloris guard: whole request head must arrive within this
KEEPALIVE_TIMEOUT = 75.0  # nginx keepalive_timeout default
MAX_CONNECTIONS = 10_000
MAX_BODY_SIZE = 1 << 40


class AlbSettings(ModuleSettings):
    """Environment: the common module variables plus ALB_* limits and the TLS listener."""

    alb_max_connections: int = Field(default=MAX_CONNECTIONS, ge=1)
    alb_max_request_line: int = Field(default=MAX_REQUEST_LINE, ge=64)
    alb_max_header_bytes: int = Field(default=MAX_HEADER_BYTES, ge=256)
    alb_max_headers: int = Field(default=MAX_HEADERS, ge=1)
    alb_header_timeout: float = Field(default=HEADER_TIMEOUT, gt=0)
    alb_keepalive_timeout: float = Field(default=KEEPALIVE_TIMEOUT, gt=0)
    alb_access_log: bool = True
    #: Redis key prefix of cluster-scope route rate limits (REDIS_URL selects the server)
    alb_ratelimit_prefix: str = "marchproxy:rl:alb:"
    #: TLS listener port (0 = ephemeral); -1 disables it. Certificates come from module config.
    alb_tls_port: int = Field(default=-1, ge=-1, le=65535)


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = MAX_CONNECTIONS
    max_request_line: int = MAX_REQUEST_LINE
    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS
    header_timeout: float = HEADER_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT

    @classmethod
    def from_settings(cls, s: AlbSettings) -> Limits:
        return cls(
            max_connections=s.alb_max_connections,
            max_request_line=s.alb_max_request_line,
            max_header_bytes=s.alb_max_header_bytes,
            max_headers=s.alb_max_headers,
            header_timeout=s.alb_header_timeout,
            keepalive_timeout=s.alb_keepalive_timeout,
        )

    def merged(self, raw: Mapping[str, Any] | None) -> Limits:
        if not raw:
            return self
        known = {k: raw[k] for k in self.__dataclass_fields__ if k in raw}
        out = replace(self, **known)
        for k in out.__dataclass_fields__:
            v = getattr(out, k)
            if not isinstance(v, int | float) or v <= 0:
                raise ValueError(f"limits.{k} must be a positive number")
        return out
