"""Shape checks on client request bodies, before anything is routed (pure; 400s in OpenAI's
error shape). Only what the gateway itself reads is checked; the rest passes through for the
upstream to judge."""

from __future__ import annotations

from typing import Any

from .errors import GatewayError

#: most choices one request may ask for
MAX_N = 128


def _bad(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value")


def validate_body(kind: str, body: dict[str, Any]) -> None:
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N):
        raise _bad(f"'n' must be an integer from 1 to {MAX_N}", "n")
    for name in ("tools", "stop"):
        value = body.get(name)
        if value is not None and not isinstance(value, (list, str) if name == "stop" else list):
            raise _bad(f"'{name}' has the wrong type", name)
    fmt = body.get("response_format")
    if fmt is not None and not isinstance(fmt, dict):
        raise _bad("'response_format' must be an object", "response_format")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty array", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
            calls = m.get("tool_calls")
            if calls is not None and not (
                isinstance(calls, list) and all(isinstance(c, dict) for c in calls)
            ):
                raise _bad(f"messages[{i}].tool_calls must be an array of objects", "messages")
    elif kind == "completions":
        if not isinstance(body.get("prompt"), (str, list)):
            raise _bad("'prompt' must be a string or an array", "prompt")
    elif kind == "embeddings" and not isinstance(body.get("input"), (str, list)):
        raise _bad("'input' must be a string or an array", "input")
