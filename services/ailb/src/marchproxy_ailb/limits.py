"""Per-key RPM/TPM limits and budgets, shared by every replica through Redis.

Windows are fixed minutes of Redis server time (so replicas agree on the window without clock
sync). A request is admitted when the key's requests in this window are below ``rpm`` and its
tokens plus the request's estimated prompt tokens fit in ``tpm``; the check and the increment are
one Lua script, so two replicas cannot both take the last slot. Tokens actually used are added
when the response is known. Without Redis the same rules run in process (one replica only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import GatewayError
from .keys import KeyInfo

WINDOW_S = 60
#: Redis counters outlive their window by one more, then expire
COUNTER_TTL_MS = 2 * WINDOW_S * 1000

# KEYS: requests-prefix, tokens-prefix; ARGV: rpm (0 = none), tpm (0 = none), estimated tokens
_ADMIT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = math.floor(now_ms / 60000)
local reset_ms = (window + 1) * 60000 - now_ms
local rk = KEYS[1] .. ':' .. window
local tk = KEYS[2] .. ':' .. window
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local est = tonumber(ARGV[3])
local reqs = tonumber(redis.call('GET', rk) or '0')
local toks = tonumber(redis.call('GET', tk) or '0')
if rpm > 0 and reqs >= rpm then return {0, reqs, toks, reset_ms, 1} end
if tpm > 0 and toks + est > tpm then return {0, reqs, toks, reset_ms, 2} end
reqs = redis.call('INCR', rk)
redis.call('PEXPIRE', rk, ARGV[4])
return {1, reqs, toks, reset_ms, 0}
"""

_ADD_TOKENS = """
local t = redis.call('TIME')
local window = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / 60000)
local tk = KEYS[1] .. ':' .. window
redis.call('INCRBY', tk, ARGV[1])
redis.call('PEXPIRE', tk, ARGV[2])
return 1
"""


_TOKENS_NOW = """
local t = redis.call('TIME')
local window = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / 60000)
return tonumber(redis.call('GET', KEYS[1] .. ':' .. window) or '0')
"""


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    requests: int
    tokens: int
    reset_s: float
    #: "requests" or "tokens" when refused
    exceeded: str = ""


def _fmt_reset(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``120ms``."""
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(key: KeyInfo, adm: Admission) -> dict[str, str]:
    h: dict[str, str] = {}
    if key.rpm is not None:
        h["x-ratelimit-limit-requests"] = str(key.rpm)
        h["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - adm.requests))
        h["x-ratelimit-reset-requests"] = _fmt_reset(adm.reset_s)
    if key.tpm is not None:
        h["x-ratelimit-limit-tokens"] = str(key.tpm)
        h["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - adm.tokens))
        h["x-ratelimit-reset-tokens"] = _fmt_reset(adm.reset_s)
    return h


def refusal(key: KeyInfo, adm: Admission) -> GatewayError:
    headers = rate_headers(key, adm)
    headers["Retry-After"] = str(max(1, int(adm.reset_s + 0.999)))
    if adm.exceeded == "requests":
        msg = f"Rate limit reached for key {key.key_id} on requests per min (RPM): Limit {key.rpm}."
    else:
        msg = f"Rate limit reached for key {key.key_id} on tokens per min (TPM): Limit {key.tpm}."
    return GatewayError(
        429,
        msg,
        type="requests" if adm.exceeded == "requests" else "tokens",
        code="rate_limit_exceeded",
        headers=headers,
    )


class Limiter:
    """RPM/TPM admission. ``redis`` is a ``redis.asyncio.Redis`` or None (in process)."""

    def __init__(self, redis: Any | None, prefix: str, clock: Callable[[], float] = time.time):
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._admit = redis.register_script(_ADMIT) if redis is not None else None
        self._add = redis.register_script(_ADD_TOKENS) if redis is not None else None
        self._tokens_now = redis.register_script(_TOKENS_NOW) if redis is not None else None
        self._local: dict[str, list[int]] = {}  # key -> [window, requests, tokens]

    def _keys(self, key: KeyInfo) -> tuple[str, str]:
        return f"{self._prefix}rl:{key.key_id}:req", f"{self._prefix}rl:{key.key_id}:tok"

    async def admit(self, key: KeyInfo, estimated_tokens: int) -> Admission | None:
        if key.rpm is None and key.tpm is None:
            return None
        rpm, tpm = key.rpm or 0, key.tpm or 0
        if self._admit is not None:
            ok, reqs, toks, reset_ms, why = await self._admit(
                keys=list(self._keys(key)), args=[rpm, tpm, estimated_tokens, COUNTER_TTL_MS]
            )
            exceeded = {1: "requests", 2: "tokens"}.get(int(why), "")
            return Admission(bool(ok), int(reqs), int(toks), int(reset_ms) / 1000, exceeded)
        now = self._clock()
        window = int(now // WINDOW_S)
        slot = self._local.get(key.key_id)
        if slot is None or slot[0] != window:
            slot = self._local[key.key_id] = [window, 0, 0]
        reset = (window + 1) * WINDOW_S - now
        if rpm and slot[1] >= rpm:
            return Admission(False, slot[1], slot[2], reset, "requests")
        if tpm and slot[2] + estimated_tokens > tpm:
            return Admission(False, slot[1], slot[2], reset, "tokens")
        slot[1] += 1
        return Admission(True, slot[1], slot[2], reset)

    async def tokens_fit(self, key: KeyInfo, estimated_tokens: int) -> bool:
        """Read-only TPM check (for fallback hops: the request was already counted)."""
        if key.tpm is None:
            return True
        if self._redis is not None:
            used = await self._tokens_used(key)
        else:
            slot = self._local.get(key.key_id)
            window = int(self._clock() // WINDOW_S)
            used = slot[2] if slot is not None and slot[0] == window else 0
        return used + estimated_tokens <= key.tpm

    async def _tokens_used(self, key: KeyInfo) -> int:
        assert self._tokens_now is not None
        return int(await self._tokens_now(keys=[self._keys(key)[1]]))

    async def add_tokens(self, key: KeyInfo, tokens: int) -> None:
        if key.tpm is None or tokens <= 0:
            return
        if self._add is not None:
            await self._add(keys=[self._keys(key)[1]], args=[tokens, COUNTER_TTL_MS])
            return
        window = int(self._clock() // WINDOW_S)
        slot = self._local.get(key.key_id)
        if slot is None or slot[0] != window:
            slot = self._local[key.key_id] = [window, 0, 0]
        slot[2] += tokens
