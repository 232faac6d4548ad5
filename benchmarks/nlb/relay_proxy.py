"""A fixed-upstream TCP proxy for benchmarking the common relay engines.

    python benchmarks/nlb/relay_proxy.py LISTEN_PORT UPSTREAM_PORT [--engine relay|fd|splice]
        [--loop asyncio|uvloop] [--proxy-header] [--bulk-after N] [--splice-after N]

engine ``relay``: marchproxy_common.net.relay.Relay (asyncio Protocols, what the NLB used
before the fd engine).
engine ``fd``: marchproxy_common.net.fdrelay (the client accepted raw by net.accept, then both
sockets on the engine's own epoll: what the NLB uses).
engine ``splice``: a prototype that moves bytes socket -> pipe -> socket with os.splice from
loop.add_reader/add_writer callbacks, so payload bytes never enter Python. Benchmark only.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import socket
from collections.abc import Callable

import uvloop

from marchproxy_common.net.accept import Acceptor
from marchproxy_common.net.fdrelay import BULK_AFTER, FdRelayEngine
from marchproxy_common.net.relay import Relay
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.proxy_protocol import build_v2

PIPE_SIZE = 1 << 20
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Front(asyncio.Protocol):
    def __init__(self, upstream_port: int, header: bool) -> None:
        self.upstream_port = upstream_port
        self.header = header
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        relay = Relay(idle_timeout=300)
        first = b""
        if self.header:
            peer = transport.get_extra_info("peername")
            first = build_v2(peer[:2], ("127.0.0.1", self.upstream_port))
        spawn(self.connect(relay, first), name="bench-connect")

    def data_received(self, data: bytes) -> None:
        self.early.append(data)
        assert self.transport is not None
        self.transport.pause_reading()

    async def connect(self, relay: Relay, first: bytes) -> None:
        assert self.transport is not None
        try:
            await relay.connect_upstream(
                "127.0.0.1", self.upstream_port, connect_timeout=5, first_bytes=first
            )
        except OSError:
            self.transport.close()
            return
        relay.attach_downstream(self.transport, b"".join(self.early))


class FdFront:
    """As the NLB does it: accept the raw socket (``net.accept``), connect through the fd relay
    engine and hand it both sockets (what the client sends meanwhile waits in the kernel)."""

    def __init__(self, engine: FdRelayEngine, upstream_port: int, header: bool) -> None:
        self.engine, self.upstream_port, self.header = engine, upstream_port, header

    def accepted(self, client: socket.socket, peer: tuple[str, int]) -> None:
        first = build_v2(peer[:2], ("127.0.0.1", self.upstream_port)) if self.header else b""

        def connected(up: socket.socket | None, _exc: BaseException | None) -> None:
            if up is None:
                client.close()
            else:
                self.engine.join(client, up, first=first)

        self.engine.start_connect(
            "127.0.0.1", self.upstream_port, connect_timeout=5, callback=connected
        )


class SpliceDirection:
    """src socket -> pipe -> dst socket, driven by readiness callbacks."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
        on_done: Callable[[], None],
    ) -> None:
        self.loop, self.src, self.dst, self.on_done = loop, src, dst, on_done
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        self.in_pipe = 0
        self.eof = False
        self.done = False
        loop.add_reader(src.fileno(), self.readable)

    def readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.w, PIPE_SIZE - self.in_pipe, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.finish()
            return
        if n == 0:
            self.eof = True
            self.loop.remove_reader(self.src.fileno())
        self.in_pipe += n
        self.flush()

    def flush(self) -> None:
        while self.in_pipe:
            try:
                m = os.splice(self.r, self.dst.fileno(), self.in_pipe, flags=SPLICE_FLAGS)
            except BlockingIOError:
                # destination full: stop reading, wait until it drains (flow control)
                self.loop.remove_reader(self.src.fileno())
                self.loop.add_writer(self.dst.fileno(), self.writable)
                return
            except OSError:
                self.finish()
                return
            self.in_pipe -= m
        if self.eof:
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.finish()

    def writable(self) -> None:
        self.loop.remove_writer(self.dst.fileno())
        self.flush()
        if not self.in_pipe and not self.eof and not self.done:
            self.loop.add_reader(self.src.fileno(), self.readable)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.loop.remove_reader(self.src.fileno())
        self.loop.remove_writer(self.dst.fileno())
        os.close(self.r)
        os.close(self.w)
        self.on_done()


async def splice_pair(client: socket.socket, upstream_port: int, header: bool) -> None:
    loop = asyncio.get_running_loop()
    up = socket.socket()
    up.setblocking(False)
    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(up, ("127.0.0.1", upstream_port))
    if header:
        hdr = build_v2(client.getpeername()[:2], ("127.0.0.1", upstream_port))
        await loop.sock_sendall(up, hdr)
    remaining = 2

    def done() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            client.close()
            up.close()

    SpliceDirection(loop, client, up, done)
    SpliceDirection(loop, up, client, done)


async def splice_server(port: int, upstream_port: int, header: bool) -> None:
    loop = asyncio.get_running_loop()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(1024)
    ls.setblocking(False)
    while True:
        client, _ = await loop.sock_accept(ls)
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        spawn(splice_pair(client, upstream_port, header), name="splice-pair")


async def main(args: argparse.Namespace) -> None:
    if args.engine == "splice":
        await splice_server(args.port, args.upstream_port, args.proxy_header)
        return
    loop = asyncio.get_running_loop()
    if args.engine == "fd":
        engine = FdRelayEngine(
            loop,
            bulk_after=None if args.bulk_after < 0 else args.bulk_after,
            splice_after=None if args.splice_after < 0 else args.splice_after,
        )
        front = FdFront(engine, args.upstream_port, args.proxy_header)
        sock = socket.create_server(("127.0.0.1", args.port), backlog=1024)
        Acceptor([sock], front.accepted, name="fd").start()
        await asyncio.Event().wait()  # until interrupted
        return
    server = await loop.create_server(
        lambda: Front(args.upstream_port, args.proxy_header), "127.0.0.1", args.port, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("upstream_port", type=int)
    p.add_argument("--engine", choices=["relay", "fd", "splice"], default="relay")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--proxy-header", action="store_true")
    p.add_argument(
        "--bulk-after",
        type=int,
        default=BULK_AFTER,
        help="engine fd: bytes per direction before it gets its own buffer (-1: never)",
    )
    p.add_argument(
        "--splice-after",
        type=int,
        default=-1,
        help="engine fd: bytes per direction before splice(2) takes over (-1: never)",
    )
    a = p.parse_args()
    if a.loop == "uvloop":
        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
