"""Fake LLM upstreams speaking OpenAI's, Anthropic's and Ollama's exact wire formats.

Each fake is a real aiohttp server on 127.0.0.1:0 with a script of failures (status codes with
optional Retry-After) and delays, a record of every request body and headers, and an event that
fires when a client disconnects in the middle of a stream (so tests can prove cancellation).
Replies are deterministic: "Hello from <provider>: <last user text>" split into word tokens;
usage is ``prompt_tokens`` (default 10) and one completion token per word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass
class Step:
    status: int = 200
    delay: float = 0.0
    retry_after: str | None = None
    #: an error answer whose head is sent at once but whose body stalls this long midway
    stall_body: float = 0.0


class FakeUpstream:
    provider = "fake"

    def __init__(
        self, *, prompt_tokens: int = 10, chunk_delay: float = 0.0, cached_tokens: int = 0
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        #: prompt tokens the upstream says it wrote to its prompt cache (Anthropic)
        self.cache_write_tokens = 0
        self.chunk_delay = chunk_delay
        #: words per streamed answer beyond the greeting (long streams for disconnect tests)
        self.extra_words = 0
        #: OpenAI streams: after this many words send an in-band error event and stop
        self.stream_error_after: int | None = None
        self.script: deque[Step] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.disconnected = asyncio.Event()
        self.stream_started = asyncio.Event()
        self.streams_completed = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scheme = "http"

    # -- lifecycle -------------------------------------------------------------------------

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> FakeUpstream:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.scheme = "https" if ssl_context is not None else "http"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections the fake holds open right now (keep-alive ones included)."""
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    def fail(self, status: int, times: int = 1, retry_after: str | None = None) -> None:
        for _ in range(times):
            self.script.append(Step(status=status, retry_after=retry_after))

    def delay(self, seconds: float, times: int = 1) -> None:
        for _ in range(times):
            self.script.append(Step(delay=seconds))

    # -- helpers ---------------------------------------------------------------------------

    async def _take(self, request: web.Request) -> tuple[dict[str, Any], web.StreamResponse | None]:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        step = self.script.popleft() if self.script else Step()
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.status != 200:
            headers = {"Retry-After": step.retry_after} if step.retry_after else {}
            if step.stall_body:
                return body, await self._stalled_error(request, step, headers)
            return body, self.error(step.status, headers)
        return body, None

    async def _stalled_error(
        self, request: web.Request, step: Step, headers: dict[str, str]
    ) -> web.StreamResponse:
        full = self.error(step.status, headers).body
        assert isinstance(full, bytes)
        resp = web.StreamResponse(
            status=step.status, headers={**headers, "Content-Type": "application/json"}
        )
        await resp.prepare(request)
        await self._write(resp, full[:10])
        await self._observe_sleep(step.stall_body)  # a client that gives up closes the socket
        await self._write(resp, full[10:])
        return resp

    def error(self, status: int, headers: dict[str, str]) -> web.Response:
        raise NotImplementedError

    def words(self, body: dict[str, Any]) -> list[str]:
        text = ""
        for m in body.get("messages") or []:
            if m.get("role") == "user":
                c = m.get("content")
                text = (
                    c
                    if isinstance(c, str)
                    else " ".join(p.get("text", "") for p in c if isinstance(p, dict))
                )
        if "prompt" in body:
            text = body["prompt"]
        out = f"Hello from {self.provider}: {text}".split(" ")
        out += [f"w{i}" for i in range(self.extra_words)]
        return [w if i == 0 else " " + w for i, w in enumerate(out)]

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        try:
            await resp.write(data)
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise

    async def _observe_sleep(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.disconnected.set()
            raise

    @contextlib.asynccontextmanager
    async def _observe(self):  # type: ignore[no-untyped-def]
        try:
            yield
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise


def _tool_requested(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") == "none":
        return None
    return tools[0]["function"] if "function" in tools[0] else tools[0]


class FakeOpenAI(FakeUpstream):
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models."""

    provider = "openai"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        return app

    def error(self, status: int, headers: dict[str, str]) -> web.Response:
        kind = {429: "rate_limit_exceeded", 500: "server_error"}.get(
            status, "invalid_request_error"
        )
        body = {
            "error": {"message": f"scripted {status}", "type": kind, "param": None, "code": kind}
        }
        return web.json_response(body, status=status, headers=headers)

    def usage(self, completion: int) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, err = await self._take(request)
        if err is not None:
            return err
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        words = self.words(body)
        tool = _tool_requested(body)
        n = int(body.get("n") or 1)
        if body.get("response_format", {}).get("type") == "json_object":
            words = ['{"answer": ', '"hello"}']
        if not body.get("stream"):
            choices = []
            for i in range(n):
                msg: dict[str, Any] = {
                    "role": "assistant",
                    "content": "".join(words),
                    "refusal": None,
                    "annotations": [],
                }
                finish = "stop"
                if tool is not None:
                    msg["content"] = None
                    msg["tool_calls"] = [
                        {
                            "id": "call_abc123",
                            "type": "function",
                            "function": {"name": tool["name"], "arguments": '{"city":"Paris"}'},
                        }
                    ]
                    finish = "tool_calls"
                choices.append(
                    {"index": i, "message": msg, "logprobs": None, "finish_reason": finish}
                )
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": body["model"],
                    "choices": choices,
                    "usage": self.usage(len(words) * n),
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        self.stream_started.set()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body["model"],
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        await self._write(resp, chunk({"role": "assistant", "content": "", "refusal": None}))
        if tool is not None:
            await self._write(
                resp,
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_abc123",
                                "type": "function",
                                "function": {"name": tool["name"], "arguments": ""},
                            }
                        ]
                    }
                ),
            )
            for part in ('{"city"', ':"Paris"}'):
                await self._write(
                    resp, chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                )
            await self._write(resp, chunk({}, "tool_calls"))
            completion = 5
        else:
            for i, w in enumerate(words):
                if i == self.stream_error_after:
                    error = {"error": {"message": "overloaded mid-stream", "type": "server_error"}}
                    await self._write(resp, b"data: " + json.dumps(error).encode() + b"\n\n")
                    return resp
                if self.chunk_delay:
                    await self._observe_sleep(self.chunk_delay)
                await self._write(resp, chunk({"content": w}))
            await self._write(resp, chunk({}, "stop"))
            completion = len(words)
        if include_usage:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body["model"],
                "choices": [],
                "usage": self.usage(completion),
            }
            await self._write(resp, b"data: " + json.dumps(obj).encode() + b"\n\n")
        await self._write(resp, b"data: [DONE]\n\n")
        self.streams_completed += 1
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, err = await self._take(request)
        if err is not None:
            return err
        words = self.words(body)
        cid = f"cmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": body["model"],
                    "system_fingerprint": "fp_fake",
                    "choices": [
                        {
                            "text": "".join(words),
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": self.usage(len(words)),
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for i, w in enumerate(words):
            obj = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": body["model"],
                "choices": [
                    {
                        "text": w,
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": "stop" if i == len(words) - 1 else None,
                    }
                ],
            }
            await self._write(resp, b"data: " + json.dumps(obj).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            obj = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": body["model"],
                "choices": [],
                "usage": self.usage(len(words)),
            }
            await self._write(resp, b"data: " + json.dumps(obj).encode() + b"\n\n")
        await self._write(resp, b"data: [DONE]\n\n")
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        import base64
        import struct

        body, err = await self._take(request)
        if err is not None:
            return err
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i, _ in enumerate(inputs):
            vec = [0.5, -0.25, float(i)]
            emb: Any = vec
            if body.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack("<3f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 4, "total_tokens": 4},
            }
        )


class FakeAnthropic(FakeUpstream):
    """POST /v1/messages (JSON and SSE), validating the headers and fields Anthropic requires."""

    provider = "anthropic"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        return app

    def error(self, status: int, headers: dict[str, str]) -> web.Response:
        kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": f"scripted {status}"}}
        return web.json_response(body, status=status, headers=headers)

    def _invalid(self, message: str) -> web.Response:
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return web.json_response(body, status=400)

    def _usage(self, output: int) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": output,
            "cache_creation_input_tokens": self.cache_write_tokens,
            "cache_read_input_tokens": self.cached_tokens,
        }

    async def messages(self, request: web.Request) -> web.StreamResponse:
        # the API takes x-api-key; newer official clients send Authorization: Bearer instead
        auth = request.headers.get("Authorization", "")
        if not request.headers.get("x-api-key") and not auth.startswith("Bearer "):
            return web.json_response(
                {
                    "type": "error",
                    "error": {
                        "type": "authentication_error",
                        "message": "x-api-key header is required",
                    },
                },
                status=401,
            )
        if not request.headers.get("anthropic-version"):
            return self._invalid("anthropic-version header is required")
        body, err = await self._take(request)
        if err is not None:
            return err
        if "max_tokens" not in body:
            return self._invalid("max_tokens: Field required")
        for m in body.get("messages", []):
            if m.get("role") not in ("user", "assistant"):
                return self._invalid(f"messages: Unexpected role {m.get('role')!r}")
        msg_id = f"msg_{uuid.uuid4().hex[:20]}"
        words = self.words(body)
        tools = body.get("tools") or []
        use_tool = bool(tools) and (body.get("tool_choice") or {}).get("type") != "none"
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": "".join(words)}]
            if use_tool:
                content.append(
                    {
                        "type": "tool_use",
                        "id": "toolu_01A",
                        "name": tools[0]["name"],
                        "input": {"city": "Paris"},
                    }
                )
            return web.json_response(
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": content,
                    "stop_reason": "tool_use" if use_tool else "end_turn",
                    "stop_sequence": None,
                    "usage": self._usage(len(words)),
                }
            )
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await resp.prepare(request)
        self.stream_started.set()

        async def event(name: str, data: dict[str, Any]) -> None:
            await self._write(resp, f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        start_usage = dict(self._usage(1))
        await event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": body["model"],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            },
        )
        await event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        await event("ping", {"type": "ping"})
        for w in words:
            if self.chunk_delay:
                try:
                    await asyncio.sleep(self.chunk_delay)
                except asyncio.CancelledError:
                    self.disconnected.set()
                    raise
            await event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
            )
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        if use_tool:
            await event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 1,
                    "content_block": {
                        "type": "tool_use",
                        "id": "toolu_01A",
                        "name": tools[0]["name"],
                        "input": {},
                    },
                },
            )
            for part in ('{"city"', ': "Paris"}'):
                await event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 1,
                        "delta": {"type": "input_json_delta", "partial_json": part},
                    },
                )
            await event("content_block_stop", {"type": "content_block_stop", "index": 1})
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": "tool_use" if use_tool else "end_turn",
                    "stop_sequence": None,
                },
                "usage": {"output_tokens": len(words)},
            },
        )
        await event("message_stop", {"type": "message_stop"})
        self.streams_completed += 1
        return resp


class FakeOllama(FakeUpstream):
    """POST /api/chat (NDJSON streaming by default, as Ollama does), /api/embed; GET /api/tags."""

    provider = "ollama"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_get("/api/tags", self.tags)
        return app

    def error(self, status: int, headers: dict[str, str]) -> web.Response:
        return web.json_response({"error": f"scripted {status}"}, status=status, headers=headers)

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "llama-fake:latest"}]})

    def _final(self, body: dict[str, Any], completion: int) -> dict[str, Any]:
        return {
            "model": body["model"],
            "created_at": "2026-11-24T18:00:00.000000Z",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1000,
            "load_duration": 10,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": 100,
            "eval_count": completion,
            "eval_duration": 500,
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, err = await self._take(request)
        if err is not None:
            return err
        words = self.words(body)
        tool = _tool_requested(body)
        stream = body.get("stream", True)
        if not stream:
            out = self._final(body, len(words))
            out["message"] = {"role": "assistant", "content": "".join(words)}
            if tool is not None:
                out["message"] = {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": tool["name"], "arguments": {"city": "Paris"}}}
                    ],
                }
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        self.stream_started.set()
        for w in words:
            if self.chunk_delay:
                try:
                    await asyncio.sleep(self.chunk_delay)
                except asyncio.CancelledError:
                    self.disconnected.set()
                    raise
            line = {
                "model": body["model"],
                "created_at": "2026-11-24T18:00:00.000000Z",
                "message": {"role": "assistant", "content": w},
                "done": False,
            }
            await self._write(resp, json.dumps(line).encode() + b"\n")
        if tool is not None:
            line = {
                "model": body["model"],
                "created_at": "2026-11-24T18:00:00.000000Z",
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": tool["name"], "arguments": {"city": "Paris"}}}
                    ],
                },
                "done": False,
            }
            await self._write(resp, json.dumps(line).encode() + b"\n")
        await self._write(resp, json.dumps(self._final(body, len(words))).encode() + b"\n")
        self.streams_completed += 1
        return resp

    async def embed(self, request: web.Request) -> web.Response:
        body, err = await self._take(request)
        if err is not None:
            return err
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response(
            {
                "model": body["model"],
                "embeddings": [[0.5, -0.25, float(i)] for i in range(len(inputs))],
                "total_duration": 100,
                "load_duration": 10,
                "prompt_eval_count": 4,
            }
        )


class HoldingTcpProxy:
    """A TCP proxy (e.g. in front of Redis) that can hold the client's bytes: while held they
    are not forwarded, and a client that closes its connection meanwhile loses them (as a
    cancelled Redis command would). ``release()`` sends what is held on."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.holding = False
        #: set when bytes arrive while holding
        self.got_held = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[_HeldPipe] = set()

    async def start(self) -> HoldingTcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        self.got_held.clear()
        self.holding = True

    def release(self) -> None:
        self.holding = False
        for pipe in list(self._pipes):
            pipe.flush()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        pipe = _HeldPipe(self, up_writer)
        self._pipes.add(pipe)

        async def down() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        back = asyncio.ensure_future(down())
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    pipe.send(data)
        finally:
            pipe.held.clear()  # the client is gone: what it sent while held is lost
            self._pipes.discard(pipe)
            up_writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(back, 5)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class _HeldPipe:
    def __init__(self, proxy: HoldingTcpProxy, up: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.up = up
        self.held: list[bytes] = []

    def send(self, data: bytes) -> None:
        if self.proxy.holding:
            self.held.append(data)
            self.proxy.got_held.set()
        else:
            self.flush()
            self.up.write(data)

    def flush(self) -> None:
        for data in self.held:
            self.up.write(data)
        self.held.clear()


def make_pki(d: Path, name: str = "ailb-test") -> tuple[Path, ssl.SSLContext]:
    """A throw-away CA (``ca.pem``) and a server context whose certificate it signed, valid
    for 127.0.0.1 and localhost (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", f"/CN={name}-ca")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", f"/CN={name}")  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "server.pem", d / "server.key")
    return d / "ca.pem", ctx
