"""Sans-IO framing of upstream streams: NDJSON/SSE lines and SSE ``data:`` events.

Fed bytes in whatever pieces the network delivers; returns complete lines / event payloads.
No I/O here, so every split of the input can be tested (tests/ailb/test_ailb_framing.py).
"""

from __future__ import annotations

#: longest line accepted from an upstream stream (an SSE event or an NDJSON object)
MAX_LINE_BYTES = 4 * 1024 * 1024


class FramingError(ValueError):
    """The upstream stream broke a framing rule (a line longer than the cap)."""


class LineBuffer:
    """Splits a byte stream into lines on ``\\n`` (a trailing ``\\r`` is kept for the caller)."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            if len(self._buf) > self._max:
                raise FramingError("stream line too long")
            return []
        *lines, rest = bytes(self._buf).split(b"\n")
        self._buf = bytearray(rest)
        if len(rest) > self._max or any(len(line) > self._max for line in lines):
            raise FramingError("stream line too long")
        return lines

    def flush(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class SseDecoder:
    """text/event-stream (WHATWG HTML, "Server-sent events"): ``data:`` lines of one event are
    joined with ``\\n``; an empty line ends the event; comments and other fields are skipped."""

    def __init__(self) -> None:
        self._data: list[bytes] = []

    def feed_line(self, line: bytes) -> bytes | None:
        line = line.rstrip(b"\r")
        if not line:
            if not self._data:
                return None
            event = b"\n".join(self._data)
            self._data.clear()
            return event
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        return None

    def flush(self) -> bytes | None:
        return self.feed_line(b"")
