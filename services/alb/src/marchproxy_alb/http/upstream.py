"""The client side of the proxy: one asyncio Protocol per upstream TCP connection, parsed with
httptools' response parser, and a keep-alive pool of idle connections per target."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools
import structlog

from marchproxy_alb.routing import Target
from marchproxy_common.net.sockets import SocketPoller, open_connection

from .flow import BodyChannel, WriteFlow, loop_clock
from .framing import FramingError, ResponseHead, framing_of, scan_simple_response

log = structlog.get_logger("marchproxy.alb.upstream")

MAX_RESPONSE_HEADER_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 200
DEFAULT_MAX_IDLE_PER_TARGET = 64
DEFAULT_POOL_IDLE_TIMEOUT = 60.0
UPSTREAM_WRITE_HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The upstream failed an exchange. ``before_response`` says no response byte was seen."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class _WholeMessage:
    """httptools callbacks that only see whether one read held exactly one whole message (with
    no field callbacks llhttp checks a head in C alone): the check behind
    ``scan_simple_response``."""

    __slots__ = ("begun", "complete", "keep_alive", "parser")

    def __init__(self) -> None:
        self.begun = 0
        self.complete = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    def one_message(self, data: bytes) -> bool:
        """Whether ``data`` is one whole message; False leaves this checker unusable."""
        self.begun = 0
        self.complete = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            return False
        return self.complete and self.begun == 1


class _HeadResponseDone(Exception):
    """Raised inside the parser to stop after the head of a HEAD response (no body follows)."""


class UpstreamConnection(asyncio.Protocol):
    def __init__(
        self,
        target: Target,
        on_closed: Callable[[UpstreamConnection], None],
        server_name: str | None = None,
    ) -> None:
        self.target = target
        self.loop = asyncio.get_running_loop()  # protocols are made by the loop, inside it
        self._now = loop_clock(self.loop)  # loop.time(), cheaper
        self.server_name = server_name
        self._on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.flow = WriteFlow()
        self.closed = False
        self.reading_paused = False  # pause_reading() (by the body channel) not yet resumed
        self.requests = 0
        # lazy idle timer: release() only moves the deadline; the handle re-checks when it fires
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_deadline = 0.0
        # lazy head timer, the same way: expect_head_by() moves a deadline; one handle per
        # connection fires at the earliest deadline it was armed for and re-checks
        self._head_handle: asyncio.TimerHandle | None = None
        self._head_handle_at = 0.0
        self.head_deadline = 0.0
        # per exchange
        self._method = "GET"
        #: between begin*() and the pool's release(): an exchange expects a response
        self.armed = False
        #: settled with the response head (or an error) for an exchange that waits for it;
        #: the fast path (begin_fast) has none until something has to wait (head_waiter)
        self.head_future: asyncio.Future[ResponseHead] | None = None
        self.body: BodyChannel | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing_headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._skip_informational = False
        #: the parser is between messages (nothing of the next response fed to it yet), so a
        #: read that holds a whole common response can skip it (scan_simple_response)
        self._between = True
        self._checker: _WholeMessage | None = None
        self.response_complete = False
        self.response_bytes = 0
        self.keep_alive = False
        self.upgrade_rest: bytes | None = None
        self.tunnel_sink: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self.on_write_paused: Callable[[bool], None] | None = None
        #: the fast path's exchange waits without a task: called once the head future is done
        #: (a head, an error, a timeout) at the end of the read or event that settled it
        self.on_event: Callable[[], None] | None = None
        #: the fast path's exchange, for a whole response scanned in one read (head and body):
        #: True when it answered the client (then no head future or body channel is used)
        self.on_whole: Callable[[ResponseHead, bytes], bool] | None = None

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=UPSTREAM_WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.flow.close()
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if self._head_handle is not None:
            self._head_handle.cancel()
            self._head_handle = None
        hf = self.head_future
        if self.armed and (hf is None or not hf.done()):
            hf = self.head_waiter()
            hf.set_exception(
                UpstreamError(
                    "upstream closed before a response",
                    before_response=self.response_bytes == 0,
                )
            )
        body = self.body
        if body is not None and not self.response_complete:
            if self._close_delimited:
                self.response_complete = True
                body.feed_eof()
            else:
                body.fail(UpstreamError("upstream closed mid-response", before_response=False))
        if self.on_lost is not None:
            self.on_lost()
        self._on_closed(self)
        if self.on_event is not None and hf is not None and hf.done():
            self.on_event()

    def eof_received(self) -> bool | None:
        if self.tunnel_sink is not None and self.on_eof is not None:
            self.on_eof()  # half-close passes through the tunnel
            return True
        return None

    def pause_writing(self) -> None:
        self.flow.pause()
        if self.on_write_paused is not None:
            self.on_write_paused(True)

    def resume_writing(self) -> None:
        self.flow.resume()
        if self.on_write_paused is not None:
            self.on_write_paused(False)

    def data_received(self, data: bytes) -> None:
        if self.tunnel_sink is not None:
            self.tunnel_sink(data)
            return
        if not self.armed or self.response_complete:
            # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        self.response_bytes += len(data)
        if self._between and self._method != "HEAD":
            found = scan_simple_response(
                data, max_head=MAX_RESPONSE_HEADER_BYTES, max_headers=MAX_RESPONSE_HEADERS
            )
            if found is not None:
                checker = self._checker
                if checker is None:
                    checker = self._checker = _WholeMessage()
                if checker.one_message(data) and checker.keep_alive == found[0].keep_alive:
                    head, body_start = found
                    on_whole = self.on_whole
                    hf = self.head_future
                    if on_whole is not None and (hf is None or not hf.done()):
                        self.keep_alive = head.keep_alive
                        self.response_complete = True  # (so the exchange can pool us)
                        if on_whole(head, data[body_start:]):
                            return
                    self._scanned(data, head, body_start)
                    return
                self._checker = None  # (mid-message or failed: a new one next time)
        self._between = False
        try:
            self._parser.feed_data(data)
            hf = self.head_future
            if self.response_bytes > MAX_RESPONSE_HEADER_BYTES and (hf is None or not hf.done()):
                # everything so far is (interim or final) head: httptools would keep buffering
                self._fail("upstream response head too large")
        except httptools.HttpParserUpgrade as exc:
            self.upgrade_rest = data[int(exc.args[0]) :]
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadResponseDone):
                self._parser = httptools.HttpResponseParser(self)
                self._between = True
                self._finish()
            else:
                self._fail(f"bad upstream response: {exc.__context__ or exc}")
        except httptools.HttpParserError as exc:
            self._fail(f"bad upstream response: {exc}")
        if self.on_event is not None and self.head_future is not None and self.head_future.done():
            self.on_event()

    def _scanned(self, data: bytes, head: ResponseHead, body_start: int) -> None:
        """A whole response, read without the parser (which stays between messages)."""
        self.keep_alive = head.keep_alive
        hf = self.head_waiter()
        if not hf.done():
            if self.body is None:
                self.body = BodyChannel(self.pause_reading, self.resume_reading)
            hf.set_result(head)
        if body_start < len(data) and self.body is not None:
            self.body.feed(data[body_start:])
        self._finish()
        if self.on_event is not None and hf.done():
            self.on_event()

    # ------------------------------------------------------------------ exchange

    def begin(
        self,
        method: str,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
    ) -> None:
        """Arm for the response to a request we are about to write. Without ``pause`` and
        ``resume`` (the fast path) the body channel, pausing this connection, is made only
        when a response head arrives the usual way (``on_whole`` needs none)."""
        self.idle_deadline = 0.0
        self.head_deadline = 0.0
        self._method = method
        self.armed = True
        self.head_future = self.loop.create_future()
        self.body = None if pause is None or resume is None else BodyChannel(pause, resume)
        self.response_complete = False
        self.response_bytes = 0
        self.keep_alive = False
        self.upgrade_rest = None
        self.requests += 1

    def begin_fast(self, head_by: float) -> None:
        """``begin("GET")`` and ``expect_head_by(head_by)`` for the fast path, without the head
        future: a whole response goes to ``on_whole``; the future is made only when something
        has to wait for the head (``head_waiter``)."""
        self.idle_deadline = 0.0
        self._method = "GET"
        self.armed = True
        self.body = None
        self.response_complete = False
        self.response_bytes = 0
        self.keep_alive = False
        self.upgrade_rest = None
        self.requests += 1
        self.expect_head_by(head_by)

    def head_waiter(self) -> asyncio.Future[ResponseHead]:
        """The head future of the current exchange, made now if it has none yet."""
        hf = self.head_future
        if hf is None:
            hf = self.head_future = self.loop.create_future()
        return hf

    def expect_head_by(self, when: float) -> None:
        """Fail the head future with TimeoutError unless the head arrives by ``when``."""
        self.head_deadline = when
        h = self._head_handle
        if h is None or self._head_handle_at > when:
            if h is not None:
                h.cancel()
            self._head_handle_at = when
            self._head_handle = self.loop.call_at(when, self._head_check)

    def _head_check(self) -> None:
        self._head_handle = None
        hf = self.head_future
        if self.closed or not self.armed or self.head_deadline == 0.0:
            return
        if hf is not None and hf.done():
            return
        if self.loop.time() < self.head_deadline:
            self.expect_head_by(self.head_deadline)
        else:
            self.head_waiter().set_exception(TimeoutError("no response head in time"))
            if self.on_event is not None:
                self.on_event()

    def arm_idle(self, idle_timeout: float) -> None:
        self.idle_deadline = self._now() + idle_timeout
        if self.idle_handle is None:
            self.idle_handle = self.loop.call_at(self.idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.closed or self.idle_deadline == 0.0:
            return  # in use again (begin() cleared the deadline)
        loop = self.loop
        if loop.time() < self.idle_deadline:
            self.idle_handle = loop.call_at(self.idle_deadline, self._idle_check)
        else:
            self.close()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def reusable(self) -> bool:
        return (
            not self.closed
            and self.response_complete
            and self.keep_alive
            and self.upgrade_rest is None
            and self.transport is not None
            and not self.transport.is_closing()
        )

    @property
    def _close_delimited(self) -> bool:
        hf = self.head_future
        if hf is None or not hf.done() or hf.cancelled() or hf.exception() is not None:
            return False
        head = hf.result()
        return head.content_length is None and not head.chunked

    def _fail(self, message: str) -> None:
        err = UpstreamError(message, before_response=False)
        hf = self.head_future
        if self.armed and (hf is None or not hf.done()):
            self.head_waiter().set_exception(err)
        elif self.body is not None and not self.response_complete:
            self.body.fail(err)
        self.keep_alive = False
        self.abort()

    def _finish(self) -> None:
        self.response_complete = True
        if self.body is not None:
            self.body.feed_eof()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._between = False
        self._headers = []
        self._framing_headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # bytes are bounded in data_received (which also sees a header still in pieces)
        headers = self._headers
        headers.append((name, value))
        n = len(name)
        if n == 14 or n == 17:  # maybe Content-Length / Transfer-Encoding: for framing_of
            self._framing_headers.append((name, value))
        if len(headers) > MAX_RESPONSE_HEADERS:
            raise FramingError(502, "upstream response has too many headers")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._skip_informational = True  # RFC 9110 §15.2: drop interim responses
            return
        chunked, length = framing_of(self._framing_headers)
        p = self._parser
        head = ResponseHead(
            status,
            self._reason,
            p.get_http_version(),
            self._headers,
            p.should_keep_alive(),
            chunked,
            length,
        )
        self.keep_alive = head.keep_alive
        hf = self.head_future
        if self.armed and (hf is None or not hf.done()):
            hf = self.head_waiter()
            if self.body is None:
                self.body = BodyChannel(self.pause_reading, self.resume_reading)
            hf.set_result(head)
        if self._method == "HEAD":
            raise _HeadResponseDone

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.feed(body)

    def on_message_complete(self) -> None:
        if self._skip_informational:
            self._skip_informational = False
            return
        self.keep_alive = self._parser.should_keep_alive()
        self._between = True
        self._finish()


class UpstreamPool:
    """Idle keep-alive connections per target, bounded in count and idle time."""

    def __init__(
        self,
        *,
        max_idle_per_target: int = DEFAULT_MAX_IDLE_PER_TARGET,
        idle_timeout: float = DEFAULT_POOL_IDLE_TIMEOUT,
        tls_verify: bool = True,
        on_open: Callable[[Target], None] | None = None,
        on_close: Callable[[Target], None] | None = None,
    ) -> None:
        self.max_idle_per_target = max_idle_per_target
        self.idle_timeout = idle_timeout
        # keyed by (target.key, TLS server name): a connection verified for one name is not
        # reused for another. (The key string, not the Target: a str caches its hash, where a
        # Target's __hash__ is a Python call, twice per request.)
        self._idle: dict[tuple[str, str | None], deque[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self._on_open = on_open
        self._on_close = on_close
        self._ssl: ssl.SSLContext | None = None
        self._tls_verify = tls_verify
        self._tls_settings: tuple[bool, str | None] = (tls_verify, None)
        self.opened = 0
        #: the client sockets' epoll: plain-HTTP upstream sockets go on it too (None: asyncio's
        #: transports, e.g. on uvloop; TLS targets always use asyncio's)
        self.poller: SocketPoller | None = None

    @property
    def open_connections(self) -> int:
        return len(self._all)

    @property
    def idle_connections(self) -> int:
        return sum(len(d) for d in self._idle.values())

    @staticmethod
    def build_tls_context(verify: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
        """The client context for https:// targets (blocking: it reads the CA store)."""
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.set_alpn_protocols(["http/1.1"])
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def configure_tls(self, *, verify: bool = True, ca_file: str | None = None) -> None:
        """TLS towards https:// targets: verify against the system store or ``ca_file``."""
        self.install_tls(self.build_tls_context(verify, ca_file), verify=verify, ca_file=ca_file)

    def install_tls(self, ctx: ssl.SSLContext, *, verify: bool, ca_file: str | None) -> None:
        """Use a context made by :meth:`build_tls_context` from now on."""
        changed = self._ssl is not None and (verify, ca_file) != self._tls_settings
        self._tls_verify = verify
        self._tls_settings = (verify, ca_file)
        self._ssl = ctx
        if changed:  # pooled TLS connections were verified under the old settings
            for (key, _), dq in self._idle.items():
                if key.startswith("https:"):
                    for conn in list(dq):
                        conn.close()

    def ssl_context(self) -> ssl.SSLContext:
        """The context https:// targets are verified with (requests and health checks)."""
        if self._ssl is None:
            self.configure_tls(verify=self._tls_verify)
        assert self._ssl is not None
        return self._ssl

    def take_idle(
        self, target: Target, server_name: str | None = None
    ) -> UpstreamConnection | None:
        """A pooled keep-alive connection to ``target``, if one is idle (no await needed)."""
        dq = self._idle.get((target.key, server_name if target.scheme == "https" else None))
        while dq:
            conn = dq.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def acquire(
        self, target: Target, connect_timeout: float, server_name: str | None = None
    ) -> tuple[UpstreamConnection, bool]:
        """An idle connection to ``target`` (reused=True) or a new one."""
        key = (target, server_name if target.scheme == "https" else None)
        conn = self.take_idle(target, server_name)
        if conn is not None:
            return conn, True
        loop = asyncio.get_running_loop()
        ctx = self.ssl_context() if target.scheme == "https" else None
        poller = self.poller
        async with asyncio.timeout(connect_timeout):
            if ctx is None and poller is not None:
                _, conn = await open_connection(
                    poller,
                    lambda: UpstreamConnection(target, self._closed, key[1]),
                    target.host,
                    target.port,
                )
            else:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(target, self._closed, key[1]),
                    target.host,
                    target.port,
                    ssl=ctx,
                    server_hostname=(server_name or target.host) if ctx is not None else None,
                )
        self._all.add(conn)
        self.opened += 1
        if self._on_open is not None:
            self._on_open(target)
        return conn, False

    def release(self, conn: UpstreamConnection, *, abort: bool = False) -> None:
        """Return a connection after an exchange: pooled when reusable, else closed."""
        reusable = conn.reusable and not abort
        conn.armed = False
        conn.head_future = None
        conn.body = None
        conn.on_lost = None
        conn.on_eof = None
        conn.on_write_paused = None
        conn.on_event = None
        conn.on_whole = None
        if not reusable:
            if abort:
                conn.abort()
            else:
                conn.close()
            return
        key = (conn.target.key, conn.server_name)
        dq = self._idle.get(key)
        if dq is None:
            dq = self._idle[key] = deque()
        if len(dq) >= self.max_idle_per_target:
            conn.close()
            return
        if conn.reading_paused:
            conn.resume_reading()  # a pause left over from the body channel must not stick
        conn.arm_idle(self.idle_timeout)
        dq.append(conn)

    def _closed(self, conn: UpstreamConnection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            if self._on_close is not None:
                self._on_close(conn.target)
        dq = self._idle.get((conn.target.key, conn.server_name))
        if dq is not None:
            try:
                dq.remove(conn)
            except ValueError:
                pass

    def close_all(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
