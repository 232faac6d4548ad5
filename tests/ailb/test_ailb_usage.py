"""Usage accounting that survives client disconnects, slow disks and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.ailb.conftest import AilbFactory, base_url
from tests.ailb.fakes import FakeOpenAI, HoldingTcpProxy

MSG = [{"role": "user", "content": "hi"}]
KEY = "sk-usage-secret"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()


def usage_config(fake: FakeOpenAI, **key: Any) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "m",
                "base_url": fake.url + "/v1",
                "price": {"input": 1.0, "output": 1.0},
            }
        ],
        "keys": [{"key_hash": KEY_HASH, "name": "user-key", **key}],
    }


@pytest.fixture
async def held_redis(redis_prefix: tuple[Any, str]) -> AsyncIterator[tuple[HoldingTcpProxy, Any]]:
    """A Redis client that talks to the machine's Redis through a proxy that can hold bytes."""
    proxy = await HoldingTcpProxy(6379).start()
    client = aioredis.from_url(proxy.url)
    try:
        yield proxy, client
    finally:
        proxy.release()
        await client.aclose()
        await proxy.close()


@pytest.mark.integration
async def test_non_stream_usage_is_kept_when_the_client_leaves(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    redis_prefix: tuple[Any, str],
    held_redis: tuple[HoldingTcpProxy, Any],
) -> None:
    """The upstream answered, then the client went away while the gateway was recording the
    usage: the record, the TPM tokens and the budget release still happen, and the deployment
    is no longer counted in flight."""
    direct, prefix = redis_prefix
    proxy, client = held_redis
    hooks = await ailb.start(
        usage_config(fake_openai, tpm=100_000, budget=100.0), redis=client, ailb_redis_prefix=prefix
    )
    fake_openai.delay(0.3)  # time to start holding Redis once the request is upstream
    async with httpx.AsyncClient() as http:
        request = asyncio.ensure_future(
            http.post(
                base_url(hooks) + "/chat/completions",
                json={"model": "m", "messages": MSG, "max_tokens": 10},
                headers={"Authorization": f"Bearer {KEY}"},
            )
        )
        async with asyncio.timeout(10):
            while not fake_openai.requests:
                await asyncio.sleep(0.01)
            proxy.hold()  # the answer's usage record will now wait in the proxy
            await proxy.got_held.wait()
            request.cancel()  # ... and the client leaves meanwhile
            with contextlib.suppress(asyncio.CancelledError):
                await request
            while hooks.gateway.active:  # the gateway saw the disconnect
                await asyncio.sleep(0.01)
    proxy.release()
    async with asyncio.timeout(10):
        while True:
            totals = await direct.hgetall(prefix + "usage:user-key")
            if totals.get(b"requests") == b"1":
                break
            await asyncio.sleep(0.02)
        while hooks.status()["groups"]["m"][0]["in_flight"]:
            await asyncio.sleep(0.02)
        while await direct.zcard(prefix + "budget:user-key:leases"):
            await asyncio.sleep(0.02)
    assert int(totals[b"prompt_tokens"]) == 10
    assert int(totals[b"completion_tokens"]) == 4
    tok_keys = [k async for k in direct.scan_iter(match=prefix + "rl:user-key:tok:*")]
    assert tok_keys and int(await direct.get(tok_keys[0])) == 14
    assert int(await direct.get(prefix + "budget:user-key:held") or 0) == 0
