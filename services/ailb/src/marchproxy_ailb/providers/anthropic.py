"""Anthropic Messages API (POST /v1/messages) behind the OpenAI chat surface.

Requests: system/developer messages -> ``system``; assistant ``tool_calls`` -> ``tool_use``
blocks; ``tool`` messages -> ``tool_result`` blocks in a user turn; tools/tool_choice, stop,
max_tokens mapped. Responses and SSE events (message_start, content_block_start/delta/stop,
message_delta, message_stop) become chat.completion / chat.completion.chunk objects; stop reasons
map end_turn/stop_sequence -> stop, max_tokens -> length, tool_use -> tool_calls.
``base_url`` is the API root (``https://api.anthropic.com``); ``/v1/messages`` is appended.
"""

from __future__ import annotations

import json
from typing import Any

from marchproxy_ailb.errors import GatewayError, UpstreamError

from .base import (
    ChunkStream,
    Provider,
    SseStreamDecoder,
    now_s,
    parse_event,
    relay,
    request_shape,
    response_shape,
    unsupported,
)

ANTHROPIC_VERSION = "2023-06-01"
#: Anthropic requires max_tokens; used when the client sets none
DEFAULT_MAX_TOKENS = 4096

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}


def _text_blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                src = {"type": "base64", "media_type": media, "data": data}
                blocks.append({"type": "image", "source": src})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def _as_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in _text_blocks(content) if b["type"] == "text")


def _translate_messages(raw: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        # Anthropic wants alternating turns: consecutive same-role blocks share one message
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in raw:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_as_text(m.get("content")))
        elif role == "user":
            push("user", _text_blocks(m.get("content")))
        elif role == "assistant":
            blocks = _text_blocks(m.get("content"))
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": fn.get("name"),
                        "input": args,
                    }
                )
            push("assistant", blocks)
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id"),
                "content": _as_text(m.get("content")),
            }
            push("user", [result])
        else:
            raise GatewayError(400, f"unknown message role {role!r}", param="messages")
    return system, messages


def _translate_tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if not tools:
        return
    out["tools"] = [
        {
            "name": t["function"]["name"],
            "description": t["function"].get("description", ""),
            "input_schema": t["function"].get("parameters") or {"type": "object"},
        }
        for t in tools
        if t.get("type") == "function"
    ]
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
    else:
        kind = {"auto": "auto", "required": "any", "none": "none"}.get(choice, "auto")
        out["tool_choice"] = {"type": kind}
    if body.get("parallel_tool_calls") is False and out["tool_choice"]["type"] != "none":
        out["tool_choice"]["disable_parallel_tool_use"] = True


def to_anthropic_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    if (body.get("n") or 1) != 1:
        raise unsupported("n > 1", "anthropic")
    system, messages = _translate_messages(body.get("messages") or [])
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    fmt = body.get("response_format") or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        # the Messages API has no JSON mode: ask for it in the system prompt
        rule = "Respond with one valid JSON object and nothing else."
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema:
            rule += " It must match this JSON schema: " + json.dumps(schema)
        system.append(rule)
    if system:
        out["system"] = "\n\n".join(system)
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    _translate_tools(body, out)
    return out


def to_openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic counts uncached input, cache reads and cache writes apart; OpenAI's
    ``prompt_tokens`` is all three. Cache writes keep Anthropic's name next to it (priced at
    ``cache_write_input``), cache reads become ``prompt_tokens_details.cached_tokens``."""
    cached = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached + written
    completion = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "cache_creation_input_tokens": written,
    }


def to_openai_response(msg: dict[str, Any], requested_model: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or []:
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": json.dumps(block.get("input") or {}),
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": msg.get("id", ""),
        "object": "chat.completion",
        "created": now_s(),
        "model": msg.get("model") or requested_model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": STOP_REASONS.get(msg.get("stop_reason") or "", "stop"),
                "logprobs": None,
            }
        ],
        "usage": to_openai_usage(msg.get("usage") or {}),
    }


class StreamTranslator:
    """Anthropic SSE events -> OpenAI chat.completion.chunk dicts (keeps tool indices, usage)."""

    def __init__(self, requested_model: str) -> None:
        self.id = ""
        self.model = requested_model
        self.created = now_s()
        self.usage: dict[str, Any] = {}
        self._tool_index: dict[int, int] = {}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def feed(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event.get("type")
        if kind == "message_start":
            msg = event.get("message") or {}
            self.id = msg.get("id", "")
            self.model = msg.get("model") or self.model
            self.usage.update(msg.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                idx = self._tool_index.setdefault(event.get("index", 0), len(self._tool_index))
                call = {
                    "index": idx,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return None
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                idx = self._tool_index.get(event.get("index", 0), 0)
                call = {"index": idx, "function": {"arguments": delta.get("partial_json", "")}}
                return self._chunk({"tool_calls": [call]})
            return None
        if kind == "message_delta":
            self.usage.update(event.get("usage") or {})
            reason = (event.get("delta") or {}).get("stop_reason") or "end_turn"
            return self._chunk({}, STOP_REASONS.get(reason, "stop"))
        if kind == "error":
            raise UpstreamError(
                502, "upstream stream error", retryable=False, body=json.dumps(event).encode()
            )
        return None

    def usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": to_openai_usage(self.usage),
        }


class AnthropicProvider(Provider):
    name = "anthropic"

    def _headers(self) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "x-api-key": self.api_key,
            "anthropic-version": ANTHROPIC_VERSION,
        }

    async def chat(self, body: dict[str, Any], model: str, timeout_s: float) -> dict[str, Any]:
        payload = request_shape(to_anthropic_request, body, model)
        msg = await self._post_json("/v1/messages", payload, self._headers(), timeout_s)
        return response_shape(to_openai_response, msg, body.get("model", model))

    async def chat_stream(self, body: dict[str, Any], model: str, timeout_s: float) -> ChunkStream:
        payload = request_shape(to_anthropic_request, body, model)
        payload["stream"] = True
        resp = await self._open("/v1/messages", payload, self._headers(), timeout_s)
        return relay(resp, AnthropicStreamDecoder(body.get("model", model)), timeout_s)


class AnthropicStreamDecoder(SseStreamDecoder):
    def __init__(self, requested_model: str) -> None:
        super().__init__()
        self.translator = StreamTranslator(requested_model)

    def on_event(self, data: bytes) -> list[dict[str, Any]]:
        event = parse_event(data)
        chunk = self.translator.feed(event)
        out = [] if chunk is None else [chunk]
        if event.get("type") == "message_stop":
            self.done = True
        return out

    def tail(self) -> list[dict[str, Any]]:
        return [self.translator.usage_chunk()]
