"""AILB process settings (environment) on top of the shared module settings."""

from __future__ import annotations

from pydantic import Field

from marchproxy_common.config import ModuleSettings


class AilbSettings(ModuleSettings):
    #: append-only JSONL usage log; replayed at start (the totals without Redis, the keys Redis
    #: has no totals for with it)
    ailb_usage_log: str = ""
    #: the usage log is rotated past this size (0: never); the new file starts with a
    #: checkpoint of the totals, so replaying it alone is exact
    ailb_usage_log_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    #: rotated usage logs kept (path.1 is the newest); older ones are deleted
    ailb_usage_log_backups: int = Field(default=4, ge=0, le=1000)
    #: prefix of every Redis key the AILB writes (limits, usage, cache)
    ailb_redis_prefix: str = "marchproxy:ailb:"
    #: largest request body accepted from a client
    ailb_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: largest non-stream upstream answer relayed (held whole in memory); larger ones are 502
    ailb_max_upstream_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
