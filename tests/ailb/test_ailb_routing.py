"""Pure rules: model resolution, strategies, cooldown, plans, pricing, request translation."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from marchproxy_ailb.errors import GatewayError
from marchproxy_ailb.keys import KeyStore
from marchproxy_ailb.limits import _fmt_reset
from marchproxy_ailb.providers.anthropic import to_anthropic_request, to_openai_response
from marchproxy_ailb.providers.base import parse_retry_after
from marchproxy_ailb.providers.ollama import to_ollama_request
from marchproxy_ailb.routing import MAX_RETRY_AFTER_S, Router
from marchproxy_ailb.schema import AilbConfig, Price, hash_key
from marchproxy_ailb.usage import cost_nusd


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dep(name: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"model_name": name, "base_url": url, **kw}


def router(cfg: dict[str, Any], clock: Clock | None = None) -> Router:
    return Router(AilbConfig.model_validate(cfg), clock=clock or Clock(), rng=random.Random(7))


def test_resolve_exact_alias_wildcard() -> None:
    r = router(
        {
            "model_list": [
                dep("gpt-4o", "http://a"),
                dep("openai/*", "http://b", model="*"),
                dep("claude", "http://c"),
            ],
            "model_aliases": {"gpt4": "gpt-4o", "claude-3*": "claude"},
        }
    )
    assert r.resolve("gpt-4o") == "gpt-4o"
    assert r.resolve("gpt4") == "gpt-4o"
    assert r.resolve("claude-3-opus") == "claude"
    assert r.resolve("openai/o3-mini") == "openai/*"
    assert r.resolve("nothing") is None
    wild = r.groups["openai/*"].members[0]
    assert r.upstream_model(wild, "openai/o3-mini") == "o3-mini"
    assert sorted(r.public_models()) == ["claude", "gpt-4o", "gpt4"]


def test_round_robin_and_fallback_plan() -> None:
    r = router(
        {
            "model_list": [dep("m", "http://a"), dep("m", "http://b"), dep("f", "http://c")],
            "router_settings": {"fallbacks": {"m": ["f"]}},
        }
    )
    firsts = [r.plan("m")[0].deployment.base_url for _ in range(4)]
    assert firsts == ["http://a", "http://b", "http://a", "http://b"]
    assert [s.deployment.base_url for s in r.plan("m")][-1] == "http://c"


def test_weighted_prefers_heavy() -> None:
    r = router(
        {
            "model_list": [dep("m", "http://a", weight=9), dep("m", "http://b", weight=1)],
            "router_settings": {"strategy": "weighted"},
        }
    )
    firsts = [r.plan("m")[0].deployment.base_url for _ in range(500)]
    assert firsts.count("http://a") > 350


def test_least_busy_lowest_latency_cost() -> None:
    r = router(
        {
            "model_list": [dep("m", "http://a"), dep("m", "http://b")],
            "router_settings": {"strategy": "least_busy"},
        }
    )
    a, _b = r.groups["m"].members
    r.started(a)
    assert r.plan("m")[0].deployment.base_url == "http://b"
    r = router(
        {
            "model_list": [dep("m", "http://a"), dep("m", "http://b")],
            "router_settings": {"strategy": "lowest_latency"},
        }
    )
    a, b = r.groups["m"].members
    for st_, lat in ((a, 0.5), (b, 0.1)):
        r.started(st_)
        r.succeeded(st_, lat)
    assert r.plan("m")[0].deployment.base_url == "http://b"
    r = router(
        {
            "model_list": [
                dep("m", "http://a", price={"input": 5, "output": 15}),
                dep("m", "http://b", price={"input": 0.1, "output": 0.4}),
            ],
            "router_settings": {"strategy": "cost"},
        }
    )
    assert r.plan("m")[0].deployment.base_url == "http://b"


def test_cooldown_expires() -> None:
    clock = Clock()
    r = router(
        {
            "model_list": [dep("m", "http://a"), dep("m", "http://b")],
            "router_settings": {"allowed_fails": 2, "cooldown_seconds": 10},
        },
        clock,
    )
    a = r.groups["m"].members[0]
    for _ in range(2):
        r.started(a)
        r.failed(a)
    assert [s.deployment.base_url for s in r.plan("m")] == ["http://b"]
    clock.now += 11
    assert {s.deployment.base_url for s in r.plan("m")} == {"http://a", "http://b"}


def test_deployment_rpm_skips() -> None:
    r = router({"model_list": [dep("m", "http://a", rpm=1), dep("m", "http://b")]})
    a = r.groups["m"].members[0]
    r.started(a)
    assert all(s.deployment.base_url == "http://b" for s in r.plan("m"))


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        AilbConfig.model_validate(
            {
                "model_list": [dep("m", "http://a")],
                "router_settings": {"fallbacks": {"m": ["ghost"]}},
            }
        )
    with pytest.raises(ValidationError):
        AilbConfig.model_validate({"keys": [{"key_hash": "short"}]})
    with pytest.raises(ValidationError):
        AilbConfig.model_validate({"model_list": [dep("m", "ftp://a")]})


def test_keys_hashed() -> None:
    cfg = AilbConfig.model_validate({"keys": [{"key": "sk-1", "models": ["gpt-*"]}]})
    store = KeyStore(cfg.keys, required=True)
    info = store.authenticate("Bearer sk-1", None)
    assert info.key_id == hash_key("sk-1")[:16]
    assert info.allows("gpt-4o") and not info.allows("claude")
    with pytest.raises(GatewayError):
        store.authenticate("Bearer sk-2", None)


def test_cost_with_cached_tokens() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3)
    # 1000 prompt of which 800 cached, 100 completion
    assert cost_nusd(price, 1000, 100, 800) == round((200 * 3 + 800 * 0.3 + 100 * 15) * 1000)
    assert cost_nusd(Price(input=1.0), 10, 0, 5) == 10_000  # no cached price: full price


def test_cost_with_cache_writes() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3)
    # 1000 prompt: 500 read from the cache, 300 written to it (1.25 x input), 200 plain
    want = round((200 * 3 + 500 * 0.3 + 300 * 3.75 + 100 * 15) * 1000)
    assert cost_nusd(price, 1000, 100, 500, 300) == want
    explicit = Price(input=3.0, output=15.0, cache_write_input=6.0)
    assert cost_nusd(explicit, 100, 0, 0, 100) == 600_000
    # more cache tokens reported than prompt tokens: never a negative plain part
    assert cost_nusd(Price(input=1.0, cached_input=0.0), 10, 0, 8, 8) == round(2 * 1.25 * 1000)


def test_reset_format() -> None:
    assert _fmt_reset(0.12) == "120ms"
    assert _fmt_reset(6) == "6s"
    assert _fmt_reset(61) == "1m1s"


def test_anthropic_translation_roundtrip() -> None:
    body = {
        "model": "x",
        "messages": [
            {"role": "system", "content": "s"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    },
                    {"id": "t2", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "r1"},
            {"role": "tool", "tool_call_id": "t2", "content": "r2"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    out = to_anthropic_request(body, "claude")
    assert out["system"] == "s"
    assert out["messages"][0]["content"][1]["source"]["media_type"] == "image/png"
    assert [b["type"] for b in out["messages"][1]["content"]] == ["tool_use", "tool_use"]
    assert len(out["messages"]) == 3  # both tool results share one user turn
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    resp = to_openai_response(
        {
            "id": "m",
            "content": [{"type": "text", "text": "a"}],
            "stop_reason": "max_tokens",
            "usage": {"input_tokens": 3, "cache_read_input_tokens": 2, "output_tokens": 4},
        },
        "x",
    )
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"]["prompt_tokens"] == 5
    assert resp["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    with pytest.raises(GatewayError):
        to_anthropic_request({"messages": [], "n": 2}, "c")


def test_anthropic_json_mode_via_system_prompt() -> None:
    out = to_anthropic_request(
        {
            "messages": [{"role": "user", "content": "q"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
        },
        "c",
    )
    assert "valid JSON object" in out["system"]
    assert '{"type": "object"}' in out["system"]


def test_ollama_translation() -> None:
    out = to_ollama_request(
        {
            "messages": [{"role": "user", "content": "q"}],
            "max_tokens": 5,
            "stop": "x",
            "response_format": {"type": "json_object"},
            "temperature": 0.1,
        },
        "llama",
        stream=False,
    )
    assert out["options"] == {"temperature": 0.1, "num_predict": 5, "stop": ["x"]}
    assert out["format"] == "json"
    assert out["stream"] is False


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412400.0) == 80.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412600.0) == 0.0
    for bad in (None, "", "soon", "Wed, 21 Oct 2015 07:28:00"):
        assert parse_retry_after(bad) is None


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    out = parse_retry_after(value, now=0.0)
    assert out is None or out >= 0.0


def test_retry_after_cools_down_at_once_and_caps() -> None:
    now = [1000.0]
    router = Router(
        AilbConfig.model_validate({"model_list": [{"model_name": "m", "base_url": "http://x"}]}),
        clock=lambda: now[0],
    )
    st_ = router.groups["m"].members[0]
    router.started(st_)
    router.failed(st_, retry_after=7.0)
    assert st_.cooldown_until == 1007.0
    assert router.plan("m") == []
    router.started(st_)
    router.failed(st_, retry_after=10**9)
    assert st_.cooldown_until == 1000.0 + MAX_RETRY_AFTER_S
