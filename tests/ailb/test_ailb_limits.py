"""Virtual keys, RPM/TPM limits across two AILB instances sharing Redis, budgets re-checked on
fallback, usage totals that survive a restart, and the response cache."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from marchproxy_ailb.module import AilbHooks
from tests.ailb.conftest import AilbFactory, base_url
from tests.ailb.fakes import FakeAnthropic, FakeOpenAI, Step

MSG = [{"role": "user", "content": "hi"}]
KEY = "sk-team-a-secret"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()


async def _avoid_window_edge(client: Any) -> None:
    """Fixed minute windows: start a limit test well inside one so it cannot straddle two."""
    secs, _ = await client.time()
    into = secs % 60
    if into > 45:
        await asyncio.sleep(61 - into)


def keyed(fake: FakeOpenAI, **key: Any) -> dict[str, Any]:
    return {
        "model_list": [
            {"model_name": "gpt-fake", "base_url": fake.url + "/v1", "model": "gpt-4o-mini"}
        ],
        "keys": [{"key_hash": KEY_HASH, "name": "team-a-key", "team": "a", **key}],
    }


async def _post(
    http: httpx.AsyncClient, hooks: AilbHooks, key: str = KEY, **extra: Any
) -> httpx.Response:
    body = {"model": "gpt-fake", "messages": MSG, **extra}
    return await http.post(
        base_url(hooks) + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )


async def test_keys_are_required_and_scoped(ailb: AilbFactory, fake_openai: FakeOpenAI) -> None:
    cfg = keyed(fake_openai, models=["gpt-*"])
    cfg["model_list"].append({"model_name": "other", "base_url": fake_openai.url + "/v1"})
    hooks = await ailb.start(cfg)
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as exc:
            await c.chat.completions.create(model="gpt-fake", messages=MSG)
        assert exc.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key=KEY, max_retries=0) as c:
        r = await c.chat.completions.create(model="gpt-fake", messages=MSG)
        assert r.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError):
            await c.chat.completions.create(model="other", messages=MSG)
        assert [m.id for m in (await c.models.list()).data] == ["gpt-fake"]
    async with httpx.AsyncClient() as http:
        r = await http.post(
            base_url(hooks) + "/chat/completions", json={"model": "gpt-fake", "messages": MSG}
        )
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "missing_api_key"


@pytest.mark.integration
async def test_rpm_shared_by_two_instances(
    ailb: AilbFactory, fake_openai: FakeOpenAI, redis_prefix: tuple[Any, str]
) -> None:
    client, prefix = redis_prefix
    await _avoid_window_edge(client)
    cfg = keyed(fake_openai, rpm=3)
    a = await ailb.start(cfg, redis=client, ailb_redis_prefix=prefix)
    b = await ailb.start(cfg, redis=client, ailb_redis_prefix=prefix)
    async with httpx.AsyncClient() as http:
        statuses = [(await _post(http, inst)).status_code for inst in (a, b, a)]
        assert statuses == [200, 200, 200]
        refused = await _post(http, b)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    h = refused.headers
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(h["Retry-After"]) <= 60
    assert len(fake_openai.requests) == 3
    async with openai.AsyncOpenAI(base_url=base_url(a), api_key=KEY, max_retries=0) as c:
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model="gpt-fake", messages=MSG)


@pytest.mark.integration
async def test_tpm_shared_by_two_instances(
    ailb: AilbFactory, fake_openai: FakeOpenAI, redis_prefix: tuple[Any, str]
) -> None:
    client, prefix = redis_prefix
    await _avoid_window_edge(client)
    cfg = keyed(fake_openai, tpm=25)  # each call uses 10 prompt + 4 completion tokens
    a = await ailb.start(cfg, redis=client, ailb_redis_prefix=prefix)
    b = await ailb.start(cfg, redis=client, ailb_redis_prefix=prefix)
    async with httpx.AsyncClient() as http:
        first = await _post(http, a)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "25"
        assert (await _post(http, b)).status_code == 200
        refused = await _post(http, a)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def budget_config(primary: FakeOpenAI, paid: FakeAnthropic, budget: float) -> dict[str, Any]:
    return {
        "model_list": [
            {"model_name": "free", "base_url": primary.url + "/v1", "model": "local"},
            # one USD per token: one fallback hop costs more than the budget allows
            {
                "model_name": "paid",
                "provider": "anthropic",
                "base_url": paid.url,
                "api_key": "k",
                "model": "claude-x",
                "price": {"input": 1_000_000, "output": 1_000_000},
            },
        ],
        "router_settings": {"fallbacks": {"free": ["paid"]}},
        "keys": [{"key_hash": KEY_HASH, "name": "budgeted", "budget": budget}],
    }


@pytest.mark.integration
async def test_budget_rechecked_on_fallback_hop(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    redis_prefix: tuple[Any, str],
) -> None:
    client, prefix = redis_prefix
    hooks = await ailb.start(
        budget_config(fake_openai, fake_anthropic, budget=5.0),
        redis=client,
        ailb_redis_prefix=prefix,
    )
    async with httpx.AsyncClient() as http:
        ok = await http.post(
            base_url(hooks) + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "free", "messages": MSG},
        )
        assert ok.status_code == 200  # the free deployment costs nothing
        fake_openai.fail(500)
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "free", "messages": MSG},
        )
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "budget_exceeded"
    assert fake_anthropic.requests == []  # the paid hop was never called


@pytest.mark.integration
async def test_spend_counts_and_blocks(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    redis_prefix: tuple[Any, str],
) -> None:
    client, prefix = redis_prefix
    hooks = await ailb.start(
        budget_config(fake_openai, fake_anthropic, budget=20.0),
        redis=client,
        ailb_redis_prefix=prefix,
    )
    async with httpx.AsyncClient() as http:
        # the hold is 7 estimated prompt + 5 max_tokens = 12 USD
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "paid", "messages": MSG, "max_tokens": 5},
        )
        assert r.status_code == 200
        totals = await hooks.usage.totals("budgeted")
        assert totals["cost_nusd"] == 14 * 1_000_000_000  # 10 prompt + 4 completion tokens
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "paid", "messages": MSG, "max_tokens": 5},
        )
        assert r.status_code == 429  # 14 spent + 12 held > 20
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "paid", "messages": MSG},
        )
        assert r.status_code == 429  # no max_tokens: 4096 completion tokens are held
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "free", "messages": MSG},
        )
        assert r.status_code == 200  # the free route still fits


async def _spend_some(hooks: AilbHooks) -> None:
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key=KEY, max_retries=0) as c:
        await c.chat.completions.create(model="gpt-fake", messages=MSG)
        stream = await c.chat.completions.create(model="gpt-fake", messages=MSG, stream=True)
        async for _ in stream:
            pass


def priced(fake: FakeOpenAI) -> dict[str, Any]:
    fake.cached_tokens = 4
    cfg = keyed(fake)
    cfg["model_list"][0]["price"] = {"input": 2.0, "cached_input": 1.0, "output": 4.0}
    return cfg


# per call: (10 - 4 cached) * 2 + 4 * 1 + 4 * 4 = 32 USD per million tokens -> 32_000 nano-USD
COST_PER_CALL = 32_000


@pytest.mark.integration
async def test_usage_totals_survive_restart_redis(
    ailb: AilbFactory, fake_openai: FakeOpenAI, redis_prefix: tuple[Any, str]
) -> None:
    client, prefix = redis_prefix
    first = await ailb.start(priced(fake_openai), redis=client, ailb_redis_prefix=prefix)
    await _spend_some(first)
    await ailb.stop(first)
    second = await ailb.start(priced(fake_openai), redis=client, ailb_redis_prefix=prefix)
    totals = await second.usage.totals("team-a-key")
    assert totals == {
        "requests": 2,
        "prompt_tokens": 20,
        "completion_tokens": 8,
        "cached_tokens": 8,
        "cache_write_tokens": 0,
        "cost_nusd": 2 * COST_PER_CALL,
    }
    await _spend_some(second)
    assert (await second.usage.totals("team-a-key"))["cost_nusd"] == 4 * COST_PER_CALL


async def test_usage_totals_survive_restart_log(
    ailb: AilbFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    log = str(tmp_path / "usage.jsonl")
    first = await ailb.start(priced(fake_openai), ailb_usage_log=log)
    await _spend_some(first)
    await ailb.stop(first)
    second = await ailb.start(priced(fake_openai), ailb_usage_log=log)
    totals = await second.usage.totals("team-a-key")
    assert totals == {
        "requests": 2,
        "prompt_tokens": 20,
        "completion_tokens": 8,
        "cached_tokens": 8,
        "cache_write_tokens": 0,
        "cost_nusd": 2 * COST_PER_CALL,
    }
    await _spend_some(second)
    await ailb.stop(second)
    third = await ailb.start(priced(fake_openai), ailb_usage_log=log)
    assert (await third.usage.totals("team-a-key"))["requests"] == 4
    async with httpx.AsyncClient() as http:
        info = (
            await http.get(
                base_url(third) + "/key/info", headers={"Authorization": f"Bearer {KEY}"}
            )
        ).json()
    assert info["key"] == "team-a-key"
    assert info["team"] == "a"
    assert info["usage"]["cost_nusd"] == 4 * COST_PER_CALL
    assert info["spend_usd"] == pytest.approx(4 * COST_PER_CALL / 1e9)


async def _cache_roundtrip(hooks: AilbHooks, fake: FakeOpenAI) -> None:
    async with httpx.AsyncClient() as http:
        first = await _post(http, hooks, temperature=0)
        again = await _post(http, hooks, temperature=0)
        assert first.headers["x-marchproxy-cache"] == "miss"
        assert again.headers["x-marchproxy-cache"] == "hit"
        assert again.json() == first.json()
        assert len(fake.requests) == 1
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            json={"model": "gpt-fake", "messages": MSG, "temperature": 0},
            headers={"Authorization": f"Bearer {KEY}", "x-marchproxy-cache": "no-cache"},
        )
        assert r.status_code == 200
        assert len(fake.requests) == 2
        await _post(http, hooks, temperature=1)  # a different body is a different entry
        assert len(fake.requests) == 3


async def test_cache_in_process(ailb: AilbFactory, fake_openai: FakeOpenAI) -> None:
    cfg = keyed(fake_openai)
    cfg["cache"] = {"enabled": True, "ttl_seconds": 60}
    await _cache_roundtrip(await ailb.start(cfg), fake_openai)


@pytest.mark.integration
async def test_cache_in_redis_shared(
    ailb: AilbFactory, fake_openai: FakeOpenAI, redis_prefix: tuple[Any, str]
) -> None:
    client, prefix = redis_prefix
    cfg = keyed(fake_openai)
    cfg["cache"] = {"enabled": True, "ttl_seconds": 60}
    a = await ailb.start(cfg, redis=client, ailb_redis_prefix=prefix)
    await _cache_roundtrip(a, fake_openai)
    b = await ailb.start(cfg, redis=client, ailb_redis_prefix=prefix)
    async with httpx.AsyncClient() as http:
        r = await _post(http, b, temperature=0)
    assert r.headers["x-marchproxy-cache"] == "hit"  # filled by the other replica
    assert len(fake_openai.requests) == 3


async def test_tpm_rechecked_on_fallback_hop(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_openai2: FakeOpenAI
) -> None:
    """While the first hop hangs and fails, another request spends the key's tokens: the
    fallback hop must not run over the TPM limit."""
    hooks = await ailb.start(
        {
            "model_list": [
                {"model_name": "main", "base_url": fake_openai.url + "/v1"},
                {"model_name": "backup", "base_url": fake_openai2.url + "/v1"},
            ],
            "router_settings": {"fallbacks": {"main": ["backup"]}},
            "keys": [{"key_hash": KEY_HASH, "name": "k", "tpm": 20}],
        }
    )
    fake_openai.script.append(Step(status=500, delay=1.0))
    async with httpx.AsyncClient() as http:
        url = base_url(hooks) + "/chat/completions"
        auth = {"Authorization": f"Bearer {KEY}"}
        slow = asyncio.ensure_future(
            http.post(url, headers=auth, json={"model": "main", "messages": MSG})
        )
        async with asyncio.timeout(10):
            while not fake_openai.requests:  # the first hop is out and hanging
                await asyncio.sleep(0.01)
        fast = await http.post(url, headers=auth, json={"model": "backup", "messages": MSG})
        assert fast.status_code == 200  # 14 tokens used
        refused = await slow
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert len(fake_openai2.requests) == 1  # the fallback hop never went out


async def _two_processes(
    tmp_path: Path, procs: Any, prefix: str, config: dict[str, Any]
) -> list[int]:
    """Two real AILB processes (python -m marchproxy_ailb) sharing Redis: their data ports."""
    import yaml

    from tests.conftest import free_port, wait_port

    cfg = tmp_path / "ailb.yaml"
    cfg.write_text(yaml.safe_dump({"modules": [{"name": "ailb", "config": config}]}))
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        procs.python(
            f"ailb{i}",
            "marchproxy_ailb",
            {
                "CONFIG_FILE": str(cfg),
                "DATA_PORT": str(port),
                "GRPC_PORT": "0",
                "ADMIN_PORT": "0",
                "REGISTER_WITH_NLB": "false",
                "API_URL": "",
                "REDIS_URL": "redis://127.0.0.1:6379/0",
                "AILB_REDIS_PREFIX": prefix,
            },
        )
    for port in ports:
        await asyncio.to_thread(wait_port, port)
    return ports


async def _post_port(http: httpx.AsyncClient, port: int) -> httpx.Response:
    return await http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": "gpt-fake", "messages": MSG},
        headers={"Authorization": f"Bearer {KEY}"},
    )


@pytest.mark.integration
async def test_rpm_across_two_processes(
    tmp_path: Path, procs: Any, fake_openai: FakeOpenAI, redis_prefix: tuple[Any, str]
) -> None:
    """Two real AILB processes share one key's RPM via Redis."""
    client, prefix = redis_prefix
    ports = await _two_processes(tmp_path, procs, prefix, keyed(fake_openai, rpm=2))
    await _avoid_window_edge(client)
    async with httpx.AsyncClient(timeout=20) as http:
        codes = [(await _post_port(http, port)).status_code for port in (*ports, ports[0])]
    assert codes == [200, 200, 429]
    assert len(fake_openai.requests) == 2


