"""The provider interface: OpenAI-shaped dicts in, OpenAI-shaped dicts (or chunks) out.

A provider translates an OpenAI request body for one deployment, calls the upstream over the
shared keep-alive session, and translates the answer back. Streams are opened first (so an
upstream error still allows a fallback) and then iterated chunk by chunk as bytes arrive.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import struct
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from marchproxy_ailb.errors import GatewayError, UpstreamError, retryable_status
from marchproxy_ailb.framing import FramingError, LineBuffer, SseDecoder
from marchproxy_ailb.upstream_http import UpstreamPool, UpstreamResponse

#: batches of OpenAI chunk dicts, one batch per network read
ChunkStream = AsyncGenerator[list[dict[str, Any]], None]

#: longest upstream error body we read (and hand to the client)
MAX_ERROR_BODY = 64 * 1024
#: default cap on a whole non-stream upstream answer (AILB_MAX_UPSTREAM_BODY_BYTES)
DEFAULT_MAX_UPSTREAM_BODY = 32 * 1024 * 1024


class RawReply(dict[str, Any]):
    """An upstream JSON object that is relayed unchanged: ``raw`` holds its original bytes, so
    the gateway need not serialise it again."""

    raw: bytes = b""


#: what translating a wrongly shaped JSON value raises
SHAPE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, struct.error)
T = TypeVar("T")


def request_shape(fn: Callable[..., T], *args: Any) -> T:
    """Translate a client request; a body of the wrong shape is the client's 400."""
    try:
        return fn(*args)
    except GatewayError:
        raise
    except SHAPE_ERRORS as exc:
        raise GatewayError(
            400, f"Invalid request for this model: {exc}", code="invalid_request"
        ) from None


def response_shape(fn: Callable[..., T], *args: Any) -> T:
    """Translate an upstream answer; one of the wrong shape is the upstream's fault (502)."""
    try:
        return fn(*args)
    except SHAPE_ERRORS as exc:
        raise UpstreamError(502, f"malformed upstream answer: {exc}", retryable=True) from None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP-date is always GMT; anything else is not one
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _too_large(cap: int) -> UpstreamError:
    return UpstreamError(
        502, f"The upstream answer is larger than {cap} bytes; it was not relayed.", retryable=False
    )


async def read_capped(resp: UpstreamResponse, cap: int) -> bytes:
    """The whole body, or UpstreamError 502 (connection closed) once it passes ``cap`` bytes:
    a non-stream answer is held in memory whole, so its size must be bounded."""
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        resp.close()
        raise _too_large(cap)
    body: bytes = await resp.read(cap + 1)  # closes the connection when the limit is reached
    if len(body) > cap:
        raise _too_large(cap)
    return body


async def raise_for_upstream(resp: UpstreamResponse) -> None:
    if resp.status < 300:
        return
    body = await resp.read(MAX_ERROR_BODY)
    resp.close()
    raise UpstreamError(
        resp.status,
        f"upstream answered {resp.status}",
        retryable=retryable_status(resp.status),
        retry_after=parse_retry_after(resp.headers.get("retry-after")),
        body=body,
    )


def unsupported(what: str, provider: str) -> GatewayError:
    return GatewayError(
        400, f"{what} is not supported by {provider} deployments", code="unsupported"
    )


def now_s() -> int:
    return int(time.time())


