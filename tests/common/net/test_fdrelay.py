"""The fd relay engine between real sockets: byte-exact bulk both ways, flow control,
half-close, first bytes, idle timeout, reset, connect failures (stdlib loop and uvloop)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from marchproxy_common.net.accept import Acceptor
from marchproxy_common.net.fdrelay import BULK_CHUNK, CHUNK, FdRelay, FdRelayEngine
from marchproxy_common.tasks import spawn
from tests.common.net.test_relay import (
    BLOCKS,
    Handler,
    recv_all,
    run,
    send_bulk,
    upstream_server,
)


@dataclass
class Front:
    """As the NLB does it: accept the raw socket (``net.accept``), connect through the engine,
    then both sockets to the engine with the first bytes in front (what the client sent
    meanwhile waits in the kernel)."""

    engine: FdRelayEngine
    upstream_port: int
    first: bytes = b""
    idle_timeout: float | None = None
    relays: list[FdRelay] = field(default_factory=list)
    closed: list[FdRelay] = field(default_factory=list)
    port: int = 0
    acceptor: Acceptor | None = None

    async def start(self) -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.acceptor = Acceptor([sock], self._accepted)
        self.acceptor.start()

    async def stop(self) -> None:
        assert self.acceptor is not None
        self.acceptor.close()
        self.engine.close()

    def _accepted(self, client: socket.socket, _peer: Any) -> None:
        spawn(self._connect(client), name="test-fdrelay-connect")

    async def _connect(self, client: socket.socket) -> None:
        try:
            upstream = await self.engine.connect("127.0.0.1", self.upstream_port, connect_timeout=5)
        except BaseException:
            client.close()
            raise
        relay = self.engine.join(
            client,
            upstream,
            first=self.first,
            idle_timeout=self.idle_timeout,
            on_close=self.closed.append,
        )
        self.relays.append(relay)


async def with_front(
    handler: Handler,
    body: Callable[[Front], Awaitable[None]],
    *,
    mode: str = "own-buffer-after-1MiB",
    **options: Any,
) -> None:
    async with upstream_server(handler) as port:
        front = Front(FdRelayEngine(**MODES[mode]), port, **options)
        await front.start()
        try:
            await body(front)
        finally:
            await front.stop()


async def wait_for(cond: Callable[[], bool], limit: float = 20.0) -> None:
    async with asyncio.timeout(limit):
        while not cond():
            await asyncio.sleep(0.005)


#: how a direction's bytes move: the engine's defaults are the second
MODES: dict[str, dict[str, int | None]] = {
    "shared-buffer": {"bulk_after": None},
    "own-buffer-after-1MiB": {},
    "splice": {"splice_after": 0},
    "splice-after-3MiB": {"splice_after": 3 << 20},
}
MODE = pytest.mark.parametrize("mode", list(MODES))


@MODE
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_bulk_both_ways_at_once_is_byte_exact(loop_kind: str, mode: str) -> None:
    """48 MiB each way at the same time, with the header in front and EOF passed on."""
    size = 48 << 20
    header = b"HEADER\r\n"

    async def echo_with_hash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(len(header)) == header
        h = hashlib.sha256()
        while chunk := await reader.read(1 << 20):
            h.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write(h.hexdigest().encode())
        writer.write_eof()

    async def receive(reader: asyncio.StreamReader) -> bytes:
        data = bytearray()
        while chunk := await reader.read(1 << 20):
            data += chunk
        return bytes(data)

    async def body(front: Front) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        sent, got = await asyncio.gather(send_bulk(writer, size), receive(reader))
        writer.close()
        assert len(got) == size + 64  # the echo, then the upstream's hash of what it got
        assert got[size:].decode() == sent  # client -> upstream exact
        assert hashlib.sha256(got[:size]).hexdigest() == sent  # and back
        await wait_for(lambda: len(front.closed) == 1)
        relay = front.closed[0]
        assert relay.stats().reason == "eof"
        assert (relay.bytes_up, relay.bytes_down) == (size, size + 64)

    async def main() -> None:
        await with_front(echo_with_hash, body, first=header, mode=mode)

    run(loop_kind, main, timeout=120)


@MODE
async def test_what_goes_through_is_exact(mode: str) -> None:
    size = 12 << 20

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got, n = await recv_all(reader)
        writer.write(f"{got} {n}".encode())
        writer.write_eof()

    async def body(front: Front) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        sent = await send_bulk(writer, size)
        assert await reader.read() == f"{sent} {size}".encode()
        writer.close()

    await with_front(sink, body, mode=mode)


@MODE
async def test_slow_reader_holds_the_sender_not_the_relay(mode: str) -> None:
    """The client reads nothing: the relay keeps at most one read, and the upstream's writer
    is the one that fills up (the kernel buffers between are finite)."""
    stuck = asyncio.Event()
    total = 64 << 20

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        while sent < total:
            writer.write(BLOCKS[0])
            sent += len(BLOCKS[0])
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                stuck.set()  # the relay stopped reading from us
                await writer.drain()
        writer.write_eof()

    async def body(front: Front) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await asyncio.wait_for(stuck.wait(), 20)
        relay = front.relays[0]
        out = relay.client.out
        own = relay.upstream.buf is not None
        # one read waiting (or a pipe), no more
        assert out is not None and len(out) <= (BULK_CHUNK if own else CHUNK)
        assert relay.upstream.in_pipe <= CHUNK
        assert relay.bytes_down < total // 2
        _, n = await recv_all(reader)  # now read it all: everything arrives
        assert n == total
        assert (relay.upstream.pipe is not None) == mode.startswith("splice")
        # splicing after 3 MiB: the direction had its own buffer from 1 MiB
        assert own == (mode in ("own-buffer-after-1MiB", "splice-after-3MiB"))
        writer.close()

    await with_front(flood, body, mode=mode)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_a_bulk_buffer_costs_only_the_pages_its_reads_reach() -> None:
    """40 connections move 1 MiB each way (so both directions are bulk ones from then on),
    then 100 bytes: their 80 own 1 MiB buffers cost the pages those bytes touched, not 80 MiB."""
    n, size = 40, 1 << 20
    block = BLOCKS[0][:size]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(size):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def body(front: Front) -> None:
        conns = []
        try:
            for _ in range(n):
                reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
                conns.append((reader, writer))
                writer.write(block)
                assert await reader.readexactly(size) == block
            before = rss_kib()
            for reader, writer in conns:
                writer.write(b"x" * 100)
                assert await reader.readexactly(100) == b"x" * 100
            grown = rss_kib() - before
            own = [s.buf for r in front.relays for s in (r.client, r.upstream)]
            assert len(own) == 2 * n and all(b is not None and len(b) == BULK_CHUNK for b in own)
            assert grown < 2 * n * (BULK_CHUNK >> 10) // 8, f"{grown} KiB"
        finally:
            for _, writer in conns:
                writer.close()

    await with_front(echo, body)


@MODE
@pytest.mark.parametrize("first", ["client", "server"])
async def test_half_close_keeps_the_other_direction(first: str, mode: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if first == "server":
            writer.write(b"server done")
            writer.write_eof()
            data = await reader.read()
            assert data == b"client still talking"
        else:
            data = await reader.read()  # the client's EOF came through
            writer.write(b"got " + data)
            writer.write_eof()

    async def body(front: Front) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        if first == "server":
            assert await reader.read() == b"server done"
            writer.write(b"client still talking")
            writer.write_eof()
        else:
            writer.write(b"request")
            writer.write_eof()
            assert await reader.read() == b"got request"
        await wait_for(lambda: len(front.closed) == 1)
        assert front.closed[0].stats().reason == "eof"
        writer.close()

    await with_front(handler, body, mode=mode)


async def test_client_eof_before_the_join_follows_the_first_bytes() -> None:
    loop = asyncio.get_running_loop()
    engine = FdRelayEngine(loop)
    got: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read())  # ends at the EOF the engine passes on
        writer.write(b"bye")
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    a, b = socket.socketpair()
    try:
        b.shutdown(socket.SHUT_WR)  # the client already said EOF
        up = await engine.connect(
            "127.0.0.1", server.sockets[0].getsockname()[1], connect_timeout=5
        )
        a.setblocking(False)
        relay = engine.join(a, up, first=b"sniffed bytes", client_eof=True)
        b.settimeout(10)
        assert await asyncio.to_thread(b.recv, 100) == b"bye"
        await wait_for(lambda: relay.closed)
        assert got == [b"sniffed bytes"]
    finally:
        b.close()
        engine.close()
        server.close()
        await server.wait_closed()


async def test_idle_timeout_closes_quiet_pairs_only() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)

    async def body(front: Front) -> None:
        quiet_r, quiet_w = await asyncio.open_connection("127.0.0.1", front.port)
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", front.port)
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while loop.time() < end:  # the busy one talks every 50 ms
            busy_w.write(b"x")
            assert await busy_r.readexactly(1) == b"x"
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(quiet_r.read(), 5) == b""  # closed for idleness
        busy_w.write(b"y")
        assert await busy_r.readexactly(1) == b"y"
        assert [r.stats().reason for r in front.closed] == ["idle"]
        quiet_w.close()
        busy_w.close()

    await with_front(echo, body, idle_timeout=0.4)


async def test_abort_resets_both_sides() -> None:
    reset = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        except ConnectionResetError:
            reset.set()

    async def body(front: Front) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        writer.write(b"hello")
        await wait_for(lambda: bool(front.relays) and front.relays[0].bytes_up == 5)
        front.relays[0].abort("drain deadline")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        await asyncio.wait_for(reset.wait(), 5)
        assert [r.stats().reason for r in front.closed] == ["drain deadline"]
        writer.close()

    await with_front(hold, body)


async def test_connect_failures_are_oserrors() -> None:
    engine = FdRelayEngine()
    try:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            await engine.connect("127.0.0.1", port, connect_timeout=5)
        with pytest.raises(OSError):
            await engine.connect("no-such-host.invalid", port, connect_timeout=5)
        assert not engine._connecting
    finally:
        engine.close()


async def test_connect_times_out_when_nobody_answers() -> None:
    """A listener whose accept queue is full drops the SYN: the connect hangs until its
    deadline (kept by the engine's sweep, not a timer per connect)."""
    engine = FdRelayEngine()
    full = socket.create_server(("127.0.0.1", 0), backlog=0)
    waiting: list[socket.socket] = []
    try:
        port = full.getsockname()[1]
        for _ in range(4):  # fill the accept queue; nobody accepts
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            waiting.append(s)
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await engine.connect("127.0.0.1", port, connect_timeout=0.3)
        assert 0.25 <= loop.time() - started < 2.0
        assert not engine._connecting
        # a cancelled caller is cancelled, not timed out; the socket goes at the deadline
        task = asyncio.ensure_future(engine.connect("127.0.0.1", port, connect_timeout=0.5))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: not engine._connecting, 5)
        # the callback form: no task, the same outcomes
        outcomes: list[tuple[bool, type[BaseException] | None]] = []
        engine.start_connect(
            "127.0.0.1",
            port,
            connect_timeout=0.2,
            callback=lambda s, e: outcomes.append((s is not None, type(e) if e else None)),
        )
        assert outcomes == []  # never before start_connect returns
        await wait_for(lambda: bool(outcomes), 5)
        assert outcomes == [(False, TimeoutError)]
    finally:
        for s in waiting:
            s.close()
        full.close()
        engine.close()