@pytest.mark.integration
async def test_tpm_across_two_processes(
    tmp_path: Path, procs: Any, fake_openai: FakeOpenAI, redis_prefix: tuple[Any, str]
) -> None:
    """Two real AILB processes share one key's TPM via Redis: each call uses 10 prompt + 4
    completion tokens and is admitted while used + its 7 estimated prompt tokens fit in 25."""
    client, prefix = redis_prefix
    ports = await _two_processes(tmp_path, procs, prefix, keyed(fake_openai, tpm=25))
    await _avoid_window_edge(client)
    async with httpx.AsyncClient(timeout=20) as http:
        first = await _post_port(http, ports[0])  # 0 used: admitted, 14 used after
        second = await _post_port(http, ports[1])  # 14 + 7 <= 25: admitted, 28 used after
        refused = await _post_port(http, ports[0])  # 28 + 7 > 25
        other = await _post_port(http, ports[1])
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["x-ratelimit-remaining-tokens"] == "11"  # counted by the other process
    for r in (refused, other):
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "tokens"
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert len(fake_openai.requests) == 2


async def test_redis_down_fails_open(ailb: AilbFactory, fake_openai: FakeOpenAI) -> None:
    """Limits, usage and cache live in Redis; when it is gone, traffic still flows (a key with
    a budget fails closed instead: tests/ailb/test_ailb_budget.py)."""
    from tests.conftest import free_port

    dead = aioredis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )
    try:
        cfg = keyed(fake_openai, rpm=100, tpm=100_000)
        cfg["cache"] = {"enabled": True}
        hooks = await ailb.start(cfg, redis=dead, ailb_redis_prefix="test:ailb:dead:")
        async with httpx.AsyncClient() as http:
            r = await _post(http, hooks)
            assert r.status_code == 200
            s = await _post(http, hooks, stream=True)
            assert s.status_code == 200
            assert "data: [DONE]" in s.text
        scrape = hooks.metrics_registry.get_sample_value(
            "ailb_backend_errors_total", {"what": "limits"}
        )
        assert scrape is not None and scrape >= 1
    finally:
        await dead.aclose()


