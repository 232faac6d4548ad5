"""Property tests for the stream framing and the Anthropic event translator: any split of the
input gives the same events, and only the module's own error types escape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_ailb.errors import UpstreamError
from marchproxy_ailb.framing import FramingError, LineBuffer, SseDecoder
from marchproxy_ailb.providers.anthropic import StreamTranslator

payloads = st.lists(
    st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=4), min_size=1, max_size=8
)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def decode_sse(pieces: list[bytes]) -> list[bytes]:
    lines, sse, events = LineBuffer(), SseDecoder(), []
    for piece in pieces:
        for line in lines.feed(piece):
            ev = sse.feed_line(line)
            if ev is not None:
                events.append(ev)
    rest = lines.flush()
    if rest:
        ev = sse.feed_line(rest)
        if ev is not None:
            events.append(ev)
    ev = sse.flush()
    if ev is not None:
        events.append(ev)
    return events


@settings(max_examples=200, deadline=None)
@given(payloads, st.lists(st.integers(min_value=0), max_size=20), st.booleans())
def test_sse_any_split_same_events(objs: list[dict[str, str]], cuts: list[int], crlf: bool) -> None:
    nl = b"\r\n" if crlf else b"\n"
    stream = b""
    for obj in objs:
        stream += b"event: x" + nl + b": comment" + nl
        stream += b"data: " + json.dumps(obj).encode() + nl + nl
    expected = [json.dumps(o).encode() for o in objs]
    assert decode_sse([stream]) == expected
    assert decode_sse(splits(stream, cuts)) == expected
    assert decode_sse([bytes([b]) for b in stream]) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=10))
def test_random_bytes_only_framing_error(data: bytes, cuts: list[int]) -> None:
    lines = LineBuffer(max_line=64)
    try:
        out = []
        for piece in splits(data, cuts):
            out.extend(lines.feed(piece))
        out.append(lines.flush())
    except FramingError:
        return
    assert b"\n".join(out) == data


def test_line_cap() -> None:
    lines = LineBuffer(max_line=10)
    with pytest.raises(FramingError):
        lines.feed(b"x" * 11)
    with pytest.raises(FramingError):
        LineBuffer(max_line=10).feed(b"y" * 20 + b"\n")


events = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
                "ping",
                "error",
                "other",
            ]
        )
    },
    optional={
        "index": st.integers(min_value=0, max_value=3),
        "message": st.fixed_dictionaries(
            {},
            optional={
                "id": st.text(max_size=5),
                "usage": st.fixed_dictionaries({}, optional={"input_tokens": st.integers(0, 100)}),
            },
        ),
        "content_block": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "tool_use"])},
            optional={
                "id": st.text(max_size=4),
                "name": st.text(max_size=4),
                "text": st.text(max_size=4),
            },
        ),
        "delta": st.fixed_dictionaries(
            {},
            optional={
                "type": st.sampled_from(["text_delta", "input_json_delta", "x"]),
                "text": st.text(max_size=5),
                "partial_json": st.text(max_size=5),
                "stop_reason": st.sampled_from(["end_turn", "tool_use", "max_tokens", "weird"]),
            },
        ),
        "usage": st.fixed_dictionaries({}, optional={"output_tokens": st.integers(0, 100)}),
    },
)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=12))
def test_anthropic_translator_total(seq: list[dict[str, Any]]) -> None:
    tr = StreamTranslator("m")
    for ev in seq:
        try:
            chunk = tr.feed(ev)
        except UpstreamError:
            assert ev["type"] == "error"
            continue
        if chunk is not None:
            assert chunk["object"] == "chat.completion.chunk"
            json.dumps(chunk)
    usage = tr.usage_chunk()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=80), max_size=10),
    st.sampled_from(["openai", "anthropic", "ollama"]),
)
def test_stream_decoders_only_upstream_error(lines: list[bytes], provider: str) -> None:
    """Garbage from an upstream stream ends that stream with UpstreamError, nothing else."""
    from marchproxy_ailb.providers.anthropic import AnthropicStreamDecoder
    from marchproxy_ailb.providers.base import StreamDecoder
    from marchproxy_ailb.providers.ollama import OllamaStreamDecoder
    from marchproxy_ailb.providers.openai import OpenAIStreamDecoder

    decoder: StreamDecoder = {
        "openai": OpenAIStreamDecoder,
        "ollama": lambda: OllamaStreamDecoder("m"),
        "anthropic": lambda: AnthropicStreamDecoder("m"),
    }[provider]()
    try:
        for line in lines:
            for prefix in (b"data: ", b""):
                for chunk in decoder.feed_line(prefix + line):
                    json.dumps(chunk)
                decoder.feed_line(b"")
        decoder.finish()
    except UpstreamError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "content",
                    "role",
                    "text",
                    "function",
                    "name",
                    "arguments",
                    "tool_calls",
                    "delta",
                    "index",
                    "usage",
                    "choices",
                    "message",
                    "done",
                    "error",
                    "stop_reason",
                    "content_block",
                    "partial_json",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=8,
)
event_keys = st.sampled_from(
    [
        "type",
        "message",
        "done",
        "done_reason",
        "error",
        "choices",
        "usage",
        "delta",
        "index",
        "content_block",
        "prompt_eval_count",
        "eval_count",
        "id",
        "model",
    ]
)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.dictionaries(event_keys, json_values, max_size=5), max_size=6),
    st.sampled_from(["openai", "anthropic", "ollama"]),
)
def test_stream_decoders_json_junk(events: list[dict[str, Any]], provider: str) -> None:
    from marchproxy_ailb.providers.anthropic import AnthropicStreamDecoder
    from marchproxy_ailb.providers.base import StreamDecoder
    from marchproxy_ailb.providers.ollama import OllamaStreamDecoder
    from marchproxy_ailb.providers.openai import OpenAIStreamDecoder

    decoder: StreamDecoder = {
        "openai": OpenAIStreamDecoder,
        "ollama": lambda: OllamaStreamDecoder("m"),
        "anthropic": lambda: AnthropicStreamDecoder("m"),
    }[provider]()
    try:
        for ev in events:
            data = json.dumps(ev).encode()
            if provider == "ollama":
                decoder.feed_line(data)
            else:
                decoder.feed_line(b"data: " + data)
                decoder.feed_line(b"")
        decoder.finish()
    except UpstreamError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "model",
                "messages",
                "stream",
                "stream_options",
                "n",
                "tools",
                "stop",
                "prompt",
                "input",
                "response_format",
                "max_tokens",
                "tool_choice",
            ]
        ),
        json_values,
        max_size=6,
    ),
    st.sampled_from(["chat", "completions", "embeddings"]),
)
def test_request_checks_only_gateway_error(body: dict[str, Any], kind: str) -> None:
    """Any JSON body is either accepted or refused with a 400; counting its prompt never fails,
    and an accepted chat body translates for every provider or is refused with a 400."""
    from marchproxy_ailb.errors import GatewayError
    from marchproxy_ailb.providers.anthropic import to_anthropic_request
    from marchproxy_ailb.providers.base import request_shape
    from marchproxy_ailb.providers.ollama import to_ollama_request
    from marchproxy_ailb.tokens import count_prompt
    from marchproxy_ailb.validation import validate_body

    status = 0
    try:
        validate_body(kind, body)
    except GatewayError as err:
        status = err.status
    if status:
        assert status == 400
        return
    assert count_prompt(body) >= 0
    if kind == "chat":
        for fn, args in (
            (to_anthropic_request, (body, "m")),
            (to_ollama_request, (body, "m", False)),
        ):
            status = 0
            try:
                request_shape(fn, *args)
            except GatewayError as err:
                status = err.status
            assert status in (0, 400)
