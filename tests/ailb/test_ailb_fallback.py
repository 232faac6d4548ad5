"""Fallback on upstream 500/429/timeout, retries, cooldown and stream cancellation, through the
real openai client and real sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from tests.ailb.conftest import AilbFactory, base_url
from tests.ailb.fakes import FakeAnthropic, FakeOllama, FakeOpenAI, FakeUpstream, Step

MSG = [{"role": "user", "content": "hi"}]


def chain_config(primary: FakeOpenAI, backup: FakeAnthropic, **router: Any) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "main",
                "provider": "openai",
                "base_url": primary.url + "/v1",
                "model": "gpt-4o-mini",
                "timeout": 0.5,
            },
            {
                "model_name": "backup",
                "provider": "anthropic",
                "base_url": backup.url,
                "api_key": "k",
                "model": "claude-x",
            },
        ],
        "router_settings": {
            "fallbacks": {"main": ["backup"]},
            "retry_backoff_seconds": 0.01,
            **router,
        },
    }


@pytest.mark.parametrize("status", [500, 429, 503])
async def test_fallback_on_status(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, status: int
) -> None:
    hooks = await ailb.start(chain_config(fake_openai, fake_anthropic))
    fake_openai.fail(status)  # no Retry-After: one failure alone does not cool it down
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        r = await c.chat.completions.create(model="main", messages=MSG)
    assert r.choices[0].message.content == "Hello from anthropic: hi"
    assert len(fake_openai.requests) == 1
    assert len(fake_anthropic.requests) == 1
    async with httpx.AsyncClient() as http:
        again = await http.post(
            base_url(hooks) + "/chat/completions", json={"model": "main", "messages": MSG}
        )
    assert again.headers["x-marchproxy-deployment"] == "main#0"


async def test_fallback_on_timeout(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    hooks = await ailb.start(chain_config(fake_openai, fake_anthropic))
    fake_openai.delay(5.0)
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        async with asyncio.timeout(20):
            r = await c.chat.completions.create(model="main", messages=MSG)
    assert r.choices[0].message.content == "Hello from anthropic: hi"


async def test_stream_falls_back_before_first_byte(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    hooks = await ailb.start(chain_config(fake_openai, fake_anthropic))
    fake_openai.fail(500)
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        stream = await c.chat.completions.create(model="main", messages=MSG, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == "Hello from anthropic: hi"


async def test_cooldown_skips_failing_deployment(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    hooks = await ailb.start(
        chain_config(fake_openai, fake_anthropic, allowed_fails=1, cooldown_seconds=60)
    )
    fake_openai.fail(500)
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        for _ in range(3):
            r = await c.chat.completions.create(model="main", messages=MSG)
            assert r.choices[0].message.content == "Hello from anthropic: hi"
    assert len(fake_openai.requests) == 1  # cooled down after the first failure
    assert len(fake_anthropic.requests) == 3
    status = hooks.status()["groups"]["main"][0]
    assert status["cooling_down"] is True


async def test_retries_same_deployment_then_succeeds(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    cfg = chain_config(fake_openai, fake_anthropic)
    cfg["model_list"][0]["max_retries"] = 2
    hooks = await ailb.start(cfg)
    fake_openai.fail(500, times=2)
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        r = await c.chat.completions.create(model="main", messages=MSG)
    assert r.choices[0].message.content == "Hello from openai: hi"
    assert len(fake_openai.requests) == 3
    assert fake_anthropic.requests == []


async def test_all_failing_returns_last_error(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    hooks = await ailb.start(chain_config(fake_openai, fake_anthropic))
    fake_openai.fail(500)
    fake_anthropic.fail(429, retry_after="7")
    async with httpx.AsyncClient() as http:
        r = await http.post(
            base_url(hooks) + "/chat/completions", json={"model": "main", "messages": MSG}
        )
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["message"] == "scripted 429"


async def test_round_robin_spreads_over_group(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_openai2: FakeOpenAI
) -> None:
    hooks = await ailb.start(
        {
            "model_list": [
                {"model_name": "m", "base_url": fake_openai.url + "/v1"},
                {"model_name": "m", "base_url": fake_openai2.url + "/v1"},
            ]
        }
    )
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        for _ in range(6):
            await c.chat.completions.create(model="m", messages=MSG)
    assert len(fake_openai.requests) == 3
    assert len(fake_openai2.requests) == 3


@pytest.mark.parametrize("provider", ["openai", "anthropic", "ollama"])
async def test_client_disconnect_cancels_upstream(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_ollama: FakeOllama,
    provider: str,
) -> None:
    fake: FakeUpstream = {
        "openai": fake_openai,
        "anthropic": fake_anthropic,
        "ollama": fake_ollama,
    }[provider]
    fake.chunk_delay = 0.05
    fake.extra_words = 400  # ~20 s of stream if nobody cancels it
    url = fake.url + "/v1" if provider == "openai" else fake.url
    hooks = await ailb.start(
        {
            "model_list": [
                {
                    "model_name": "slow",
                    "provider": provider,
                    "base_url": url,
                    "api_key": "k",
                    "model": "x",
                }
            ]
        }
    )
    async with asyncio.timeout(15):
        async with (
            httpx.AsyncClient() as http,
            http.stream(
                "POST",
                base_url(hooks) + "/chat/completions",
                json={"model": "slow", "messages": MSG, "stream": True},
            ) as r,
        ):
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:
                    break
        # the client is gone: the AILB must close its upstream request
        await fake.disconnected.wait()
    assert fake.streams_completed == 0
    # the gateway stays healthy for the next request
    fake.chunk_delay = 0
    fake.extra_words = 0
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        r2 = await c.chat.completions.create(model="slow", messages=MSG)
    assert r2.choices[0].message.content


async def test_stream_stall_ends_stream_and_closes_upstream(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.chunk_delay = 5.0  # the role chunk comes at once, then nothing for 5 s
    hooks = await ailb.start(
        {"model_list": [{"model_name": "m", "base_url": fake_openai.url + "/v1", "timeout": 0.3}]}
    )
    async with asyncio.timeout(15), httpx.AsyncClient() as http:
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            json={"model": "m", "messages": MSG, "stream": True},
        )
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"role":"assistant"' in events[0].replace(" ", "")
        assert "stalled" in events[-1]  # an in-band OpenAI-shaped error ends the stream
        await fake_openai.disconnected.wait()


async def test_fallback_when_upstream_refuses_connections(
    ailb: AilbFactory, fake_anthropic: FakeAnthropic
) -> None:
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    hooks = await ailb.start(
        {
            "model_list": [
                {"model_name": "main", "base_url": dead},
                {
                    "model_name": "backup",
                    "provider": "anthropic",
                    "base_url": fake_anthropic.url,
                    "api_key": "k",
                },
            ],
            "router_settings": {"fallbacks": {"main": ["backup"]}},
        }
    )
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        r = await c.chat.completions.create(model="main", messages=MSG)
        assert r.choices[0].message.content == "Hello from anthropic: hi"
        stream = await c.chat.completions.create(model="main", messages=MSG, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == "Hello from anthropic: hi"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_timeout_while_reading_an_error_body_closes_the_connection(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, stream: bool
) -> None:
    """The upstream sends an error head, then its body stalls: the hop times out, the
    connection is closed (the upstream sees it at once) and the fallback answers."""
    hooks = await ailb.start(chain_config(fake_openai, fake_anthropic))  # main: timeout 0.5 s
    fake_openai.script.append(Step(status=500, stall_body=30.0))
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        async with asyncio.timeout(20):
            if stream:
                chunks = await c.chat.completions.create(model="main", messages=MSG, stream=True)
                text = "".join(
                    [ch.choices[0].delta.content or "" async for ch in chunks if ch.choices]
                )
            else:
                r = await c.chat.completions.create(model="main", messages=MSG)
                text = r.choices[0].message.content or ""
    assert text == "Hello from anthropic: hi"
    async with asyncio.timeout(5):  # not the 30 s the stalled body would take
        await fake_openai.disconnected.wait()


def _requests_by_status(hooks: Any, model: str) -> dict[str, float]:
    out = {}
    for metric in hooks.metrics_registry.collect():
        for sample in metric.samples:
            if sample.name == "ailb_requests_total" and sample.labels["model"] == model:
                out[sample.labels["status"]] = sample.value
    return out


async def test_mid_stream_upstream_errors_are_counted_as_upstream_errors(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    """Headers are out when the upstream fails mid-stream: the client gets the error in-band
    and the request counts as the upstream error's status (502; 504 for a stall), not as a
    client that went away (499)."""
    hooks = await ailb.start(
        {"model_list": [{"model_name": "m", "base_url": fake_openai.url + "/v1", "timeout": 0.3}]}
    )
    fake_openai.stream_error_after = 2
    async with httpx.AsyncClient() as http:
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            json={"model": "m", "messages": MSG, "stream": True},
        )
        assert r.status_code == 200
        assert "overloaded mid-stream" in r.text.splitlines()[-2]  # the last event before EOF
        fake_openai.stream_error_after = None
        fake_openai.chunk_delay = 5.0  # a stall after the role chunk
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            json={"model": "m", "messages": MSG, "stream": True},
        )
        assert "stalled" in r.text
    assert _requests_by_status(hooks, "m") == {"502": 1.0, "504": 1.0}
    # both count as failures of the deployment (2 of the 3 allowed before a cooldown)
    assert hooks.gateway.routed.router.groups["m"].members[0].consecutive_fails == 2


async def test_stream_latency_for_routing_is_time_to_first_chunk(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    """lowest_latency compares deployments by how fast they answer: for a stream that is its
    time to the first chunk, not the length of the answer (here ~1.5 s of slow tokens)."""
    hooks = await ailb.start(
        {
            "model_list": [{"model_name": "m", "base_url": fake_openai.url + "/v1"}],
            "router_settings": {"strategy": "lowest_latency"},
        }
    )
    fake_openai.chunk_delay = 0.3  # the role chunk at once, then one word every 0.3 s
    async with httpx.AsyncClient(timeout=20) as http:
        t0 = time.perf_counter()
        client_ttft = None
        async with http.stream(
            "POST",
            base_url(hooks) + "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "slow"}], "stream": True},
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and client_ttft is None:
                    client_ttft = time.perf_counter() - t0
        total = time.perf_counter() - t0
    assert client_ttft is not None
    ewma_ms = hooks.status()["groups"]["m"][0]["latency_ewma_ms"]
    # the gateway's wait for the first chunk lies inside the client's: never longer
    assert ewma_ms <= client_ttft * 1000
    assert total > 1.0  # the stream itself took far longer (5 words x 0.3 s)


async def test_removed_deployments_lose_their_idle_connections(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_openai2: FakeOpenAI
) -> None:
    """A config without a deployment's upstream closes that upstream's pooled keep-alive
    connections (they would otherwise linger until the upstream's own idle timeout)."""
    one = {"model_name": "m", "base_url": fake_openai.url + "/v1"}
    two = {"model_name": "n", "base_url": fake_openai2.url + "/v1"}
    hooks = await ailb.start({"model_list": [one, two]})
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        await c.chat.completions.create(model="m", messages=MSG)
        await c.chat.completions.create(model="n", messages=MSG)
    assert fake_openai.open_connections == 1  # idle in the gateway's pool
    assert fake_openai2.open_connections == 1
    assert await hooks.apply_config({"model_list": [two]}) == []
    async with asyncio.timeout(5):
        while fake_openai.open_connections:
            await asyncio.sleep(0.02)
    assert fake_openai2.open_connections == 1  # the deployment that stayed keeps its pool
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        await c.chat.completions.create(model="n", messages=MSG)
    assert len(fake_openai2.requests) == 2
    assert await hooks.apply_config({"model_list": [one, two]}) == []  # back: a new pool
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        r = await c.chat.completions.create(model="m", messages=MSG)
    assert r.choices[0].message.content == "Hello from openai: hi"


@pytest.mark.parametrize("retry_after", ["120", "http-date"])
async def test_429_retry_after_sets_the_cooldown(
    ailb: AilbFactory, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, retry_after: str
) -> None:
    """A 429 with Retry-After cools the deployment down for exactly that long, at once (not
    after allowed_fails failures, not for cooldown_seconds), and is not retried before."""
    import email.utils

    if retry_after == "http-date":
        retry_after = email.utils.formatdate(time.time() + 120, usegmt=True)
    cfg = chain_config(fake_openai, fake_anthropic, allowed_fails=3, cooldown_seconds=5)
    cfg["model_list"][0]["max_retries"] = 2
    hooks = await ailb.start(cfg)
    fake_openai.fail(429, retry_after=retry_after)
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        for _ in range(2):
            r = await c.chat.completions.create(model="main", messages=MSG)
            assert r.choices[0].message.content == "Hello from anthropic: hi"
    assert len(fake_openai.requests) == 1  # no retry, and skipped while cooling down
    main = hooks.status()["groups"]["main"][0]
    assert main["cooling_down"] is True
    assert 100 < main["cooldown_remaining_s"] <= 120
