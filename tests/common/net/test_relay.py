"""Relay between real sockets: byte-exact bulk both ways, flow control, half-close, idle."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from marchproxy_common.net.proxied import client_address, wrap_proxy_protocol
from marchproxy_common.net.relay import (
    DEFAULT_HIGH_WATER,
    Relay,
    RelayStats,
    open_upstream,
)
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.proxy_protocol import build_v2
from tests.conftest import free_port

BLOCKS = [random.Random(i).randbytes((1 << 20) + i * 977) for i in range(4)]
MAX_READ = 256 * 1024  # asyncio's largest single read


def run(kind: str, coro: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60) -> None:
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(coro(), timeout))


async def send_bulk(writer: asyncio.StreamWriter, total: int, *, eof: bool = True) -> str:
    h = hashlib.sha256()
    sent = 0
    i = 0
    while sent < total:
        block = BLOCKS[i % len(BLOCKS)][: total - sent]
        writer.write(block)
        h.update(block)
        sent += len(block)
        i += 1
        await writer.drain()
    if eof:
        writer.write_eof()
    return h.hexdigest()


async def recv_all(reader: asyncio.StreamReader) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while chunk := await reader.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


@dataclass
class Proxy:
    """A minimal NLB-like front: accept, connect upstream with a PROXY v2 header, relay."""

    upstream_port: int
    idle_timeout: float | None = None
    relays: list[Relay] = field(default_factory=list)
    closed: list[RelayStats] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    def header(self) -> bytes:
        return build_v2(("192.0.2.1", 1234), ("127.0.0.1", self.upstream_port))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Front(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for r in self.relays:
            r.abort()
        await self.server.wait_closed()


class _Front(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        # uvloop starts reading right after connection_made, whatever we asked there
        self.early.append(data)
        assert self.transport is not None
        self.transport.pause_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]
        relay = Relay(idle_timeout=self.proxy.idle_timeout, on_close=self.proxy.closed.append)
        self.proxy.relays.append(relay)
        spawn(self._connect(relay, transport), name="test-relay-connect")

    async def _connect(self, relay: Relay, transport: asyncio.BaseTransport) -> None:
        try:
            await relay.connect_upstream(
                "127.0.0.1",
                self.proxy.upstream_port,
                connect_timeout=5,
                first_bytes=self.proxy.header(),
            )
        except OSError:
            transport.close()
            return
        relay.attach_downstream(transport, b"".join(self.early))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def upstream_server(handler: Handler) -> AsyncIterator[int]:
    """A server on 127.0.0.1 running ``handler`` per connection (then closing it): its port."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0, limit=1 << 20)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def with_proxy(
    handler: Handler,
    body: Callable[[Proxy], Awaitable[None]],
    *,
    idle_timeout: float | None = None,
) -> None:
    async with upstream_server(handler) as port:
        proxy = Proxy(port, idle_timeout)
        await proxy.start()
        try:
            await body(proxy)
        finally:
            await proxy.stop()


