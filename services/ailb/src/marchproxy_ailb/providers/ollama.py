"""Ollama's native API: POST /api/chat (NDJSON stream), /api/embed. ``base_url`` is the server
root (``http://127.0.0.1:11434``)."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from typing import Any

from marchproxy_ailb.errors import UpstreamError

from .base import (
    ChunkStream,
    Provider,
    StreamDecoder,
    now_s,
    parse_event,
    relay,
    request_shape,
    response_shape,
    unsupported,
)

HEADERS = {"Content-Type": "application/json"}


def _ollama_message(m: dict[str, Any]) -> dict[str, Any]:
    content = m.get("content")
    images: list[str] = []
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if ";base64," in url:
                    images.append(url.split(";base64,", 1)[1])
        content = "".join(texts)
    msg: dict[str, Any] = {"role": m.get("role"), "content": content or ""}
    if images:
        msg["images"] = images
    if m.get("tool_calls"):
        msg["tool_calls"] = [
            {
                "function": {
                    "name": c["function"]["name"],
                    "arguments": json.loads(c["function"].get("arguments") or "{}"),
                }
            }
            for c in m["tool_calls"]
        ]
    return msg


def _ollama_options(body: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key in ("temperature", "top_p", "seed"):
        if body.get(key) is not None:
            options[key] = body[key]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens:
        options["num_predict"] = max_tokens
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return options


def to_ollama_request(body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    if (body.get("n") or 1) != 1:
        raise unsupported("n > 1", "ollama")
    messages = [_ollama_message(m) for m in body.get("messages") or []]
    out: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    options = _ollama_options(body)
    if options:
        out["options"] = options
    if body.get("tools"):
        out["tools"] = body["tools"]
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        out["format"] = "json"
    elif fmt.get("type") == "json_schema":
        out["format"] = (fmt.get("json_schema") or {}).get("schema") or "json"
    return out


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": (c.get("function") or {}).get("name"),
                "arguments": json.dumps((c.get("function") or {}).get("arguments") or {}),
            },
        }
        for c in message.get("tool_calls") or []
    ]


def _usage(resp: dict[str, Any]) -> dict[str, Any]:
    prompt = int(resp.get("prompt_eval_count") or 0)
    completion = int(resp.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish(resp: dict[str, Any], has_tools: bool) -> str:
    if has_tools:
        return "tool_calls"
    return "length" if resp.get("done_reason") == "length" else "stop"


class OllamaProvider(Provider):
    name = "ollama"

    async def chat(self, body: dict[str, Any], model: str, timeout_s: float) -> dict[str, Any]:
        payload = request_shape(to_ollama_request, body, model, False)
        resp = await self._post_json("/api/chat", payload, HEADERS, timeout_s)
        return response_shape(_chat_response, resp, model)

    async def chat_stream(self, body: dict[str, Any], model: str, timeout_s: float) -> ChunkStream:
        payload = request_shape(to_ollama_request, body, model, True)
        resp = await self._open("/api/chat", payload, HEADERS, timeout_s)
        return relay(resp, OllamaStreamDecoder(model), timeout_s)

    async def embeddings(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> dict[str, Any]:
        payload = {"model": model, "input": body.get("input", "")}
        resp = await self._post_json("/api/embed", payload, HEADERS, timeout_s)
        return response_shape(_embed_response, resp, body, model)


def _chat_response(resp: dict[str, Any], model: str) -> dict[str, Any]:
    message = resp.get("message") or {}
    calls = _tool_calls(message)
    out_msg: dict[str, Any] = {"role": "assistant", "content": message.get("content") or None}
    if calls:
        out_msg["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": now_s(),
        "model": resp.get("model") or model,
        "choices": [
            {
                "index": 0,
                "message": out_msg,
                "finish_reason": _finish(resp, bool(calls)),
                "logprobs": None,
            }
        ],
        "usage": _usage(resp),
    }


def _embed_response(resp: dict[str, Any], body: dict[str, Any], model: str) -> dict[str, Any]:
    as_b64 = body.get("encoding_format") == "base64"
    data = []
    for i, vec in enumerate(resp.get("embeddings") or []):
        emb: Any = vec
        if as_b64:
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    prompt = int(resp.get("prompt_eval_count") or 0)
    return {
        "object": "list",
        "data": data,
        "model": resp.get("model") or model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


class OllamaStreamDecoder(StreamDecoder):
    """NDJSON lines of /api/chat -> chat.completion.chunk dicts, usage chunk last."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = now_s()
        self.model = model
        self.first = True
        self.saw_tools = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def _feed_line(self, line: bytes) -> list[dict[str, Any]]:
        line = line.strip()
        if not line:
            return []
        event = parse_event(line)
        if "error" in event:
            raise UpstreamError(502, "upstream stream error", retryable=False, body=line)
        message = event.get("message") or {}
        delta: dict[str, Any] = {}
        if self.first:
            delta["role"] = "assistant"
            self.first = False
        if message.get("content"):
            delta["content"] = message["content"]
        calls = _tool_calls(message)
        if calls:
            self.saw_tools = True
            delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(calls)]
        out = [self._chunk(delta)] if delta else []
        if event.get("done"):
            self.done = True
            out.append(self._chunk({}, _finish(event, self.saw_tools)))
            usage = self._chunk({})
            usage["choices"] = []
            usage["usage"] = _usage(event)
            out.append(usage)
        return out
