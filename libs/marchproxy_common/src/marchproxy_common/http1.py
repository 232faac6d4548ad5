"""A small HTTP/1.1 server for endpoints that take a whole request body and answer it.

Used by the admin surface of every service (``admin_http``) and by the AILB's OpenAI API. An
asyncio Protocol with httptools parsing (DESIGN.md section 5), one task per request.

Why not aiohttp's server: importing any part of aiohttp runs its package ``__init__``, which
loads the whole client as well (cookies, email parsing, netrc, TLS contexts) and three helper
packages. A process that serves HTTP only through this module imports 93 modules fewer and
holds ~6.8 MiB less idle RSS (measured in the AILB: benchmarks/ailb/README.md).

What it does, and the limits an operator can rely on (:class:`Limits`):

- keep-alive and pipelining (requests on one connection are answered in order; reading
  pauses while ``max_pipelined`` requests wait), HTTP/1.0 with and without keep-alive;
- the body is read whole before the handler runs, up to ``max_body`` (a larger
  ``Content-Length`` is refused with 413 before the body is sent, a larger chunked body as
  soon as it passes the limit; the connection then closes); ``Expect: 100-continue`` answered;
- a request head larger than ``max_head_bytes`` or with more than ``max_headers`` fields: 431;
  a malformed request: 400; a head or body that does not arrive in time: 408; each closes the
  connection. Idle keep-alive connections close after ``keepalive_timeout``;
- the handler returns a :class:`Response`, or streams one with :meth:`Request.stream`
  (chunked transfer coding; HTTP/1.0 clients get a close-delimited body);
- a client that goes away (EOF or reset) while its request is handled cancels the handler's
  task, so work done on the client's behalf (an upstream request) stops with it;
- HEAD is answered with the headers a GET would get, without the body;
- :meth:`HttpServer.shutdown` closes idle connections at once and lets requests in progress
  finish within a deadline.

Protocol-level errors are answered by the ``error`` callable the server is given, so each
service keeps its own error shape (seed 002's for the admin surface, OpenAI's for the AILB).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
import structlog

from marchproxy_common.tasks import spawn

__all__ = [
    "Answer",
    "ErrorFactory",
    "Handler",
    "Headers",
    "HttpServer",
    "Limits",
    "Request",
    "Response",
    "StreamWriter",
]

_log = structlog.get_logger("marchproxy.http")

#: after a refusal, how long the client's further bytes are read and dropped before the close
LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class Limits:
    #: request line plus header fields, in bytes
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    #: the largest request body held for the handler
    max_body: int = 1024 * 1024
    #: from a request's first byte to the end of its head
    head_timeout: float = 30.0
    #: from the end of a request's head to the end of its body
    body_timeout: float = 60.0
    #: how long a keep-alive connection may sit idle between requests
    keepalive_timeout: float = 75.0
    #: complete requests queued behind the one being handled before reading pauses
    max_pipelined: int = 16


class Headers(dict[str, str]):
    """Request header fields by lower-case name; a repeated field's values joined with ``, ``
    (RFC 9110 section 5.3). Lookups take any case."""

    __slots__ = ()

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class Response:
    """A whole answer: status, header fields (as given, in order) and body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: bytes = b"",
        *,
        status: int = 200,
        content_type: str | None = "text/plain; charset=utf-8",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers: dict[str, str] = dict(headers) if headers else {}


