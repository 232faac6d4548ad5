"""A fast fake OpenAI upstream for benchmarks: fixed bodies, no per-request work beyond reading.

``python benchmarks/ailb/upstream.py PORT`` serves POST /v1/chat/completions (JSON, or SSE with
five content chunks and a usage chunk when ``"stream": true``) on 127.0.0.1:PORT.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, friend!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
).encode()


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


STREAM = [_chunk({"role": "assistant", "content": ""})]
STREAM += [_chunk({"content": w}) for w in ("Hello", " there", ",", " friend", "!")]
STREAM += [_chunk({}, "stop")]
USAGE = (
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
    ).encode()
    + b"\n\n"
)


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    raw = await request.read()
    if b'"stream":true' not in raw.replace(b" ", b""):
        return web.Response(body=BODY, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    try:
        await resp.prepare(request)
        for c in STREAM:
            await resp.write(c)
        if b"include_usage" in raw:
            await resp.write(USAGE)
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionError:
        pass  # the gateway cancelled the stream (its client went away): expected
    return resp


async def main(port: int) -> None:
    server = web.Server(handle)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
    print(f"upstream listening on {port}", flush=True)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
