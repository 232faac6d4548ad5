"""A lean HTTP/1.1 client for upstream calls: asyncio Protocol + httptools, keep-alive pool.

Per-request cost matters here (the gateway's added time is the product), and a general client
does much we never need (redirects, cookies, compression, proxies). This one sends one POST per
connection at a time, parses the response with httptools (llhttp), hands the body over chunk by
chunk as it arrives (SSE/NDJSON streams), applies back-pressure when the reader lags, and returns
the connection to the pool only after a complete response with keep-alive. Closing a response
early closes its connection, which is how a client disconnect cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncGenerator
from urllib.parse import urlsplit

import httptools

from .errors import UpstreamError

#: body bytes buffered before the socket is paused (a slow client slows its upstream)
READ_HIGH_WATER = 256 * 1024
#: idle keep-alive connections kept per upstream
MAX_IDLE_PER_UPSTREAM = 128
#: largest response head (status line + headers) accepted
MAX_HEAD_BYTES = 64 * 1024

_tls_context: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """One verifying client context for every https upstream, made on first use: each one
    loads the system CA store (~1 MiB and ~30 ms), and contexts are meant to be shared."""
    global _tls_context
    if _tls_context is None:
        _tls_context = ssl.create_default_context()
    return _tls_context


class _Conn(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self._header_name = b""
        self.head_bytes = 0
        self.got_bytes = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.last_data = 0.0
        self._stall_s = 0.0
        self._stall_handle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self._stall_handle is not None:
            self.last_data = self._loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(502, f"bad upstream HTTP: {exc}", retryable=True))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._unwatch()
        if not self.complete:
            self._fail(ConnectionResetError("upstream closed the connection"))
        self.pool._forget(self)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("response head too large")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # asked here: after the message is complete llhttp no longer answers it
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._unwatch()
        self._wake()

    # -- stall watchdog: one timer per stall period per stream, not one per chunk -----------

    def watch_stalls(self, stall_s: float) -> None:
        self._stall_s = stall_s
        self.last_data = self._loop.time()
        self._unwatch()
        if self.complete or self.closed:
            # the whole answer is in already (a fast upstream): nothing can stall, and a timer
            # armed now would live for stall_s after the stream is over
            return
        self._stall_handle = self._loop.call_later(stall_s, self._check_stall)

    def _unwatch(self) -> None:
        if self._stall_handle is not None:
            self._stall_handle.cancel()
            self._stall_handle = None

    def _check_stall(self) -> None:
        self._stall_handle = None
        if self.complete or self.closed:
            return
        idle = self._loop.time() - self.last_data
        if idle >= self._stall_s:
            self._fail(TimeoutError("upstream stream stalled"))
            self.close()
            return
        self._stall_handle = self._loop.call_later(self._stall_s - idle, self._check_stall)

    # -- helpers ---------------------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is not None:
            return  # the first cause wins (a stall closes the socket, which then reports loss)
        self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # mark retrieved: the caller may already be gone
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._unwatch()
        if self.transport is not None:
            self.transport.close()

    async def next_chunk(self) -> bytes | None:
        """All body bytes received so far (every HTTP chunk of a chunked body that came in
        since the last call, joined), waiting until there is some; None at the end."""
        while True:
            if self.chunks:
                if len(self.chunks) == 1:
                    data = self.chunks.popleft()
                else:
                    data = b"".join(self.chunks)
                    self.chunks.clear()
                self.buffered -= len(data)
                if self.paused and self.buffered <= READ_HIGH_WATER // 2 and self.transport:
                    self.paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None


class UpstreamResponse:
    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    async def read(self, limit: int | None = None) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                self.close()
                break
        return b"".join(parts)

    def watch_stalls(self, stall_s: float) -> None:
        """Fail the stream when no byte arrives for ``stall_s`` (closing the connection)."""
        self._conn.watch_stalls(stall_s)

    async def next_chunk(self) -> bytes | None:
        """The next body piece as it arrives, or None at the end (then the connection goes
        back to the pool). Stalls and broken connections raise UpstreamError."""
        try:
            chunk = await self._conn.next_chunk()
        except TimeoutError as exc:
            self.close()
            raise UpstreamError(504, "upstream stream stalled", retryable=False) from exc
        except (ConnectionError, UpstreamError) as exc:
            self.close()
            if isinstance(exc, UpstreamError):
                raise
            raise UpstreamError(502, f"upstream stream broke: {exc}", retryable=False) from exc
        if chunk is None:
            self.release()
        return chunk

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        conn = self._conn
        try:
            while True:
                chunk = await conn.next_chunk()
                if chunk is None:
                    break
                yield chunk
        except ConnectionError as exc:
            self.close()
            raise UpstreamError(502, f"upstream stream broke: {exc}", retryable=False) from exc
        self.release()

    def release(self) -> None:
        """Back to the pool when the response was complete and keep-alive; else close."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.complete and not conn.closed and conn.keep_alive:
            self._conn.pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()


class UpstreamPool:
    """Keep-alive connections to one upstream base URL (scheme://host:port/prefix)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        self._ssl = tls_context() if self.tls else None
        self._idle: deque[_Conn] = deque()
        self._all: set[_Conn] = set()
        #: no deployment uses this upstream any more: connections close instead of idling
        self.retired = False

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: _Conn(self),
            self.host,
            self.port,
            ssl=self._ssl,
            server_hostname=self.host if self.tls else None,
        )
        self._all.add(proto)
        return proto

    def _put(self, conn: _Conn) -> None:
        if self.retired or len(self._idle) >= MAX_IDLE_PER_UPSTREAM:
            conn.close()
            return
        conn.reused = True
        self._idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _encode(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        head = [f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for k, v in headers.items():
            head.append(f"{k}: {v}\r\n")
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        return "".join(head).encode("latin-1") + body

    async def post(
        self, path: str, headers: dict[str, str], body: bytes, connect_timeout_s: float
    ) -> UpstreamResponse:
        """Send the request and wait for the response head (the caller bounds the wait)."""
        request = self._encode(path, headers, body)
        for _ in range(2):
            conn: _Conn | None = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                try:
                    async with asyncio.timeout(connect_timeout_s):
                        conn = await self._connect()
                except TimeoutError as exc:
                    raise UpstreamError(504, "upstream connect timed out", retryable=True) from exc
                except OSError as exc:
                    raise UpstreamError(
                        502, f"upstream connect failed: {exc}", retryable=True
                    ) from exc
            else:
                conn.parser = httptools.HttpResponseParser(conn)
                conn._reset()
            assert conn.transport is not None
            conn.transport.write(request)
            try:
                await conn.head
            except ConnectionError as exc:
                conn.close()
                if conn.reused and not conn.got_bytes:
                    continue  # the server closed an idle keep-alive connection: one new try
                raise UpstreamError(502, f"upstream closed: {exc}", retryable=True) from exc
            except UpstreamError:
                conn.close()
                raise
            except BaseException:
                conn.close()  # cancelled or timed out waiting: the upstream must see it
                raise
            return UpstreamResponse(conn)
        raise UpstreamError(502, "upstream closed the connection", retryable=True)

    def retire(self) -> None:
        """Close the idle connections now; those still serving a request close when it ends
        (requests in flight on the old config finish undisturbed)."""
        self.retired = True
        while self._idle:
            self._idle.pop().close()

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        self._all.clear()
