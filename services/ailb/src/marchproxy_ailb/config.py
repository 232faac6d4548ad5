"""AILB process settings (environment) on top of the shared module settings."""

from __future__ import annotations

from pydantic import Field

from marchproxy_common.config import ModuleSettings


class AilbSettings(ModuleSettings):
    #: append-only JSONL usage log; totals are rebuilt from it at start when Redis is absent
    ailb_usage_log: str = ""
    #: prefix of every Redis key the AILB writes (limits, usage, cache)
    ailb_redis_prefix: str = "marchproxy:ailb:"
    #: largest request body accepted from a client
    ailb_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: largest non-stream upstream answer relayed (held whole in memory); larger ones are 502
    ailb_max_upstream_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
