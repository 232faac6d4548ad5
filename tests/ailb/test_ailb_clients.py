"""The official openai client (sync, async, streaming) against the AILB in front of fake
OpenAI, Anthropic and Ollama upstreams; the anthropic client against the fake Anthropic."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import openai
import pytest

from tests.ailb.conftest import AilbFactory, base_url, three_provider_config
from tests.ailb.fakes import FakeAnthropic, FakeOllama, FakeOpenAI

CHAT_MODELS = ["gpt-fake", "claude-fake", "llama-fake"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
async def gateway(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_ollama: FakeOllama,
) -> str:
    hooks = await ailb.start(three_provider_config(fake_openai, fake_anthropic, fake_ollama))
    return base_url(hooks)


async def test_async_chat_non_stream_each_provider(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="anything", max_retries=0) as client:
        for model in CHAT_MODELS:
            raw = await client.chat.completions.with_raw_response.create(
                model=model,
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi there"},
                ],
            )
            resp = raw.parse()
            provider = {"gpt": "openai", "cla": "anthropic", "lla": "ollama"}[model[:3]]
            assert resp.choices[0].message.content == f"Hello from {provider}: hi there"
            assert resp.choices[0].finish_reason == "stop"
            assert resp.usage is not None and resp.usage.prompt_tokens == 10
            assert resp.usage.completion_tokens == 5
            assert float(raw.headers["x-marchproxy-overhead-ms"]) >= 0


async def test_async_streaming_each_provider(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="anything", max_retries=0) as client:
        for model in CHAT_MODELS:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "stream me"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text, finish, usage = "", None, None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
            assert text.endswith(": stream me"), (model, text)
            assert finish == "stop"
            assert usage is not None and usage.prompt_tokens == 10
            assert usage.completion_tokens == 5


async def test_stream_without_usage_request_has_no_usage_chunk(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "a"}], stream=True
        )
        chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)


async def test_sync_client_chat_and_stream(gateway: str) -> None:
    def run() -> tuple[str, str]:
        with openai.OpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
            r = client.chat.completions.create(
                model="llama-fake", messages=[{"role": "user", "content": "sync"}]
            )
            parts = []
            for chunk in client.chat.completions.create(
                model="claude-fake",
                messages=[{"role": "user", "content": "sync"}],
                stream=True,
            ):
                parts.extend(c.delta.content or "" for c in chunk.choices)
            return r.choices[0].message.content or "", "".join(parts)

    plain, streamed = await asyncio.to_thread(run)
    assert plain == "Hello from ollama: sync"
    assert streamed == "Hello from anthropic: sync"


async def test_tool_calls_each_provider(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        for model in CHAT_MODELS:
            resp = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "weather?"}],
                tools=[WEATHER_TOOL],
                tool_choice="auto",
            )
            choice = resp.choices[0]
            assert choice.finish_reason == "tool_calls", model
            call = choice.message.tool_calls[0]
            assert call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == {"city": "Paris"}
            # the follow-up turn carries the tool result back
            follow = await client.chat.completions.create(
                model=model,
                messages=[
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
                ],
            )
            assert follow.choices[0].message.content


async def test_streamed_tool_calls_each_provider(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        for model in CHAT_MODELS:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "weather?"}],
                tools=[WEATHER_TOOL],
                stream=True,
            )
            name, args, finish = "", "", None
            async for chunk in stream:
                for c in chunk.choices:
                    for tc in c.delta.tool_calls or []:
                        name += tc.function.name or "" if tc.function else ""
                        args += tc.function.arguments or "" if tc.function else ""
                    finish = c.finish_reason or finish
            assert name == "get_weather", model
            assert json.loads(args) == {"city": "Paris"}
            assert finish == "tool_calls"


async def test_anthropic_request_translation(gateway: str, fake_anthropic: FakeAnthropic) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        await client.chat.completions.create(
            model="claude-3-opus-alias",
            max_tokens=77,
            stop=["END"],
            temperature=0.2,
            messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    sent = fake_anthropic.requests[-1]
    assert sent["model"] == "claude-3-5-haiku-latest"
    assert sent["system"] == "sys"
    assert sent["max_tokens"] == 77
    assert sent["stop_sequences"] == ["END"]
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert sent["tools"][0]["input_schema"]["required"] == ["city"]
    assert fake_anthropic.headers[-1]["x-api-key"] == "sk-ant-upstream"


async def test_n_and_response_format_pass_through(gateway: str, fake_openai: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        resp = await client.chat.completions.create(
            model="gpt4",
            n=2,
            response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "json please"}],
        )
    assert len(resp.choices) == 2
    assert json.loads(resp.choices[1].message.content or "") == {"answer": "hello"}
    assert fake_openai.requests[-1]["n"] == 2
    assert fake_openai.requests[-1]["response_format"] == {"type": "json_object"}
    assert fake_openai.headers[-1]["Authorization"] == "Bearer sk-upstream"


async def test_completions_and_embeddings(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        for model, provider in (("gpt-fake", "openai"), ("llama-fake", "ollama")):
            c = await client.completions.create(model=model, prompt="complete")
            assert c.choices[0].text == f"Hello from {provider}: complete"
            stream = await client.completions.create(model=model, prompt="s", stream=True)
            text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
            assert text == f"Hello from {provider}: s"
        for model in ("embed-openai", "embed-ollama"):
            e = await client.embeddings.create(model=model, input=["a", "b"])  # base64 default
            assert [d.embedding for d in e.data] == [[0.5, -0.25, 0.0], [0.5, -0.25, 1.0]]
            f = await client.embeddings.create(model=model, input="a", encoding_format="float")
            assert f.data[0].embedding == [0.5, -0.25, 0.0]
        models = await client.models.list()
        ids = {m.id for m in models.data}
        assert {"gpt-fake", "claude-fake", "llama-fake", "gpt4"} <= ids


async def test_errors_have_openai_shape(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as exc:
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        assert exc.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model="claude-fake", input="x")
    async with httpx.AsyncClient() as http:
        r = await http.post(gateway + "/chat/completions", content=b"{not json")
        assert r.status_code == 400
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "x-marchproxy-overhead-ms" in r.headers


async def test_a_body_over_the_limit_is_refused_413_before_it_is_read(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_ollama: FakeOllama,
) -> None:
    """AILB_MAX_BODY_BYTES: the HTTP server refuses a larger Content-Length in OpenAI's error
    shape (the client still reads the answer while it sends), counts it, and never calls the
    upstream; a body just under the limit goes through."""
    config = three_provider_config(fake_openai, fake_anthropic, fake_ollama)
    hooks = await ailb.start(config, ailb_max_body_bytes=20_000)
    url = base_url(hooks)
    calls = len(fake_openai.requests)
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "x" * 50_000}]
            )
        assert exc.value.status_code == 413
        assert exc.value.code == "request_too_large"
        ok = await client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "x" * 10_000}]
        )
        assert ok.choices[0].message.content
    assert len(fake_openai.requests) == calls + 1
    assert hooks.metrics.requests.labels("", "", "413")._value.get() == 1
    assert hooks.gateway.errors_total == 1


async def test_upstream_4xx_is_relayed(gateway: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail(400)
    async with openai.AsyncOpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "x"}]
            )
    assert exc.value.message.endswith("scripted 400")


async def test_anthropic_client_against_fake_anthropic(fake_anthropic: FakeAnthropic) -> None:
    """The fake speaks Anthropic's wire format: the official client parses it, JSON and SSE."""
    async with anthropic.AsyncAnthropic(
        base_url=fake_anthropic.url, api_key="k", max_retries=0
    ) as client:
        msg = await client.messages.create(
            model="claude-x",
            max_tokens=10,
            messages=[{"role": "user", "content": "yo"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        )
        assert msg.stop_reason == "tool_use"
        assert msg.content[0].text == "Hello from anthropic: yo"
        assert msg.content[1].input == {"city": "Paris"}
        async with client.messages.stream(
            model="claude-x",
            max_tokens=10,
            messages=[{"role": "user", "content": "yo"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        ) as stream:
            final = await stream.get_final_message()
        assert final.content[0].text == "Hello from anthropic: yo"
        assert final.content[1].input == {"city": "Paris"}
        assert final.usage.output_tokens == 4


async def test_overhead_header_is_observed_in_the_histogram(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    hooks = await ailb.start(
        {"model_list": [{"model_name": "m", "base_url": fake_openai.url + "/v1"}]}
    )
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "a"}]
        )
        headers = [float(raw.headers["x-marchproxy-overhead-ms"])]
        async with c.chat.completions.with_streaming_response.create(
            model="m", messages=[{"role": "user", "content": "b"}], stream=True
        ) as streamed:
            headers.append(float(streamed.headers["x-marchproxy-overhead-ms"]))
            async for _ in streamed.iter_lines():
                pass
        with pytest.raises(openai.NotFoundError) as exc:
            await c.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "c"}]
            )
        headers.append(float(exc.value.response.headers["x-marchproxy-overhead-ms"]))
    registry = hooks.metrics_registry
    assert registry.get_sample_value("ailb_overhead_seconds_count") == 3
    total = registry.get_sample_value("ailb_overhead_seconds_sum")
    assert total == pytest.approx(sum(headers) / 1000, abs=1e-5)  # headers are rounded to µs
