"""A small asyncio RTMP client (publish or play) on the sans-IO machines.

Used by the push/pull relays, the tests and the benchmark load generator.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from marchproxy_common.wire.rtmp import amf0
from marchproxy_common.wire.rtmp.chunks import (
    MSG_ACK,
    MSG_COMMAND_AMF0,
    MSG_COMMAND_AMF3,
    MSG_USER_CONTROL,
    MSG_WINDOW_ACK_SIZE,
    ChunkStreamDecoder,
    ChunkWriter,
    MessageReceived,
)
from marchproxy_common.wire.rtmp.errors import RtmpProtocolError
from marchproxy_common.wire.rtmp.handshake import ClientHandshake
from marchproxy_common.wire.rtmp.messages import (
    Command,
    UserControl,
    UserControlEvent,
    encode_command,
    encode_u32,
    encode_user_control,
    parse_command,
    parse_user_control,
)

CSID_CONTROL = 2
CSID_COMMAND = 3
CLIENT_CHUNK_SIZE = 4096
CLIENT_WINDOW_ACK = 2_500_000
DEFAULT_RTMP_PORT = 1935

MessageHandler = Callable[[MessageReceived], None]


class RtmpClientError(Exception):
    """The server refused (``_error``/error onStatus) or the connection failed."""


@dataclass(frozen=True, slots=True)
class RtmpUrl:
    """``rtmp://host[:port]/app[/stream][?query]``, split as nginx-rtmp does: the first path
    segment is the application, the rest the stream name. The query belongs to the stream:
    it is sent with the publish/play name (``name?key=...``), where servers read stream keys."""

    host: str
    port: int
    app: str
    stream: str  # may be empty (push/pull URLs name only the application)
    query: str = ""  # without the "?"

    @property
    def tc_url(self) -> str:
        return f"rtmp://{self.host}:{self.port}/{self.app}"

    def stream_name(self, default: str) -> str:
        """What to publish/play: the URL's stream (else ``default``) plus the URL's query."""
        name = self.stream or default
        return f"{name}?{self.query}" if self.query else name


def parse_rtmp_url(url: str) -> RtmpUrl:
    parts = urlsplit(url)
    if parts.scheme != "rtmp" or not parts.hostname:
        raise ValueError(f"not an rtmp:// URL: {url!r}")
    segs = [p for p in parts.path.split("/") if p]
    if not segs:
        raise ValueError(f"RTMP URL needs an application: {url!r}")
    return RtmpUrl(
        parts.hostname, parts.port or DEFAULT_RTMP_PORT, segs[0], "/".join(segs[1:]), parts.query
    )


class RtmpClientProtocol(asyncio.Protocol):
    def __init__(self, on_media: MessageHandler | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.on_media = on_media
        self.transport: asyncio.Transport | None = None
        self._hs = ClientHandshake()
        self.decoder = ChunkStreamDecoder()
        self.writer = ChunkWriter()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._tid = 1.0
        self._pending: dict[float, asyncio.Future[Command]] = {}
        self.statuses: list[dict[str, Any]] = []
        self._status_waiters: list[tuple[frozenset[str], asyncio.Future[dict[str, Any]]]] = []
        self.bytes_in = 0

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't assert
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self._hs.initial())

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            if not self._hs.done:
                out = self._hs.feed(data)
                if not self._hs.done:
                    return
                self._write(out)
                if not self.ready.done():
                    self.ready.set_result(None)
                data = self._hs.leftover
                if not data:
                    return
            for ev in self.decoder.feed(data):
                self._on_message(ev)
            ack = self.decoder.ack_due()
            if ack is not None:
                self.send(CSID_CONTROL, MSG_ACK, 0, encode_u32(ack))
        except (RtmpProtocolError, RtmpClientError) as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        err = RtmpClientError(f"connection lost: {exc}" if exc else "connection closed")
        if not self.ready.done():
            self.ready.set_exception(err)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        for _, fut2 in self._status_waiters:
            if not fut2.done():
                fut2.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- messages ------------------------------------------------------------------------------

    def _on_message(self, ev: MessageReceived) -> None:
        t = ev.type_id
        if t in (MSG_COMMAND_AMF0, MSG_COMMAND_AMF3):
            self._on_command(parse_command(t, ev.payload))
        elif t == MSG_USER_CONTROL:
            uc = parse_user_control(ev.payload)
            if uc.event == UserControl.PING_REQUEST:
                reply = UserControlEvent(UserControl.PING_RESPONSE, 0, uc.value)
                self.send(CSID_CONTROL, MSG_USER_CONTROL, 0, encode_user_control(reply))
        elif t >= 8 and self.on_media is not None:
            self.on_media(ev)

    def _on_command(self, cmd: Command) -> None:
        if cmd.name in ("_result", "_error"):
            fut = self._pending.pop(cmd.transaction_id, None)
            if fut is not None and not fut.done():
                if cmd.name == "_error":
                    fut.set_exception(RtmpClientError(f"_error: {cmd.args!r}"))
                else:
                    fut.set_result(cmd)
        elif cmd.name == "onStatus":
            info = cmd.args[0] if cmd.args and isinstance(cmd.args[0], dict) else {}
            self.statuses.append(info)
            code = str(info.get("code", ""))
            for codes, fut2 in list(self._status_waiters):
                if fut2.done():
                    continue
                if code in codes:
                    fut2.set_result(info)
                elif info.get("level") == "error":
                    fut2.set_exception(RtmpClientError(f"{code}: {info.get('description')}"))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(
        self, csid: int, type_id: int, stream_id: int, payload: bytes, timestamp: int = 0
    ) -> None:
        self._write(self.writer.write(csid, type_id, stream_id, timestamp, payload))

    def _fail(self, exc: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self.ready.done():
            self.ready.set_exception(RtmpClientError(str(exc)))

    # -- requests ------------------------------------------------------------------------------

    def command(
        self,
        name: str,
        obj: amf0.AmfValue,
        *args: amf0.AmfValue,
        stream_id: int = 0,
        amf3: bool = False,
    ) -> asyncio.Future[Command]:
        """Send a command and return the future of its ``_result``. ``amf3`` sends it as a
        type 17 message (format byte 0, then AMF0, the command object as an AMF3 value)."""
        tid = self._tid
        self._tid += 1
        fut: asyncio.Future[Command] = self._loop.create_future()
        self._pending[tid] = fut
        if amf3:
            payload = b"\x00" + amf0.encode(name, tid) + b"\x11" + amf0.encode_amf3(obj)
            payload += amf0.encode(*args)
            self.send(CSID_COMMAND, MSG_COMMAND_AMF3, stream_id, payload)
        else:
            payload = encode_command(name, tid, obj, *args)
            self.send(CSID_COMMAND, MSG_COMMAND_AMF0, stream_id, payload)
        return fut

    def notify(
        self, name: str, obj: amf0.AmfValue, *args: amf0.AmfValue, stream_id: int = 0
    ) -> None:
        self.send(CSID_COMMAND, MSG_COMMAND_AMF0, stream_id, encode_command(name, 0, obj, *args))

    def expect_status(self, *codes: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._status_waiters.append((frozenset(codes), fut))
        return fut

    async def connect(self, app: str, tc_url: str) -> Command:
        await self.ready
        self.send(CSID_CONTROL, MSG_WINDOW_ACK_SIZE, 0, encode_u32(CLIENT_WINDOW_ACK))
        self._write(self.writer.set_chunk_size(CLIENT_CHUNK_SIZE))
        obj: dict[str, amf0.AmfValue] = {
            "app": app,
            "type": "nonprivate",
            "flashVer": "FMLE/3.0 (compatible; marchproxy)",
            "tcUrl": tc_url,
            "fpad": False,
            "capabilities": 15.0,
            "audioCodecs": 4071.0,
            "videoCodecs": 252.0,
            "videoFunction": 1.0,
        }
        return await self.command("connect", obj)

    async def create_stream(self) -> int:
        res = await self.command("createStream", None)
        sid = res.args[0] if res.args else None
        if not isinstance(sid, float | int):
            raise RtmpClientError("createStream result without a stream id")
        return int(sid)

    async def publish(self, name: str) -> int:
        self.notify("releaseStream", None, name)
        self.notify("FCPublish", None, name)
        sid = await self.create_stream()
        started = self.expect_status("NetStream.Publish.Start")
        self.notify("publish", None, name, "live", stream_id=sid)
        await started
        return sid

    async def play(self, name: str) -> int:
        sid = await self.create_stream()
        started = self.expect_status("NetStream.Play.Start")
        self.notify("play", None, name, -2000.0, stream_id=sid)
        await started
        return sid

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_client(
    host: str,
    port: int,
    app: str,
    *,
    on_media: MessageHandler | None = None,
    connect_timeout: float = 10,
) -> RtmpClientProtocol:
    """Connect, handshake and send ``connect``; return the ready protocol."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout):
        _, proto = await loop.create_connection(lambda: RtmpClientProtocol(on_media), host, port)
        try:
            await proto.connect(app, f"rtmp://{host}:{port}/{app}")
        except BaseException:
            proto.close()
            raise
    return proto
