"""Any OpenAI-compatible upstream (OpenAI, vLLM, llama.cpp server, ...): bodies pass through.

Only ``model`` is rewritten to the deployment's upstream model. Streams ask the upstream for a
usage chunk (``stream_options.include_usage``) so token accounting is exact; the gateway drops
that chunk again when the client did not ask for it.
"""

from __future__ import annotations

from typing import Any

from marchproxy_ailb.errors import UpstreamError

from .base import (
    ChunkStream,
    Provider,
    RawReply,
    SseStreamDecoder,
    parse_event,
    relay,
)


class OpenAIProvider(Provider):
    name = "openai"

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    async def chat(self, body: dict[str, Any], model: str, timeout_s: float) -> dict[str, Any]:
        payload = dict(body, model=model)
        return await self._post_json("/chat/completions", payload, self._headers(), timeout_s)

    async def completions(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> dict[str, Any]:
        payload = dict(body, model=model)
        return await self._post_json("/completions", payload, self._headers(), timeout_s)

    async def embeddings(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> dict[str, Any]:
        payload = dict(body, model=model)
        return await self._post_json("/embeddings", payload, self._headers(), timeout_s)

    async def chat_stream(self, body: dict[str, Any], model: str, timeout_s: float) -> ChunkStream:
        return await self._stream("/chat/completions", body, model, timeout_s)

    async def completions_stream(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> ChunkStream:
        return await self._stream("/completions", body, model, timeout_s)

    async def _stream(
        self, path: str, body: dict[str, Any], model: str, timeout_s: float
    ) -> ChunkStream:
        opts = dict(body.get("stream_options") or {})
        opts["include_usage"] = True
        payload = dict(body, model=model, stream=True, stream_options=opts)
        resp = await self._open(path, payload, self._headers(), timeout_s)
        return relay(resp, OpenAIStreamDecoder(), timeout_s)


class OpenAIStreamDecoder(SseStreamDecoder):
    def on_event(self, data: bytes) -> list[dict[str, Any]]:
        if data == b"[DONE]":
            self.done = True
            return []
        chunk = RawReply(parse_event(data))
        if "error" in chunk and "choices" not in chunk:
            raise UpstreamError(502, "upstream stream error", retryable=False, body=data)
        if b"\n" not in data:  # one SSE data line: relayed as received, not serialised again
            chunk.raw = data
        return [chunk]