async def wait_for(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    async with asyncio.timeout(limit):
        while not cond():
            await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("loop_kind", "size"), [("asyncio", 100 * 1024 * 1024), ("uvloop", 16 * 1024 * 1024)]
)
def test_bulk_both_ways_is_byte_exact(loop_kind: str, size: int) -> None:
    results: dict[str, Any] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = build_v2(("192.0.2.1", 1234), ("127.0.0.1", writer.get_extra_info("sockname")[1]))
        results["header"] = await reader.readexactly(len(header)) == header
        recv, sent = await asyncio.gather(recv_all(reader), send_bulk(writer, size))
        results["up_recv"], results["down_sent"] = recv, sent

    async def body(proxy: Proxy) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 20)
        try:
            sent, recv = await asyncio.gather(send_bulk(writer, size), recv_all(reader))
        finally:
            writer.close()
        await wait_for(lambda: len(proxy.closed) == 1, "relay closed")
        assert results["header"] is True
        assert results["up_recv"] == (sent, size)
        assert recv == (results["down_sent"], size)
        stats = proxy.closed[0]
        assert (stats.bytes_up, stats.bytes_down, stats.reason) == (size, size, "eof")

    run(loop_kind, lambda: with_proxy(handler, body), timeout=120)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_slow_reader_keeps_relay_buffer_bounded(loop_kind: str) -> None:
    size = 48 * 1024 * 1024
    state: dict[str, Any] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(build_v2(("192.0.2.1", 1), ("127.0.0.1", 1))))
        state["sent"] = await send_bulk(writer, size)

    async def body(proxy: Proxy) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 20)
        try:
            await wait_for(lambda: bool(proxy.relays) and proxy.relays[0].upstream.peer, "paired")
            relay = proxy.relays[0]
            up = relay.upstream.transport
            assert up is not None
            # the client reads nothing: the relay must stop reading from the upstream
            await wait_for(lambda: not up.is_reading(), "upstream paused")  # type: ignore[attr-defined]
            peak = 0
            for _ in range(40):
                peak = max(peak, relay.downstream.buffered)
                await asyncio.sleep(0.01)
            assert relay.downstream.buffered > 0
            assert peak <= DEFAULT_HIGH_WATER + MAX_READ
            assert relay.bytes_down < size  # the sender is held back, not buffered by us
            got = await recv_all(reader)
        finally:
            writer.close()
        assert got == (state["sent"], size)

    run(loop_kind, lambda: with_proxy(handler, body))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_half_close_client_first(loop_kind: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(build_v2(("192.0.2.1", 1), ("127.0.0.1", 1))))
        _, n = await recv_all(reader)  # until the client's EOF
        writer.write(b"got:%d" % n)
        await writer.drain()

    async def body(proxy: Proxy) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            await send_bulk(writer, 1_000_000)  # ends with write_eof
            reply = await reader.read(-1)
        finally:
            writer.close()
        assert reply == b"got:1000000"
        await wait_for(lambda: len(proxy.closed) == 1, "relay closed")

    run(loop_kind, lambda: with_proxy(handler, body))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_half_close_server_first(loop_kind: str) -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(build_v2(("192.0.2.1", 1), ("127.0.0.1", 1))))
        writer.write(b"banner")
        writer.write_eof()
        got.append(await reader.read(-1))

    async def body(proxy: Proxy) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            assert await reader.read(-1) == b"banner"  # EOF from the server came through
            writer.write(b"still talking after your EOF")
            writer.write_eof()
            await wait_for(lambda: bool(got), "upstream got the late bytes")
        finally:
            writer.close()
        assert got == [b"still talking after your EOF"]
        await wait_for(lambda: len(proxy.closed) == 1, "relay closed")
        assert proxy.closed[0].reason == "eof"

    run(loop_kind, lambda: with_proxy(handler, body))


def test_idle_timeout_closes_quiet_pairs_only() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(build_v2(("192.0.2.1", 1), ("127.0.0.1", 1))))
        while data := await reader.read(1024):
            writer.write(data)

    async def body(proxy: Proxy) -> None:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            # busy for 3 idle periods: stays open
            for i in range(12):
                writer.write(b"%d;" % i)
                assert await reader.readuntil(b";") == b"%d;" % i
                await asyncio.sleep(0.1)
            assert proxy.closed == []
            quiet_since = loop.time()
            assert await reader.read(-1) == b""  # then quiet: the relay closes it
            assert loop.time() - quiet_since >= 0.4 - 0.05
        finally:
            writer.close()
        await wait_for(lambda: len(proxy.closed) == 1, "relay closed")
        assert proxy.closed[0].reason == "idle"

    run("asyncio", lambda: with_proxy(handler, body, idle_timeout=0.4))


def test_upstream_lost_closes_downstream() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(build_v2(("192.0.2.1", 1), ("127.0.0.1", 1))))
        writer.write(b"bye")
        await writer.drain()
        writer.transport.abort()

    async def body(proxy: Proxy) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            try:
                data = await reader.read(-1)
            except ConnectionResetError:
                data = b"bye"
            assert data == b"bye"
        finally:
            writer.close()
        await wait_for(lambda: len(proxy.closed) == 1, "relay closed")

    run("asyncio", lambda: with_proxy(handler, body))


