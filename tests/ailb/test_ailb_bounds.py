"""Memory bounds: upstream answers held whole are capped in size, the in-process response
cache is bounded by bytes as well as entries."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.ailb.conftest import AilbFactory, base_url
from tests.ailb.fakes import FakeOpenAI

MSG = [{"role": "user", "content": "hi"}]


async def test_oversized_upstream_answer_is_a_502(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    hooks = await ailb.start(
        {"model_list": [{"model_name": "m", "base_url": fake_openai.url + "/v1"}]},
        ailb_max_upstream_body_bytes=16 * 1024,
    )
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key="x", max_retries=0) as c:
        small = await c.chat.completions.create(model="m", messages=MSG)
        assert small.choices[0].message.content == "Hello from openai: hi"
        fake_openai.extra_words = 5000  # a ~30 KB answer
        with pytest.raises(openai.InternalServerError) as exc:
            await c.chat.completions.create(model="m", messages=MSG)
        assert exc.value.status_code == 502
        assert "larger than 16384 bytes" in exc.value.message
        # streams are relayed piece by piece and are not held whole: no cap applies
        stream = await c.chat.completions.create(model="m", messages=MSG, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        assert len(text) > 16 * 1024
        fake_openai.extra_words = 0
        again = await c.chat.completions.create(model="m", messages=MSG)
        assert again.choices[0].message.content == "Hello from openai: hi"


async def test_in_process_cache_is_bounded_by_bytes(
    ailb: AilbFactory, fake_openai: FakeOpenAI
) -> None:
    hooks = await ailb.start(
        {
            "model_list": [{"model_name": "m", "base_url": fake_openai.url + "/v1"}],
            "cache": {"enabled": True, "max_bytes": 4096, "max_entry_bytes": 2048},
        }
    )
    cache = hooks.gateway.routed.cache

    async def ask(http: httpx.AsyncClient, text: str) -> str:
        r = await http.post(
            base_url(hooks) + "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0},
        )
        assert r.status_code == 200
        return r.headers.get("x-marchproxy-cache", "")

    async with httpx.AsyncClient() as http:
        sizes = []
        for i in range(12):  # ~700-byte answers: far more than 4096 bytes in all
            assert await ask(http, f"question {i}") == "miss"
            sizes.append(cache.local_bytes)
            assert cache.local_bytes <= 4096
        assert await ask(http, "question 11") == "hit"  # the newest stayed
        assert await ask(http, "question 0") == "miss"  # the oldest went to make room
        fake_openai.extra_words = 400  # a ~3 KB answer: over max_entry_bytes, never cached
        assert await ask(http, "big") == "miss"
        assert await ask(http, "big") == "miss"
    assert max(sizes) > 2048  # several entries were kept at once
    assert cache.local_bytes <= 4096
