"""Budgets: hold a hop's worst-case cost before it goes out, settle to the actual cost after.

A key's spend is its usage total ``cost_nusd`` (see :mod:`marchproxy_ailb.usage`). Before each
hop the gateway asks for a *hold* of that hop's worst case (prompt estimate at the dearest
prompt price + the completion cap at the output price). A hold is granted only when

    spent < budget  and  spent + held + amount <= budget

checked and taken in one step: one Lua script in Redis (shared by every replica), or one
synchronous block in process (no await between the check and the take). After the answer the
gateway records the actual cost (spend grows) and then releases the hold, in that order, so a
concurrent check never sees less than the truth. Concurrent requests can therefore not all
pass on the same unspent money.

The only way to end above the budget is an answer that costs more than its hold: the upstream
counts more prompt tokens than the gateway's estimate (tokens.py), or writes more completion
tokens than the cap (a client that set no ``max_tokens`` gets ``budgets.default_max_tokens``
reserved). Spend is bounded by ``budget + sum(max(0, actual - held))`` over those requests.

Redis holds are leases (a sorted set scored by expiry, Redis server time) with a running total,
so a replica that dies with holds outstanding frees them when the lease runs out; long streams
renew theirs while they relay.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from .keys import KeyInfo
from .usage import UsageStore

#: expired leases reaped per reserve call (the rest go on the next call)
REAP_BATCH = 256

# the lease keys live as long as their longest lease (never shortened by a shorter one)
_EXTEND = """
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: usage hash, lease zset, held counter
# ARGV: budget, amount, lease member ("<amount>:<id>"), lease ms, leases reaped at most
_RESERVE = (
    _EXTEND
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = tonumber(redis.call('GET', KEYS[3]) or '0')
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, m in ipairs(expired) do
  if redis.call('ZREM', KEYS[2], m) == 1 then
    held = held - tonumber(string.match(m, '^(%d+):'))
  end
end
if held < 0 then held = 0 end
local spent = tonumber(redis.call('HGET', KEYS[1], 'cost_nusd') or '0')
local budget = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local ok = 0
if spent < budget and spent + held + amount <= budget then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
  held = held + amount
  ok = 1
end
redis.call('SET', KEYS[3], string.format('%d', held), 'KEEPTTL')
extend(KEYS[2], tonumber(ARGV[4]))
extend(KEYS[3], tonumber(ARGV[4]))
return {ok, string.format('%d', spent), string.format('%d', held)}
"""
)

# KEYS: lease zset, held counter; ARGV: lease member
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local held = tonumber(redis.call('GET', KEYS[2]) or '0')
  held = held - tonumber(string.match(ARGV[1], '^(%d+):'))
  if held < 0 then held = 0 end
  redis.call('SET', KEYS[2], string.format('%d', held), 'KEEPTTL')
  return 1
end
return 0
"""

# KEYS: lease zset, held counter; ARGV: lease member, lease ms
_RENEW = (
    _EXTEND
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
extend(KEYS[1], tonumber(ARGV[2]))
extend(KEYS[2], tonumber(ARGV[2]))
return n
"""
)


@dataclass(slots=True)
class Hold:
    """Money set aside for one hop; released exactly once by :meth:`BudgetLedger.release`."""

    key_id: str
    amount: int
    member: str
    lease_s: float
    released: bool = False


class BudgetLedger:
    """Holds per key. ``redis`` is a ``redis.asyncio.Redis`` or None (in process)."""

    def __init__(self, redis: Any | None, prefix: str, usage: UsageStore) -> None:
        self._redis = redis
        self._prefix = prefix
        self._usage = usage
        self._reserve = redis.register_script(_RESERVE) if redis is not None else None
        self._release = redis.register_script(_RELEASE) if redis is not None else None
        self._renew = redis.register_script(_RENEW) if redis is not None else None
        self._held: dict[str, int] = {}

    def _keys(self, key_id: str) -> tuple[str, str]:
        base = f"{self._prefix}budget:{key_id}"
        return f"{base}:leases", f"{base}:held"

    def held_local(self, key_id: str) -> int:
        return self._held.get(key_id, 0)

    async def reserve(self, key: KeyInfo, amount: int, lease_s: float) -> Hold | None:
        """A hold of ``amount`` nano-USD, or None when the budget cannot cover it. Raises when
        the spend cannot be read (Redis trouble): the caller decides what that means."""
        assert key.budget_nusd is not None
        amount = max(0, int(amount))
        member = f"{amount}:{uuid.uuid4().hex}"
        if self._reserve is not None:
            usage_key = self._usage.redis_key(key.key_id)
            ok, _, _ = await self._reserve(
                keys=[usage_key, *self._keys(key.key_id)],
                args=[key.budget_nusd, amount, member, max(1, int(lease_s * 1000)), REAP_BATCH],
            )
            return Hold(key.key_id, amount, member, lease_s) if int(ok) else None
        # in process: no await between the check and the take, so it is atomic on this loop
        spent = self._usage.local_spend(key.key_id)
        held = self._held.get(key.key_id, 0)
        if spent >= key.budget_nusd or spent + held + amount > key.budget_nusd:
            return None
        self._held[key.key_id] = held + amount
        return Hold(key.key_id, amount, member, lease_s)

    async def release(self, hold: Hold) -> None:
        """Give the hold back (after the actual cost was recorded). Idempotent."""
        if hold.released:
            return
        hold.released = True
        if self._release is not None:
            await self._release(keys=list(self._keys(hold.key_id)), args=[hold.member])
            return
        left = self._held.get(hold.key_id, 0) - hold.amount
        if left > 0:
            self._held[hold.key_id] = left
        else:
            self._held.pop(hold.key_id, None)

    async def renew(self, hold: Hold) -> None:
        """Extend a Redis lease by its length from now (long streams call this as they go)."""
        if self._renew is not None and not hold.released:
            await self._renew(
                keys=list(self._keys(hold.key_id)),
                args=[hold.member, max(1, int(hold.lease_s * 1000))],
            )