def chunk_to_completion(chunk: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion.chunk as a text_completion chunk (for /v1/completions emulation)."""
    choices = []
    for c in chunk.get("choices") or []:
        delta = c.get("delta") or {}
        choices.append(
            {
                "text": delta.get("content") or "",
                "index": c.get("index", 0),
                "logprobs": None,
                "finish_reason": c.get("finish_reason"),
            }
        )
    out = {
        "id": chunk.get("id", ""),
        "object": "text_completion",
        "created": chunk.get("created", now_s()),
        "model": chunk.get("model", ""),
        "choices": choices,
    }
    if chunk.get("usage"):
        out["usage"] = chunk["usage"]
    return out


def chat_to_completion(resp: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": resp.get("id", ""),
        "object": "text_completion",
        "created": resp.get("created", now_s()),
        "model": resp.get("model", ""),
        "choices": [
            {
                "text": (c.get("message") or {}).get("content") or "",
                "index": c.get("index", 0),
                "logprobs": None,
                "finish_reason": c.get("finish_reason"),
            }
            for c in resp.get("choices") or []
        ],
        "usage": resp.get("usage"),
    }


def completion_to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise GatewayError(400, "only one string prompt is supported here", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise GatewayError(400, "prompt must be a string", param="prompt")
    chat = {k: v for k, v in body.items() if k not in ("prompt", "echo", "suffix", "best_of")}
    chat["messages"] = [{"role": "user", "content": prompt}]
    return chat


class Provider:
    """One upstream deployment's protocol. Subclasses override what their API offers."""

    name = "base"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        pool: UpstreamPool,
        *,
        max_body: int = DEFAULT_MAX_UPSTREAM_BODY,
    ) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.pool = pool
        self.max_body = max_body

    async def chat(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    async def chat_stream(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> ChunkStream:  # pragma: no cover - interface
        raise NotImplementedError

    async def completions(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> dict[str, Any]:
        return chat_to_completion(await self.chat(completion_to_chat_body(body), model, timeout_s))

    async def completions_stream(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> ChunkStream:
        inner = await self.chat_stream(
            request_shape(completion_to_chat_body, body), model, timeout_s
        )

        async def gen() -> ChunkStream:
            try:
                async for batch in inner:
                    yield [response_shape(chunk_to_completion, chunk) for chunk in batch]
            finally:
                await inner.aclose()

        return gen()

    async def embeddings(
        self, body: dict[str, Any], model: str, timeout_s: float
    ) -> dict[str, Any]:
        raise unsupported("embeddings", self.name)

    # -- helpers ---------------------------------------------------------------------------

    async def _post_json(
        self, path: str, payload: dict[str, Any], headers: dict[str, str], timeout_s: float
    ) -> dict[str, Any]:
        raw = await self._post_raw(path, payload, headers, timeout_s)
        try:
            out = json.loads(raw)
        except ValueError as exc:
            raise UpstreamError(502, "upstream sent invalid JSON", retryable=True) from exc
        if not isinstance(out, dict):
            raise UpstreamError(502, "upstream sent a non-object JSON", retryable=True)
        reply = RawReply(out)
        reply.raw = raw
        return reply

    async def _post_raw(
        self, path: str, payload: dict[str, Any], headers: dict[str, str], timeout_s: float
    ) -> bytes:
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.pool.post(path, headers, body, timeout_s)
                try:
                    await raise_for_upstream(resp)
                    return await read_capped(resp, self.max_body)
                except BaseException:
                    resp.close()
                    raise
        except TimeoutError as exc:
            raise UpstreamError(504, "upstream timed out", retryable=True) from exc

    async def _open(
        self, path: str, payload: dict[str, Any], headers: dict[str, str], timeout_s: float
    ) -> UpstreamResponse:
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.pool.post(path, headers, body, timeout_s)
                try:
                    await raise_for_upstream(resp)
                except BaseException:
                    # a timeout or a cancel while reading an error body: the connection is
                    # neither complete nor pooled, so close it or the upstream keeps it open
                    resp.close()
                    raise
        except TimeoutError as exc:
            raise UpstreamError(504, "upstream timed out", retryable=True) from exc
        return resp


class StreamDecoder:
    """Turns the lines of one upstream stream into OpenAI chunk dicts (sans-IO, per provider).
    Events of the wrong shape end the stream with UpstreamError, never another exception."""

    #: set when the upstream said the stream is over ([DONE], message_stop, done: true)
    done = False

    def feed_line(self, line: bytes) -> list[dict[str, Any]]:
        try:
            return self._feed_line(line)
        except SHAPE_ERRORS as exc:
            raise UpstreamError(502, f"malformed stream event: {exc}", retryable=False) from None

    def finish(self) -> list[dict[str, Any]]:
        try:
            return self._finish()
        except SHAPE_ERRORS as exc:
            raise UpstreamError(502, f"malformed stream event: {exc}", retryable=False) from None

    def _feed_line(self, line: bytes) -> list[dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError

    def _finish(self) -> list[dict[str, Any]]:
        return []


class SseStreamDecoder(StreamDecoder):
    """An SSE stream whose ``data:`` payloads are JSON events."""

    def __init__(self) -> None:
        self._sse = SseDecoder()

    def _feed_line(self, line: bytes) -> list[dict[str, Any]]:
        event = self._sse.feed_line(line)
        return [] if event is None else self.on_event(event)

    def on_event(self, data: bytes) -> list[dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError

    def _finish(self) -> list[dict[str, Any]]:
        event = self._sse.flush()
        out = [] if event is None or self.done else self.on_event(event)
        return out + self.tail()

    def tail(self) -> list[dict[str, Any]]:
        return []


def parse_event(data: bytes) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise UpstreamError(502, "bad stream JSON from upstream", retryable=False) from exc
    if not isinstance(event, dict):
        raise UpstreamError(502, "stream event is not an object", retryable=False)
    return event


async def relay(resp: UpstreamResponse, decoder: StreamDecoder, stall_s: float) -> ChunkStream:
    """Batches of chunks, one batch per network read, as they arrive (several SSE events that
    arrive together go to the client in one write). An error event ends the stream after the
    events that came before it in the same read. Closing the generator early closes the
    upstream connection, which cancels the upstream request."""
    lines = LineBuffer()
    resp.watch_stalls(stall_s)
    try:
        while not decoder.done:
            data = await resp.next_chunk()
            if data is None:
                break
            try:
                complete = lines.feed(data)
            except FramingError as exc:
                raise UpstreamError(502, str(exc), retryable=False) from exc
            batch: list[dict[str, Any]] = []
            failed: UpstreamError | None = None
            for line in complete:
                try:
                    batch.extend(decoder.feed_line(line))
                except UpstreamError as exc:
                    failed = exc  # after the events that came before it in the same read
                    break
                if decoder.done:
                    break
            if batch:
                yield batch
            if failed is not None:
                raise failed
        if not decoder.done:
            rest = lines.flush()
            batch = decoder.feed_line(rest) if rest else []
            batch += decoder.finish()
        else:
            batch = decoder.finish()
        if batch:
            yield batch
    finally:
        resp.release()
