"""The server side of the proxy: one asyncio Protocol per client connection.

httptools parses; each complete request head becomes a :class:`PendingRequest` whose body
streams through a bounded :class:`BodyChannel`. Requests are served strictly one at a time
(pipelined requests wait, and reading pauses while one is queued), so responses always go out in
order. A request head must arrive within ``header_timeout`` (slowloris guard).

Two ways to serve a request, never both at once (``_current`` is the one in flight):

- the fast path: a bodiless keep-alive GET that the data plane can send at once on a pooled
  upstream connection is started straight from ``data_received`` and finished from the upstream
  protocol's ``data_received`` (``DataPlane.start_fast``): no task, no future awaited, no extra
  loop iteration;
- the connection's task (``_serve``) for everything else, and for a fast request that turns out
  to need waiting (a streamed or chunked response, an upstream error to retry, a client that
  left): :meth:`DownstreamProtocol.hand_over` puts it back at the head of the queue with its
  exchange, and the task carries on from where the callbacks stopped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools
import structlog

from marchproxy_common.net.proxied import client_address
from marchproxy_common.tasks import spawn

from .errors import ClientGone
from .flow import BodyChannel, WriteFlow, loop_clock
from .framing import (
    ForwardInfo,
    FramingError,
    RequestHead,
    absolute_form,
    error_response,
    framing_of,
)

if TYPE_CHECKING:
    from marchproxy_alb.proxy import DataPlane, Exchange
    from marchproxy_alb.routing import Target

log = structlog.get_logger("marchproxy.alb.downstream")

DOWNSTREAM_WRITE_HIGH_WATER = 256 * 1024
LINGER_TIMEOUT = 2.0  # nginx lingering_timeout-like: read and drop input after an early answer
LINGER_MAX_BYTES = 1 << 20
#: len() of host, expect, x-request-id, content-length, transfer-encoding
_NOTED_NAME_LENGTHS = frozenset({4, 6, 12, 14, 17})
_conn_ids = itertools.count(1)


def _noop() -> None:
    pass


#: the body of every request without one (no Content-Length, no chunked): already complete,
#: never fed, never paused, so one instance serves them all
EMPTY_BODY = BodyChannel(_noop, _noop)
EMPTY_BODY.feed_eof()


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class PendingRequest:
    __slots__ = (
        "body",
        "error",
        "exchange",
        "first_target",
        "head",
        "holds_pause",
        "slow",
        "upgrade_rest",
    )

    def __init__(
        self,
        head: RequestHead | None,
        body: BodyChannel | None,
        error: tuple[int, str, str] | None = None,
    ) -> None:
        self.head = head
        self.body = body
        self.error = error
        self.upgrade_rest: bytes | None = None
        self.holds_pause = False  # pipelined: reading was paused when it arrived
        self.slow = False  # the fast path declined it: the task serves it
        self.exchange: Exchange | None = None  # started on the fast path, handed over
        self.first_target: Target | None = None  # picked by the fast path (no idle connection)


class DownstreamProtocol(asyncio.Protocol):
    def __init__(
        self, plane: DataPlane, *, scheme: str = "http", client: tuple[str, int] | None = None
    ) -> None:
        self.plane = plane
        self.loop = asyncio.get_running_loop()  # protocols are made by the loop, inside it
        self.now = loop_clock(self.loop)  # loop.time(), cheaper
        self._client = client
        self.scheme = scheme
        self.conn_id = next(_conn_ids)
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.flow = WriteFlow()
        self.closed = False
        self._parser = httptools.HttpRequestParser(self)
        self._pending: deque[PendingRequest] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # lazy timer: arming only stores a deadline; one TimerHandle per connection fires at most
        # every header_timeout and re-checks, so a busy keep-alive connection schedules no timer
        # per request
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._pause_count = 0
        self._dead = False  # parser failed or upgraded: no more HTTP parsing
        self._in_message = False
        # head bytes: httptools keeps a partial header name/value to itself (no callback until
        # it completes), so whole reads fed while a head is incomplete are counted here
        self._in_head = False
        self._head_timer_due = False  # on_message_begin: arm the header timer after the read
        self._head_fed = 0
        self._messages = 0  # on_message_begin calls, to tell whether a read started a head
        self._url = b""
        #: the read being parsed when it began at a message boundary (so the first request
        #: line in it starts at offset 0), until that request's head is complete: its HTTP
        #: version is read there (on_headers_complete)
        self._read: bytes | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        #: headers whose name has the length of Host, Expect, X-Request-ID, Content-Length or
        #: Transfer-Encoding: the only ones on_headers_complete has to look at
        self._noted: list[tuple[bytes, bytes]] = []
        self._maybe_framed = False  # a noted name has the length of CL or TE
        self._header_bytes = 0
        self._current: PendingRequest | None = None
        self._last_fed: PendingRequest | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = False  # the fast path finished a response that ends the connection
        self.requests = 0
        # after an Upgrade: raw bytes go to the tunnel sink (or wait in _early until it exists)
        self.tunnel_sink: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.on_lost: Callable[[], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self._eof = False
        self.on_write_paused: Callable[[bool], None] | None = None
        self.linger = False
        self._lingering = False
        self._lingered_bytes = 0

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        self.client_ip = (self._client or client_address(transport))[0]
        #: the fast path's forwarding facts, its request id set per request
        self.forward_info = ForwardInfo(self.client_ip, self.scheme, b"")
        plane = self.plane
        if not plane.accepting or plane.active_connections >= plane.limits.max_connections:
            plane.refused("max_connections")
            transport.write(
                error_response(503, "overloaded", "too many connections", keep_alive=False)
            )
            transport.close()
            self.closed = True
            return
        transport.set_write_buffer_limits(high=DOWNSTREAM_WRITE_HIGH_WATER)
        plane.conn_opened(self)
        self._arm_timer(plane.limits.header_timeout)
        self._task = spawn(self._serve(), name=f"alb conn {self.conn_id} {self.client_ip}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self._task is None:
            return
        self.closed = True
        self.flow.close()
        self._cancel_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gone = ClientGone("client connection lost")
        for p in self._pending:
            if p.body is not None:
                p.body.fail(gone)
        if self._current is not None and self._current.body is not None:
            self._current.body.fail(gone)
        self._wake()
        if self.on_lost is not None:
            self.on_lost()
        self.plane.conn_closed(self)

    def pause_writing(self) -> None:
        self.flow.pause()
        if self.on_write_paused is not None:
            self.on_write_paused(True)

    def resume_writing(self) -> None:
        self.flow.resume()
        if self.on_write_paused is not None:
            self.on_write_paused(False)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES:
                self.abort()
            return
        if self.tunnel_sink is not None:
            self.tunnel_sink(data)
            return
        if self._dead:
            if self._pending and self._pending[-1].upgrade_rest is not None:
                self._early.append(data)  # reading is already paused; at most one read
            return
        in_head, in_message, begun = self._in_head, self._in_message, self._messages
        self._read = None if in_message else data
        try:
            self._parser.feed_data(data)
            if self._in_head:
                if self._head_timer_due:
                    self._head_timer_due = False
                    self._arm_timer(self.plane.limits.header_timeout)
                self._count_head(data, in_head, in_message, begun)
        except httptools.HttpParserUpgrade as exc:
            self._dead = True
            last = self._pending[-1] if self._pending else None
            if last is not None and last.head is not None and last.head.upgrade:
                last.upgrade_rest = data[int(exc.args[0]) :]
                if last.body is not None and last.body is not EMPTY_BODY:
                    last.body.feed_eof()
                self.pause_reading()
            else:
                self._parse_failed(_Refused(400, "bad_request", "unexpected upgrade"))
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            self._parse_failed(
                ctx
                if isinstance(ctx, _Refused)
                else _Refused(400, "bad_request", f"malformed request: {ctx or exc}")
            )
        except httptools.HttpParserError as exc:
            self._parse_failed(_Refused(400, "bad_request", f"malformed request: {exc}"))
        finally:
            self._read = None
        if self._pending and self._current is None:
            self._dispatch()

    def _count_head(self, data: bytes, in_head: bool, in_message: bool, begun: int) -> None:
        """After a read that ended inside a request head: add the read to the head's size when
        all of it belongs to this head, and refuse the head once it is too large."""
        began = self._messages - begun
        if (in_head and began == 0) or (not in_message and began == 1):
            # the read continued this head, or started it at a message boundary (a read that
            # also held the end of an earlier message is left to on_url/on_header and the
            # next read: the count is at most one read short, never too high)
            self._head_fed += len(data)
            lim = self.plane.limits
            if self._head_fed > lim.max_request_line + lim.max_header_bytes:
                self._parse_failed(_Refused(431, "headers_too_large", "request head too large"))

    def _parse_failed(self, err: _Refused) -> None:
        self._dead = True
        if err.status in (414, 431):
            self.linger = True  # the client may still be sending the head: let it see the answer
        self.plane.refused(err.code if err.status != 400 else "malformed")
        last = self._last_fed  # the request whose body was being parsed (current or queued)
        if last is not None and last.body is not None and not last.body.complete:
            last.body.fail(ClientGone("malformed request body"))
        self._pending.append(PendingRequest(None, None, (err.status, err.code, str(err))))
        self._wake()

    # ------------------------------------------------------------------ flow control

    def pause_reading(self) -> None:
        self._pause_count += 1
        if self._pause_count == 1 and self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._pause_count == 0:
            return
        self._pause_count -= 1
        if self._pause_count == 0 and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone("client connection lost")
        if self.flow.paused:
            try:
                await self.flow.drain()
            except ConnectionResetError:
                raise ClientGone("client connection lost") from None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close_if_idle(self) -> None:
        """Draining: close now when no request is in flight or partly received."""
        if self._current is None and not self._pending and not self._in_message:
            self.close()

    def close_lingering(self) -> None:
        """Half-close our side, drop what the client still sends, close when it is done."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self._lingering = True
        self._cancel_timer()
        if self._timer is not None:
            self._timer.cancel()
        if t.can_write_eof():
            t.write_eof()
        if self._pause_count:
            self._pause_count = 0
            t.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER_TIMEOUT, self.abort)
        self._timer_at = float("inf")

    def eof_received(self) -> bool | None:
        """The client half-closed. A request may still be in flight (``nc``-style clients send
        ``Connection: close`` or HTTP/1.0, then shut down their write side): keep our side open
        until its response is out. After a keep-alive request it means the client left."""
        self._eof = True
        if self.tunnel_sink is not None:
            if self.on_eof is not None:
                self.on_eof()
            return True
        cur = self._current
        if self._in_message:
            # truncated request: its body (if any) can never complete
            last = self._pending[-1] if self._pending else cur
            if last is not None and last.body is not None and not last.body.complete:
                last.body.fail(ClientGone("client closed mid-request"))
            if not self._pending and cur is None:
                return None
        if (
            cur is not None
            and cur.head is not None
            and cur.head.keep_alive
            and self.on_lost is not None
        ):
            # a keep-alive client that closes its side has gone (real clients never half-close
            # a keep-alive connection; nginx and Envoy read it the same way): stop the exchange
            self.on_lost()
        if cur is not None or self._pending:
            self._wake()
            return True
        return None

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def take_early_tunnel_bytes(self) -> bytes:
        data = b"".join(self._early)
        self._early.clear()
        return data

    # ------------------------------------------------------------------ timers

    def _arm_timer(self, delay: float) -> None:
        now = self.now()
        self._deadline = now + delay
        if self._timer is None or self._timer_at > self._deadline:
            self._schedule(self.loop, now)

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # never further out than header_timeout, so a later, shorter deadline is still caught
        self._timer_at = min(self._deadline, now + self.plane.limits.header_timeout)
        self._timer = loop.call_at(self._timer_at, self._on_timer)

    def _cancel_timer(self) -> None:
        self._deadline = 0.0

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self._deadline == 0.0:
            return
        loop = self.loop
        now = loop.time()
        if now < self._deadline:
            self._schedule(loop, now)
            return
        self._deadline = 0.0
        self._on_timeout()

    def _on_timeout(self) -> None:
        if self._in_message:
            self.plane.refused("header_timeout")
            self.write(error_response(408, "request_timeout", "request head not received in time"))
        self.close()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._head_fed = 0
        self._messages += 1
        self._url = b""
        self._headers = []
        self._noted = []
        self._maybe_framed = False
        self._header_bytes = 0
        # the keep-alive wait is over; the head itself must now arrive in time (armed once
        # the read returns, and only if the head is still incomplete then: most heads arrive
        # whole, and on_headers_complete would cancel the timer at once)
        self._head_timer_due = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.plane.limits.max_request_line:
            raise _Refused(414, "uri_too_long", "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        n = len(name)
        if n in _NOTED_NAME_LENGTHS:  # maybe one the proxy looks at: sorted out once complete
            self._noted.append((name, value))
            if n >= 14:
                self._maybe_framed = True  # maybe Content-Length or Transfer-Encoding
        self._header_bytes += n + len(value) + 4
        lim = self.plane.limits
        if self._header_bytes > lim.max_header_bytes or len(self._headers) > lim.max_headers:
            raise _Refused(431, "headers_too_large", "request headers too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_timer_due = False
        p = self._parser
        noted = self._noted
        chunked, length = False, None
        if self._maybe_framed:
            try:
                chunked, length = framing_of(noted)
            except FramingError as exc:
                raise _Refused(exc.status, "bad_framing", str(exc)) from None
        method = p.get_method()
        # the HTTP version: httptools formats it with str.format (~2.3k instructions). When
        # this request line began the read (at offset 0: the read began between messages and
        # this is its first head) and " HTTP/1.1" CRLF follows the method, SP and target,
        # it is 1.1 (the target holds no SP, CR or LF, so nothing else matches there). Read
        # before an absolute-form target is cut to its path.
        data = self._read
        self._read = None  # a later head in the same read starts elsewhere
        if data is not None and data.startswith(b" HTTP/1.1\r\n", len(method) + 1 + len(self._url)):
            version = "1.1"
        else:
            version = p.get_http_version()
        absolute = None if self._url[:1] == b"/" else absolute_form(self._url)
        if absolute is not None:
            # RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host
            authority, self._url = absolute
            self._headers = [(k, v) for k, v in self._headers if k.lower() != b"host"]
            self._headers.append((b"Host", authority))
            noted = [(k, v) for k, v in noted if k.lower() != b"host"]
            noted.append((b"Host", authority))
        hosts = 0
        host = expect = rid = None
        for k, v in noted:  # the few headers the proxy looks at
            n = len(k)
            if n == 4 and k.lower() == b"host":
                hosts += 1
                host = v
            elif n == 12 and k.lower() == b"x-request-id":
                rid = v
            elif n == 6 and k.lower() == b"expect":
                expect = v
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            # RFC 9112 §3.2: exactly one Host in HTTP/1.1 requests, else 400
            raise _Refused(400, "bad_host", "HTTP/1.1 requests need exactly one Host header")
        head = RequestHead(
            method.decode("ascii"),
            self._url,
            version,
            self._headers,
            p.should_keep_alive(),
            p.should_upgrade(),
            chunked,
            length,
            host,
            expect,
            rid,
        )
        body = (
            BodyChannel(self.pause_reading, self.resume_reading)
            if chunked or length
            else EMPTY_BODY  # nothing will be fed: share one finished channel
        )
        req = PendingRequest(head, body)
        self._deadline = 0.0  # (_cancel_timer, inlined: this runs for every request)
        if self._pending or self._current is not None:
            # pipelined: hold further input until the earlier responses are out
            self.pause_reading()
            req.holds_pause = True
        self._pending.append(req)
        self._last_fed = req
        # data_received dispatches it once the parser returns (fast path or task)

    def on_body(self, body: bytes) -> None:
        self._last_fed.body.feed(body)  # type: ignore[union-attr]  # set in on_headers_complete

    def on_message_complete(self) -> None:
        self._in_message = False
        body = self._last_fed.body  # type: ignore[union-attr]
        if body is not EMPTY_BODY:
            body.feed_eof()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ serving

    def _dispatch(self) -> None:
        """Nothing in flight and a request queued: start it on the fast path when it qualifies,
        else wake the task."""
        req = self._pending[0]
        head = req.head
        if (
            req.body is EMPTY_BODY
            and not req.slow
            and req.exchange is None
            and head is not None
            and head.method == "GET"
            and head.keep_alive
            and not head.upgrade
            and not self._eof
            and not self.closed
            and self._task is not None
            and self.plane.start_fast(req, self)
        ):
            self._pending.popleft()
            self._current = req
            self.requests += 1
            if req.holds_pause:
                req.holds_pause = False
                self.resume_reading()
            return
        self._wake()

    def fast_done(self, keep: bool) -> None:
        """The fast path wrote the whole response of ``_current``."""
        self._current = None
        if not keep or self.closed or not self.plane.accepting or (self._eof and not self._pending):
            self._stop = True  # the task closes the connection (as after any last response)
            self._wake()
        elif self._pending:
            self._dispatch()
        elif not self._in_message:
            self._arm_timer(self.plane.limits.keepalive_timeout)

    def hand_over(self, req: PendingRequest) -> None:
        """The fast path cannot finish ``req`` without waiting: the task takes it over."""
        if self._current is req:
            self._current = None
            self.requests -= 1  # counted again when the task takes it
        self._pending.appendleft(req)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def _serve(self) -> None:
        plane = self.plane
        try:
            while True:
                # wait for the next request (or the end); a fast-path request in flight
                # (_current) finishes or is handed over before the task touches the queue
                while not self._pending or self._current is not None:
                    if self._stop or ((self.closed or self._eof) and self._current is None):
                        return
                    self._waiter = self.loop.create_future()
                    await self._waiter
                req = self._pending.popleft()
                if req.error is not None:
                    status, code, message = req.error
                    self.write(error_response(status, code, message))
                    plane.count_error_response(status)
                    return
                assert req.head is not None
                self._current = req
                if req.holds_pause:
                    req.holds_pause = False
                    self.resume_reading()
                self.requests += 1
                try:
                    keep = await plane.handle(req, self)
                finally:
                    self._current = None
                    if req.body is not None:
                        req.body.release()
                if not keep or self.closed or not plane.accepting:
                    return
                if self._eof and not self._pending:
                    return
                if not self._pending and not self._in_message:
                    self._arm_timer(plane.limits.keepalive_timeout)
        except ClientGone:
            pass
        except Exception:
            plane.internal_error()
            log.exception("alb_connection_failed", conn=self.conn_id)
        finally:
            if self.linger and not self.closed:
                self.close_lingering()
            else:
                self._cancel_timer()
                self.close()
