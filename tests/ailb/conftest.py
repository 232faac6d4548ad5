"""AILB fixtures: the three fake upstreams and a helper that starts AILB data planes."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from marchproxy_ailb.config import AilbSettings
from marchproxy_ailb.module import AilbHooks
from tests.ailb.fakes import FakeAnthropic, FakeOllama, FakeOpenAI


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def fake_openai2() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    fake = FakeAnthropic()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[Any, str]]:
    """The machine's Redis and a key prefix of this test's own (deleted afterwards)."""
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"test:ailb:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        with contextlib.suppress(Exception):
            keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
            if keys:
                await client.delete(*keys)
        await client.aclose()


def three_provider_config(oa: FakeOpenAI, an: FakeAnthropic, ol: FakeOllama) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "gpt-fake",
                "provider": "openai",
                "base_url": oa.url + "/v1",
                "api_key": "sk-upstream",
                "model": "gpt-4o-mini",
            },
            {
                "model_name": "claude-fake",
                "provider": "anthropic",
                "base_url": an.url,
                "api_key": "sk-ant-upstream",
                "model": "claude-3-5-haiku-latest",
            },
            {
                "model_name": "llama-fake",
                "provider": "ollama",
                "base_url": ol.url,
                "model": "llama3.2",
            },
            {
                "model_name": "embed-openai",
                "provider": "openai",
                "base_url": oa.url + "/v1",
                "model": "text-embedding-3-small",
            },
            {
                "model_name": "embed-ollama",
                "provider": "ollama",
                "base_url": ol.url,
                "model": "all-minilm",
            },
        ],
        "model_aliases": {"gpt4": "gpt-fake", "claude-*": "claude-fake"},
    }


class AilbFactory:
    def __init__(self) -> None:
        self.started: list[AilbHooks] = []

    async def start(
        self, config: dict[str, Any], *, redis: Any | None = None, **settings: Any
    ) -> AilbHooks:
        opts: dict[str, Any] = {
            "data_port": 0,
            "register_with_nlb": False,
            "redis_url": "",
            "proxy_protocol": "off",
        }
        opts.update(settings)
        hooks = AilbHooks(AilbSettings(**opts), redis=redis)
        self.started.append(hooks)
        await hooks.start_data_plane()
        errors = await hooks.apply_config(
            {
                "version": 1,
                "modules": [{"name": "ailb", "type": "AILB", "enabled": True, "config": config}],
            }
        )
        assert errors == []
        return hooks

    async def stop(self, hooks: AilbHooks) -> None:
        if hooks in self.started:
            self.started.remove(hooks)
            await hooks.close()


@pytest.fixture
async def ailb() -> AsyncIterator[AilbFactory]:
    factory = AilbFactory()
    try:
        yield factory
    finally:
        for hooks in list(factory.started):
            with contextlib.suppress(Exception):
                await factory.stop(hooks)


def base_url(hooks: AilbHooks) -> str:
    assert hooks.address is not None
    return f"http://127.0.0.1:{hooks.address.port}/v1"