def _teams_config(fake: FakeOpenAI, **cache: Any) -> dict[str, Any]:
    return {
        "model_list": [{"model_name": "gpt-fake", "base_url": fake.url + "/v1"}],
        "keys": [
            {"key": "sk-a1", "name": "a1", "team": "a"},
            {"key": "sk-a2", "name": "a2", "team": "a"},
            {"key": "sk-b1", "name": "b1", "team": "b"},
            {"key": "sk-solo", "name": "solo"},
        ],
        "cache": {"enabled": True, **cache},
    }


async def _cache_state(hooks: AilbHooks, key: str, **extra: Any) -> str:
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key=key, max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-fake", messages=MSG, **extra
        )
    return raw.headers.get("x-marchproxy-cache", "none")


@pytest.mark.parametrize(
    ("scope", "expect"),
    [
        # a1 fills; then a2 (same team), b1 (other team), solo (no team), a1 again
        ("team", ["miss", "hit", "miss", "miss", "hit"]),
        ("key", ["miss", "miss", "miss", "miss", "hit"]),
        ("shared", ["miss", "hit", "hit", "hit", "hit"]),
    ],
)
async def test_cache_entries_are_scoped_to_team_or_key(
    ailb: AilbFactory, fake_openai: FakeOpenAI, scope: str, expect: list[str]
) -> None:
    hooks = await ailb.start(_teams_config(fake_openai, scope=scope))
    got = [
        await _cache_state(hooks, key, temperature=0)
        for key in ("sk-a1", "sk-a2", "sk-b1", "sk-solo", "sk-a1")
    ]
    assert got == expect
    assert len(fake_openai.requests) == expect.count("miss")


async def test_sampled_requests_are_not_cached_unless_opted_in(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    hooks = await ailb.start(_teams_config(fake_openai))
    sampled: list[dict[str, Any]] = [{}, {"temperature": 0.7}, {"temperature": 0, "n": 2}]
    for extra in sampled:  # no temperature = the provider's default (1): sampled
        assert [await _cache_state(hooks, "sk-a1", **extra) for _ in range(2)] == ["none"] * 2
    assert len(fake_openai.requests) == 2 * len(sampled)
    skipped = hooks.metrics_registry.get_sample_value("ailb_cache_total", {"result": "skipped"})
    assert skipped == 2 * len(sampled)
    opted = await ailb.start(_teams_config(fake_openai, cache_sampled=True))
    for extra in sampled:
        assert [await _cache_state(opted, "sk-a1", **extra) for _ in range(2)] == ["miss", "hit"]
