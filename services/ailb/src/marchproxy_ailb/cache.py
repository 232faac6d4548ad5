"""Response cache for identical non-stream requests (Redis with TTL, or an in-process LRU).

The cache key is sha256 over the scope (the key or team, unless entries are shared), the
endpoint and the canonical JSON of the body (sorted keys), so two requests that differ only in
key order or whitespace share an entry. Requests whose answers are sampled (temperature absent
or > 0, n > 1) are not cached unless ``cache_sampled`` says so. Clients opt out with
``x-marchproxy-cache: no-cache``. The in-process LRU is bounded by entries and by total bytes;
answers above ``max_entry_bytes`` are not cached anywhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

from .schema import CacheSettings


def cache_scope(settings: CacheSettings, key_id: str, team: str) -> str:
    """The part of the cache key that says who may share an entry."""
    if settings.scope == "shared":
        return ""
    if settings.scope == "team" and team:
        return f"team:{team}"
    return f"key:{key_id}"


def cacheable(kind: str, body: dict[str, Any], settings: CacheSettings) -> bool:
    """Only deterministic requests are cached unless ``cache_sampled``: temperature set to 0
    (absent means the provider's default, 1 for OpenAI and Anthropic, which samples) and one
    choice. Embeddings are always deterministic."""
    if settings.cache_sampled or kind == "embeddings":
        return True
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    temperature = body.get("temperature")
    return (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature <= 0
    )


def cache_key(endpoint: str, body: dict[str, Any], scope: str = "") -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{scope}\n{endpoint}\n{canon}".encode()).hexdigest()


class ResponseCache:
    def __init__(self, settings: CacheSettings, redis: Any | None, prefix: str) -> None:
        self.settings = settings
        self._redis = redis
        self._prefix = prefix
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        #: bytes of the answers in ``_local``
        self.local_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    async def get(self, key: str) -> bytes | None:
        if self._redis is not None:
            value = await self._redis.get(f"{self._prefix}cache:{key}")
            return bytes(value) if value is not None else None
        hit = self._local.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._local[key]
            self.local_bytes -= len(hit[1])
            return None
        self._local.move_to_end(key)
        return hit[1]

    async def put(self, key: str, value: bytes) -> None:
        cfg = self.settings
        if len(value) > cfg.max_entry_bytes:
            return
        if self._redis is not None:
            await self._redis.set(f"{self._prefix}cache:{key}", value, ex=cfg.ttl_seconds)
            return
        old = self._local.pop(key, None)
        if old is not None:
            self.local_bytes -= len(old[1])
        self._local[key] = (time.monotonic() + cfg.ttl_seconds, value)
        self.local_bytes += len(value)
        while len(self._local) > cfg.max_entries or self.local_bytes > cfg.max_bytes:
            _, (_, dropped) = self._local.popitem(last=False)
            self.local_bytes -= len(dropped)
