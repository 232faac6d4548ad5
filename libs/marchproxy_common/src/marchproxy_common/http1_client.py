"""One HTTP/1.1 request and its whole answer, for control-plane calls (the desired-state
client's long poll and acknowledgements to the API, the RTMP module's ``on_publish`` hook).

Not for a data path: each call opens its own connection (``Connection: close``) with asyncio
streams; a long poll every half minute and an acknowledgement now and then need no pool.
httptools parses the answer (DESIGN.md section 5). Why not aiohttp's client: importing aiohttp
costs every module ~7 MiB of idle RSS (see ``http1``), for two calls to the API.

Every failure is an ``OSError`` (``HttpCallError`` for a malformed or oversized answer,
``ConnectionError`` and friends from the socket) or ``TimeoutError``, so callers catch one set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools

__all__ = ["HttpAnswer", "HttpCallError", "call"]

#: the largest answer body held (a desired-state snapshot is far smaller)
DEFAULT_MAX_BODY = 64 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024

_tls: ssl.SSLContext | None = None


class HttpCallError(OSError):
    """The server's answer could not be read: malformed, truncated or too large."""


@dataclass(slots=True)
class HttpAnswer:
    status: int
    #: header fields by lower-case name (a repeated field keeps its last value)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON; ``HttpCallError`` when it is not."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpCallError(f"answer is not JSON: {exc}") from None


async def call(
    method: str,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    json_body: Any = None,
    form: Mapping[str, str] | None = None,
    total_s: float,
    connect_s: float | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> HttpAnswer:
    """``method url`` (http or https): the whole exchange within ``total_s`` seconds, the
    connection within ``connect_s``. The body is ``json_body`` as JSON or ``form`` URL-encoded
    (``application/x-www-form-urlencoded``). Redirects are not followed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = parts.path or "/"
    query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
    if query:
        target += "?" + query
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port:
        host += f":{parts.port}"
    fields = {"Host": host, "Connection": "close", "Accept": "application/json"}
    body = b""
    if json_body is not None:
        body = json.dumps(json_body).encode()
        fields["Content-Type"] = "application/json"
    elif form is not None:
        body = urlencode(form).encode()
        fields["Content-Type"] = "application/x-www-form-urlencoded"
    if body or method in ("POST", "PUT", "PATCH"):
        fields["Content-Length"] = str(len(body))
    fields.update(headers or {})
    for k, v in fields.items():
        if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
            raise ValueError(f"CR or LF in request header field {k!r}")
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    request = f"{method} {target} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body
    async with asyncio.timeout(total_s):
        connecting = asyncio.open_connection(
            parts.hostname,
            port,
            ssl=_tls_context() if tls else None,
            limit=READ_SIZE,
        )
        if connect_s is not None:
            reader, writer = await asyncio.wait_for(connecting, connect_s)
        else:
            reader, writer = await connecting
        try:
            writer.write(request)
            await writer.drain()
            return await _read_answer(reader, max_body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _tls_context() -> ssl.SSLContext:
    global _tls
    if _tls is None:
        _tls = ssl.create_default_context()  # the system CAs, hostname checked
    return _tls


class _Answer:
    """httptools callbacks collecting one answer."""

    def __init__(self, max_body: int) -> None:
        self.answer = HttpAnswer(0)
        self.max_body = max_body
        self.head_bytes = 0
        self.parts: list[bytes] = []
        self.size = 0
        self.head_done = False
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)
        self.delimited = False  # framed by Content-Length or chunked coding

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise HttpCallError("answer head too large")
        self.answer.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.answer.status = self.parser.get_status_code()
        h = self.answer.headers
        self.delimited = "content-length" in h or "chunked" in h.get("transfer-encoding", "")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            raise HttpCallError(f"answer body over {self.max_body} bytes")
        self.parts.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def _read_answer(reader: asyncio.StreamReader, max_body: int) -> HttpAnswer:
    state = _Answer(max_body)
    fed = 0
    while not state.complete:
        data = await reader.read(READ_SIZE)
        if not data:
            # a body without length or chunked coding ends with the connection (RFC 9112
            # section 6.3); any other end before the answer is complete is a truncation
            if state.head_done and not state.delimited:
                break
            raise HttpCallError("connection closed before the answer was complete")
        fed += len(data)
        if not state.head_done and fed > MAX_HEAD_BYTES:
            raise HttpCallError("answer head too large")
        try:
            state.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            raise (cause if isinstance(cause, HttpCallError) else HttpCallError(str(exc))) from None
        except httptools.HttpParserError as exc:
            raise HttpCallError(f"malformed answer: {exc}") from None
    state.answer.body = b"".join(state.parts)
    return state.answer
