"""Budgets under concurrency: each hop holds its worst-case cost before it goes out and settles
to the actual cost after, so parallel requests cannot all spend the same money."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import openai
import pytest

from marchproxy_ailb.module import AilbHooks
from tests.ailb.conftest import AilbFactory, base_url
from tests.ailb.fakes import FakeOpenAI

MSG = [{"role": "user", "content": "hi"}]  # estimated at 7 prompt tokens
KEY = "sk-budget-secret"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()
USD = 1_000_000_000  # nano-USD


def one_usd_per_token(fake: FakeOpenAI, budget: float) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "paid",
                "base_url": fake.url + "/v1",
                "model": "gpt-x",
                "price": {"input": 1_000_000, "output": 1_000_000},
            }
        ],
        "keys": [{"key_hash": KEY_HASH, "name": "budgeted", "budget": budget}],
    }


async def _ask(client: openai.AsyncOpenAI, stream: bool) -> str:
    try:
        if stream:
            chunks = await client.chat.completions.create(
                model="paid", messages=MSG, max_tokens=8, stream=True
            )
            async for _ in chunks:
                pass
        else:
            await client.chat.completions.create(model="paid", messages=MSG, max_tokens=8)
    except openai.RateLimitError as exc:
        return "refused" if exc.code == "budget_exceeded" else f"other 429: {exc.code}"
    return "ok"


async def _start(
    ailb: AilbFactory, fake: FakeOpenAI, redis: tuple[Any, str] | None, budget: float
) -> AilbHooks:
    if redis is None:
        return await ailb.start(one_usd_per_token(fake, budget))
    client, prefix = redis
    return await ailb.start(one_usd_per_token(fake, budget), redis=client, ailb_redis_prefix=prefix)


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("backend", ["in-process", "redis"])
async def test_concurrent_requests_cannot_overspend(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    redis_prefix: tuple[Any, str],
    backend: str,
    stream: bool,
) -> None:
    # each request: hold 7 (prompt estimate) + 8 (max_tokens) = 15 USD; actual 5 + 4 = 9 USD
    fake_openai.prompt_tokens = 5
    fake_openai.delay(1.0, times=10)  # all ten are in flight at once
    hooks = await _start(
        ailb, fake_openai, redis_prefix if backend == "redis" else None, budget=50.0
    )
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key=KEY, max_retries=0) as c:
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*(_ask(c, stream) for _ in range(10)))
        spent = (await hooks.usage.totals("budgeted"))["cost_nusd"]
        assert spent <= 50 * USD
        assert set(outcomes) <= {"ok", "refused"}
        admitted = outcomes.count("ok")
        assert 1 <= admitted < 10
        assert spent == admitted * 9 * USD
        assert len(fake_openai.requests) == admitted
        # settled: the unused part of every hold came back, so more fit while 50 allows
        for _ in range(10):
            if (await hooks.usage.totals("budgeted"))["cost_nusd"] + 15 * USD > 50 * USD:
                break
            assert await _ask(c, stream) == "ok"
        assert await _ask(c, stream) == "refused"
    final = (await hooks.usage.totals("budgeted"))["cost_nusd"]
    assert 50 * USD - 15 * USD < final <= 50 * USD
    assert hooks.gateway.ledger.held_local("budgeted") == 0
    if backend == "redis":
        client, prefix = redis_prefix
        assert int(await client.get(prefix + "budget:budgeted:held") or 0) == 0
        assert await client.zcard(prefix + "budget:budgeted:leases") == 0


async def test_budget_fails_closed_when_spend_cannot_be_read(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    """Redis is down: a key with a budget gets 503 budget_unavailable and nothing goes
    upstream; a key with only rate limits is still served (those fail open)."""
    import redis.asyncio as aioredis

    from tests.conftest import free_port

    dead = aioredis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )
    try:
        cfg = one_usd_per_token(fake_openai, budget=1000.0)
        cfg["keys"].append({"key": "sk-rate-only", "name": "rate-only", "rpm": 100})
        hooks = await ailb.start(cfg, redis=dead, ailb_redis_prefix="test:ailb:dead:")
        url = base_url(hooks)
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as c:
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as exc:
                    await c.chat.completions.create(
                        model="paid", messages=MSG, max_tokens=8, stream=stream
                    )
                assert exc.value.status_code == 503
                assert exc.value.code == "budget_unavailable"
                assert exc.value.response.headers["Retry-After"] == "1"
        assert fake_openai.requests == []
        async with openai.AsyncOpenAI(base_url=url, api_key="sk-rate-only", max_retries=0) as c:
            r = await c.chat.completions.create(model="paid", messages=MSG)
            assert r.choices[0].message.content
        assert len(fake_openai.requests) == 1
        scrape = hooks.metrics_registry.get_sample_value(
            "ailb_backend_errors_total", {"what": "budget"}
        )
        assert scrape is not None and scrape >= 2
    finally:
        await dead.aclose()