async def test_open_upstream_failures() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionRefusedError):
        await open_upstream(
            loop, "127.0.0.1", free_port(), connect_timeout=5, protocol_factory=asyncio.Protocol
        )
    # a listener whose accept queue is full drops SYNs: the connect hangs until our timeout
    full = socket.socket()
    fillers: list[socket.socket] = []
    try:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        for _ in range(8):
            c = socket.socket()
            fillers.append(c)
            c.setblocking(False)
            try:
                c.connect(full.getsockname())
            except BlockingIOError:
                pass
        with pytest.raises(TimeoutError):
            await open_upstream(
                loop,
                "127.0.0.1",
                full.getsockname()[1],
                connect_timeout=0.3,
                protocol_factory=asyncio.Protocol,
            )
    finally:
        for c in fillers:
            c.close()
        full.close()
    with pytest.raises(OSError):
        await open_upstream(
            loop, "no-such-host.invalid", 9, connect_timeout=5, protocol_factory=asyncio.Protocol
        )


async def test_close_before_upstream_closes_downstream() -> None:
    closed: list[RelayStats] = []
    loop = asyncio.get_running_loop()
    relay = Relay(on_close=closed.append)
    server = await loop.create_server(lambda: relay.downstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"early bytes are held")
        await wait_for(lambda: relay.downstream.transport is not None, "accepted")
        relay.close("no_module")
        try:
            assert await reader.read(-1) == b""
        except ConnectionResetError:
            pass  # we closed with the client's bytes unread: the kernel sends a RST
        writer.close()
        await wait_for(lambda: bool(closed), "on_close")
        assert closed[0].reason == "no_module"
        with pytest.raises(ConnectionAbortedError):
            await relay.connect_upstream("127.0.0.1", port, connect_timeout=1)
    finally:
        server.close()
        await server.wait_closed()


class _AddressEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        host, port = client_address(transport)
        transport.write(f"{host} {port}\n".encode())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_upstream_sees_client_address_from_the_relay_header(loop_kind: str) -> None:
    """The relay's first bytes (PROXY v2) + wrap_proxy_protocol on the module side."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        module = await loop.create_server(
            wrap_proxy_protocol(_AddressEcho, "required", 5.0), "127.0.0.1", 0
        )
        proxy = Proxy(module.sockets[0].getsockname()[1])
        await proxy.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"sniffed-bytes;")
                assert await reader.readline() == b"192.0.2.1 1234\n"
                assert await reader.readuntil(b";") == b"sniffed-bytes;"
            finally:
                writer.close()
        finally:
            await proxy.stop()
            module.close()
            await module.wait_closed()

    run(loop_kind, main)


async def test_attach_after_the_client_left_closes_the_upstream() -> None:
    loop = asyncio.get_running_loop()
    upstream_closed = asyncio.Event()

    class Up(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            upstream_closed.set()

    up_server = await loop.create_server(Up, "127.0.0.1", 0)
    accepted: list[asyncio.BaseTransport] = []

    class Gone(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

    front = await loop.create_server(Gone, "127.0.0.1", 0)
    closed: list[RelayStats] = []
    try:
        _, w = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
        await wait_for(lambda: bool(accepted), "accepted")
        relay = Relay(on_close=closed.append)
        await relay.connect_upstream(
            "127.0.0.1", up_server.sockets[0].getsockname()[1], connect_timeout=5
        )
        w.close()
        accepted[0].close()  # the front saw the client go before attaching
        relay.attach_downstream(accepted[0])
        async with asyncio.timeout(10):
            await upstream_closed.wait()
        await wait_for(lambda: bool(closed), "on_close")
    finally:
        front.close()
        up_server.close()
        await front.wait_closed()
        await up_server.wait_closed()