class Request:
    """One complete request. ``body`` holds all of it (already checked against ``max_body``)."""

    __slots__ = (
        "_conn",
        "_writer",
        "body",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query_string",
        "raw_path",
        "version",
    )

    def __init__(
        self,
        conn: HttpConnection,
        method: str,
        raw_path: str,
        version: str,
        headers: Headers,
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self._writer: StreamWriter | None = None
        self.method = method
        self.raw_path = raw_path
        path, _, self.query_string = raw_path.partition("?")
        self.path = unquote(path) if "%" in path else path
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""

    def stream(
        self,
        status: int = 200,
        *,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> StreamWriter:
        """Start a streamed answer. Its head goes out with the first write (or at finish); the
        handler returns the writer when done."""
        if self._writer is not None:
            raise RuntimeError("this request's answer is already being streamed")
        conn = self._conn
        chunked = self.version == "1.1"
        close = not self.keep_alive or conn.closing or not chunked
        if close:
            self.keep_alive = False  # a close-delimited body ends with the connection
        head = _head(
            status,
            headers or {},
            content_type,
            b"Transfer-Encoding: chunked\r\n" if chunked else b"",
            close,
            self.version,
        )
        self._writer = StreamWriter(conn, head, chunked, self.method == "HEAD")
        return self._writer


class StreamWriter:
    """The body of a streamed answer, written piece by piece with backpressure."""

    __slots__ = ("_chunked", "_conn", "_head", "_no_body", "finished")

    def __init__(self, conn: HttpConnection, head: bytes, chunked: bool, no_body: bool) -> None:
        self._conn = conn
        self._head = head
        self._chunked = chunked
        self._no_body = no_body
        self.finished = False

    async def write(self, data: bytes) -> None:
        """Send ``data`` (one chunk); waits while the client reads slower than we write.
        Raises ConnectionResetError once the client has gone away."""
        if self.finished:
            raise RuntimeError("write after finish")
        if not data or self._no_body:
            return
        frame = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
        if self._head:
            frame = self._head + frame
            self._head = b""
        await self._conn.send(frame)

    async def finish(self) -> None:
        """End the body (the last chunk); the connection then serves its next request."""
        if self.finished:
            return
        self.finished = True
        out = self._head + (b"0\r\n\r\n" if self._chunked and not self._no_body else b"")
        self._head = b""
        if out:
            await self._conn.send(out)


Answer = Response | StreamWriter
Handler = Callable[[Request], Awaitable[Answer]]
#: (status, code, message) -> the answer to a request refused before any handler saw it
ErrorFactory = Callable[[int, str, str], Response]


def plain_error(status: int, code: str, message: str) -> Response:
    return Response(message.encode(), status=status)


class HttpServer:
    """A protocol factory for ``loop.create_server``; it also tracks its connections."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits | None = None,
        error: ErrorFactory = plain_error,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.error = error
        #: called with the status of each request refused before a handler saw it (metrics)
        self.on_refused = on_refused
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._all_closed: asyncio.Event | None = None  # set by shutdown()

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def internal_error(self) -> Response:
        """The answer when a handler fails: the caller's error shape, never a stack trace."""
        return self.error(500, "internal_error", "internal error")

    async def shutdown(self, grace_s: float) -> None:
        """Close idle connections now; connections handling a request close after answering
        it. Whatever is still open after ``grace_s`` seconds is aborted."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace_s)
        for conn in list(self.connections):
            conn.abort()

    def _forget(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


_IDLE, _HEAD, _BODY = 0, 1, 2


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_deadline",
        "_drain",
        "_field_bytes",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_limits",
        "_parser",
        "_paused_reading",
        "_queue",
        "_refused",
        "_request",
        "_task",
        "_timer",
        "_timing",
        "_url",
        "closed",
        "closing",
        "loop",
        "server",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self._limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: no more requests are read: the connection closes once the current answer is out
        self.closing = False
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()
        self._refused: Response | None = None  # refused while an earlier request is handled
        self._task: asyncio.Task[None] | None = None
        self._request: Request | None = None  # the one being parsed
        self._url = b""
        self._headers: Headers = Headers()
        self._head_bytes = 0  # reads fed while inside a head
        self._field_bytes = 0  # header fields parsed so far
        self._in_head = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._drain: asyncio.Future[None] | None = None
        self._paused_reading = False
        # one timer per connection; moving the deadline later re-arms it only when it fires
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timing = _IDLE  # which of the request's timeouts the deadline is

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        if self.server.closing:
            self.closing = True
            transport.close()
            return
        self._arm(self._limits.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        self.server._forget(self)
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()  # the client went away: stop the work done for it
        self._queue.clear()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the client closed the connection"))
            drain.exception()  # retrieved here: a writer may never wait on it

    def eof_received(self) -> bool | None:
        # a client that closes its side is treated as gone (as aiohttp does): for an LLM
        # request that may run for minutes, stopping the upstream matters more than answering
        # a client that half-closed
        return None

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self._parser.feed_data(data)
            # a request that arrived whole in this read needs no timer; one that did not gets
            # its head (or body) timeout once, from the read that started it
            if self._in_head:
                # httptools holds a partial field back until it is complete: count the reads
                self._head_bytes += len(data)
                if self._head_bytes > self._limits.max_head_bytes:
                    raise _Refused(431, "headers_too_large", "Request header fields too large")
                if self._timing != _HEAD:
                    self._timing = _HEAD
                    self._arm(self._limits.head_timeout)
            elif self._request is not None and self._timing != _BODY:
                self._timing = _BODY
                self._arm(self._limits.body_timeout)
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Refused):
                self._refuse(ctx)
            else:
                self._refuse(_Refused(400, "bad_request", f"Malformed request: {ctx or exc}"))
        except httptools.HttpParserUpgrade:
            if self._request is None and not self._in_head:
                # RFC 9110 section 7.8: a server may ignore Upgrade. The request is answered
                # as any other; what follows it is not HTTP/1.1 to us, so the connection
                # closes after the answer
                self.closing = True
                self._pause_reading()
            else:
                self._refuse(_Refused(400, "bad_request", "Malformed upgrade request"))
        except httptools.HttpParserError as exc:
            self._refuse(_Refused(400, "bad_request", f"Malformed request: {exc}"))
        except _Refused as exc:
            self._refuse(exc)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._field_bytes = 0
        self._url = b""
        self._headers = Headers()
        self._body = []
        self._body_size = 0
        self._timing = _IDLE

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_head_bytes:
            raise _Refused(414, "uri_too_long", "Request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > self._limits.max_head_bytes:
            raise _Refused(431, "headers_too_large", "Request header fields too large")
        if len(headers) >= self._limits.max_headers:
            raise _Refused(431, "headers_too_large", "Too many request header fields")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = dict.get(headers, key)
        dict.__setitem__(headers, key, text if old is None else f"{old}, {text}")

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        version = p.get_http_version()
        if version == "1.1" and "host" not in self._headers:
            # RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host
            raise _Refused(400, "bad_request", "HTTP/1.1 requests need a Host header")
        req = Request(
            self,
            p.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            version,
            self._headers,
            p.should_keep_alive(),
        )
        self._request = req
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body:
            raise _Refused(413, "request_too_large", "Request body too large")
        expect = self._headers.get("expect")
        if expect is not None and version == "1.1" and expect.lower() == "100-continue":
            # RFC 9110 section 10.1.1: the client waits for this before sending the body
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body:
            raise _Refused(413, "request_too_large", "Request body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        req = self._request
        if req is None:  # pragma: no cover - httptools calls on_headers_complete first
            return
        self._request = None
        body = self._body
        req.body = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._deadline = 0.0
        if self._task is None:
            self._task = spawn(self._serve(req), name="http request")
        else:
            self._queue.append(req)
            if len(self._queue) >= self._limits.max_pipelined:
                self._pause_reading()

    # -- serving ------------------------------------------------------------------------------

    async def _serve(self, req: Request) -> None:
        try:
            await self._serve_in_order(req)
        except Exception:  # a bug here must not leave the connection open with no timer
            _log.exception("http_connection_failed", path=req.path)
            self.abort()

    async def _serve_in_order(self, req: Request) -> None:
        while True:
            await self._answer(req)
            if self.closed:
                return
            if not req.keep_alive or self.server.closing:
                self._close()
                return
            if self._queue:  # pipelined requests that arrived whole are answered first
                req = self._queue.popleft()
                if not self.closing:
                    self._resume_reading()
                continue
            refused, self._refused = self._refused, None
            if refused is not None:
                await self._respond(self._dummy(), refused)
                self._task = None
                self._linger()
                return
            if self.closing:
                self._close()
                return
            break
        self._task = None
        self._arm(self._limits.keepalive_timeout)

    async def _answer(self, req: Request) -> None:
        try:
            answer = await self.server.handler(req)
        except asyncio.CancelledError:
            if not self.closed:
                self._close()
            raise
        except Exception:
            _log.exception("http_handler_failed", method=req.method, path=req.path)
            if req._writer is not None:  # the head is out: nothing to say but goodbye
                self.abort()
                return
            answer = self.server.internal_error()
        if isinstance(answer, StreamWriter):
            if not answer.finished:
                with contextlib.suppress(ConnectionError):
                    await answer.finish()
            return
        if not isinstance(answer, Response):
            _log.error("http_handler_failed", path=req.path, error=f"returned {answer!r}")
            answer = self.server.internal_error()
        if req._writer is not None:
            _log.error("http_handler_failed", path=req.path, error="streamed, then answered")
            self.abort()
            return
        try:
            await self._respond(req, answer)
        except (ValueError, UnicodeEncodeError):  # a header field we cannot send as is
            _log.exception("http_answer_invalid", method=req.method, path=req.path)
            await self._respond(req, self.server.internal_error())

    async def _respond(self, req: Request, resp: Response) -> None:
        # the last answer this connection gives says so (answers to pipelined requests that
        # arrived before a refusal or a shutdown still go out first)
        close = (
            not req.keep_alive
            or self.server.closing
            or (self.closing and not self._queue and self._refused is None)
        )
        if close:
            self.closing = True
        body = resp.body
        status = resp.status
        if status == 204 or status == 304:  # RFC 9110 sections 8.6, 15.3.5: no body, no length
            body, framing = b"", b""
        else:
            framing = b"Content-Length: %d\r\n" % len(body)
        head = _head(status, resp.headers, resp.content_type, framing, close, req.version)
        if req.method == "HEAD" or not body:
            self._write(head)
        elif len(body) <= 16384:
            self._write(head + body)  # one send()
        else:
            self._write(head)
            self._write(body)
        if self._drain is not None:
            try:
                await self.send(b"")
            except ConnectionError:
                pass

    async def send(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if data:
            self.transport.write(data)
        drain = self._drain
        if drain is not None:
            await drain

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _refuse(self, err: _Refused) -> None:
        """Answer a request no handler will see, then close (what follows cannot be framed)."""
        self.closing = True
        self._in_head = False
        self._deadline = 0.0
        self._pause_reading()
        resp = self.server.error(err.status, err.code, err.message)
        if self.server.on_refused is not None:
            self.server.on_refused(err.status)
        req, self._request = self._request, None
        if self._task is not None:
            self._refused = resp  # answered after the requests before it
            return
        self._task = spawn(self._refusal(req or self._dummy(), resp), name="http refusal")

    def _dummy(self) -> Request:
        return Request(self, "GET", "/", "1.1", Headers(), False)

    async def _refusal(self, req: Request, resp: Response) -> None:
        req.keep_alive = False
        await self._respond(req, resp)
        self._task = None
        self._linger()

    def _linger(self) -> None:
        """After a refusal: the answer is out and our side is shut; the client may still be
        sending what we refused (a body too large). Read and drop it for a short while, so the
        close does not reset the connection before the client has read the answer."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self._resume_reading()
        self._arm(LINGER_S)

    # -- timers and state ---------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._deadline = deadline = self.loop.time() + seconds
        timer = self._timer
        if timer is not None and timer.when() > deadline:
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline == 0.0 or self.closed:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._deadline = 0.0
        if self._in_head or self._request is not None:
            self._refuse(_Refused(408, "request_timeout", "The request did not arrive in time"))
        elif self._task is None:
            self._close()  # an idle keep-alive connection, or the end of a linger

    def close_if_idle(self) -> None:
        self.closing = True
        if self._task is None and not self._in_head and self._request is None:
            self._close()

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.abort()


# -- answer heads ------------------------------------------------------------------------------

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache: list[Any] = [0, b""]


def _date() -> bytes:
    """The Date field (RFC 9110 section 6.6.1: an origin server with a clock sends it), made
    once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        t = time.gmtime(now)
        _date_cache[0] = now
        _date_cache[1] = (
            f"Date: {_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT\r\n"
        ).encode()
    return _date_cache[1]  # type: ignore[no-any-return]


def _head(
    status: int,
    headers: Mapping[str, str],
    content_type: str | None,
    framing: bytes,
    close: bool,
    version: str,
) -> bytes:
    fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if content_type is not None:
        fields += f"Content-Type: {content_type}\r\n"
    lines = len(headers) + (content_type is not None)
    if fields.count("\n") != lines or fields.count("\r") != lines:
        # a CR or LF in a name or value would split the answer (response splitting)
        raise ValueError("CR or LF in a response header field")
    if close:
        connection = b"Connection: close\r\n"
    elif version == "1.0":
        connection = b"Connection: keep-alive\r\n"
    else:
        connection = b""
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
            _date(),
            fields.encode("latin-1"),
            framing,
            connection,
            b"\r\n",
        )
    )