async def test_a_watched_client_joins_with_what_came_while_nobody_listened() -> None:
    """Sniffing reads on the engine's epoll (watch); after the decision (unwatch) the client
    goes on sending and closes before the join: the relay still gets all of it, EOF included
    (edge-triggered events seen while unwatched are not seen again)."""
    engine = FdRelayEngine()
    got: list[bytes] = []
    sniffed = bytearray()
    heard = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read())
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    a, b = socket.socketpair()
    try:
        a.setblocking(False)

        def readable() -> None:
            while True:
                try:
                    chunk = a.recv(100)
                except BlockingIOError:
                    return
                sniffed.extend(chunk)
                heard.set()

        engine.watch(a, readable)
        b.sendall(b"first ")
        await asyncio.wait_for(heard.wait(), 5)
        engine.unwatch(a)
        b.sendall(b"then more")
        b.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)  # the events for these come and go unheard
        assert bytes(sniffed) == b"first "
        up = await engine.connect(
            "127.0.0.1", server.sockets[0].getsockname()[1], connect_timeout=5
        )
        relay = engine.join(a, up, first=bytes(sniffed))
        await wait_for(lambda: bool(got))
        assert got == [b"first then more"]
        await wait_for(lambda: relay.closed)
    finally:
        b.close()
        engine.close()
        server.close()
        await server.wait_closed()
