"""Token counting when the upstream gives no usage (e.g. a stream without a usage chunk).

This is an approximation, not a tokenizer: about four characters of English per token, which is
the rule of thumb OpenAI and Anthropic publish. Upstream usage always wins when present.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
#: framing tokens per chat message (role, separators), as in OpenAI's cookbook estimate
TOKENS_PER_MESSAGE = 3


def count_text(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN if text else 0


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def count_messages(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    total = 3
    for m in messages:
        if not isinstance(m, dict):
            continue
        total += TOKENS_PER_MESSAGE + count_text(_content_text(m.get("content")))
        calls = m.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                total += count_text(str(fn.get("name", ""))) + count_text(
                    str(fn.get("arguments", ""))
                )
    return total


def count_prompt(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat, completion or embedding request body."""
    if "messages" in body:
        return count_messages(body["messages"])
    raw = body.get("prompt", body.get("input", ""))
    if isinstance(raw, list):
        return sum(
            count_text(x) if isinstance(x, str) else len(x) if isinstance(x, list) else 1
            for x in raw
        )
    return count_text(raw) if isinstance(raw, str) else 0


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def completion_cap(kind: str, body: dict[str, Any], default: int) -> int:
    """The most completion tokens a request can be billed for: its ``max_completion_tokens`` /
    ``max_tokens`` (else ``default``) times the choices generated (``n``; ``best_of`` for
    completions, which OpenAI bills in full). Embeddings produce none."""
    if kind == "embeddings":
        return 0
    cap = _positive_int(body.get("max_completion_tokens"))
    if cap is None:
        cap = _positive_int(body.get("max_tokens"))
    if cap is None:
        cap = default
    choices = _positive_int(body.get("n")) or 1
    if kind == "completions":
        choices = max(choices, _positive_int(body.get("best_of")) or 1)
    return cap * choices
