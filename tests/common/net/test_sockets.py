"""net.sockets on real sockets: a client whose set-up fails is not counted; open_connection
connects onto the poller and leaves nothing behind when it fails."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

import pytest
from structlog.testing import capture_logs

from marchproxy_common.loop import run
from marchproxy_common.net.sockets import (
    ClientListener,
    PollerSelector,
    bind_sockets,
    new_poller,
    open_connection,
)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class FailsAtConnect(asyncio.Protocol):
    lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raise RuntimeError("protocol set-up failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def fails_to_build() -> asyncio.Protocol:
    raise RuntimeError("factory failed")


async def wait_for(cond, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(limit):
        while not cond():
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("factory", [fails_to_build, FailsAtConnect])
async def test_a_client_whose_setup_fails_is_closed_and_not_counted(factory) -> None:  # type: ignore[no-untyped-def]
    poller = new_poller()
    assert poller is not None
    listener = ClientListener(
        poller, bind_sockets("127.0.0.1", 0, backlog=16, reuse_port=False), factory, name="t"
    )
    listener.start()
    port = listener.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        with capture_logs() as logs:
            for _ in range(3):
                client = socket.create_connection(("127.0.0.1", port))
                client.setblocking(False)
                try:
                    # the proxy closes the client: EOF (or a reset) and nothing else
                    async with asyncio.timeout(10):
                        assert await loop.sock_recv(client, 10) == b""
                except ConnectionResetError:
                    pass
                finally:
                    client.close()
        assert [e["event"] for e in logs] == ["client_setup_failed"] * 3
        assert listener.connections == 0
        assert not poller.transports
        # the listener still serves, and still counts
        listener._factory = Echo
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        await loop.sock_sendall(client, b"ping")
        async with asyncio.timeout(10):
            assert await loop.sock_recv(client, 10) == b"ping"
        assert listener.connections == 1
        client.close()
        await wait_for(lambda: listener.connections == 0)
    finally:
        listener.close()
        poller.close()


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.made: asyncio.BaseTransport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def echo_server() -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_open_connection_talks_over_the_poller(host: str) -> None:
    server, port = await echo_server()
    poller = new_poller()
    assert poller is not None
    try:
        transport, proto = await open_connection(poller, Collect, host, port)
        assert proto.made is transport  # connection_made ran before the return
        assert transport.get_extra_info("peername")[1] == port
        assert transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert poller.transports[transport.get_extra_info("socket").fileno()] is transport
        transport.write(b"ping" * 10_000)
        await wait_for(lambda: len(proto.data) == 40_000)
        assert bytes(proto.data) == b"ping" * 10_000
        transport.close()
        async with asyncio.timeout(10):
            assert await proto.lost is None
        assert not poller.transports
    finally:
        server.close()
        poller.close()
    assert poller.epoll.closed


async def test_open_connection_refused_leaves_nothing_behind() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        poller = new_poller()
        assert poller is not None
        made: list[Collect] = []

        def factory() -> Collect:
            made.append(Collect())
            return made[-1]

        try:
            with pytest.raises(ConnectionRefusedError):
                await open_connection(poller, factory, "127.0.0.1", port)
            assert not made  # no protocol for a connection that never was
            assert not poller.transports
        finally:
            poller.close()


async def test_open_connection_cancelled_closes_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    opened: list[socket.socket] = []

    async def hangs(sock: socket.socket, address: object) -> None:
        opened.append(sock)
        await asyncio.sleep(3600)

    monkeypatch.setattr(loop, "sock_connect", hangs)
    poller = new_poller()
    assert poller is not None
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await open_connection(poller, Collect, "127.0.0.1", 9)
        assert len(opened) == 1
        assert opened[0].fileno() == -1  # closed
        assert not poller.transports
    finally:
        poller.close()


async def test_open_connection_whose_protocol_fails_closes_the_socket() -> None:
    server, port = await echo_server()
    poller = new_poller()
    assert poller is not None
    try:
        with pytest.raises(RuntimeError, match="factory failed"):
            await open_connection(poller, fails_to_build, "127.0.0.1", port)
        FailsAtConnect.lost.clear()
        with pytest.raises(RuntimeError, match="protocol set-up failed"):
            await open_connection(poller, FailsAtConnect, "127.0.0.1", port)
        assert not poller.transports
        await wait_for(lambda: len(FailsAtConnect.lost) == 1)
    finally:
        server.close()
        poller.close()


class KeepsTransport(asyncio.Protocol):
    """Keeps its transport after connection_lost, as most protocols do."""

    instances: list[KeepsTransport] = []

    def __init__(self) -> None:
        self.lost = False
        KeepsTransport.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(self.transport, asyncio.Transport)
        self.transport.write(data)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    """After connection_lost the transport lets go of its protocol, so a protocol that keeps
    its transport is no cycle: reference counting frees both (no collector pass per client)."""
    poller = new_poller()
    assert poller is not None
    listener = ClientListener(
        poller, bind_sockets("127.0.0.1", 0, backlog=16, reuse_port=False), KeepsTransport, name="t"
    )
    listener.start()
    port = listener.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    gc.collect()
    gc.disable()
    try:
        KeepsTransport.instances.clear()
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        await loop.sock_sendall(client, b"ping")
        async with asyncio.timeout(10):
            assert await loop.sock_recv(client, 10) == b"ping"
            assert await loop.sock_recv(client, 10) == b""
        client.close()
        await wait_for(lambda: KeepsTransport.instances[0].lost)
        kept = KeepsTransport.instances.pop()
        protocol, transport = weakref.ref(kept), weakref.ref(kept.transport)
        del kept
        await asyncio.sleep(0)  # (the loop drops its handle of connection_lost)
        assert protocol() is None
        assert transport() is None
    finally:
        gc.enable()
        listener.close()
        poller.close()


class ClosesOnData(asyncio.Protocol):
    """Closes its transport from data_received, and says in what order things ran."""

    order: list[str] = []
    fail_when_lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        asyncio.get_running_loop().call_soon(self.order.append, "next callback")
        self.transport.close()
        self.order.append("closed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.order.append("lost")
        if self.fail_when_lost:
            raise RuntimeError("connection_lost failed")


@pytest.mark.parametrize("fail_when_lost", [False, True])
async def test_close_from_data_received_calls_connection_lost_once_it_returns(
    fail_when_lost: bool,
) -> None:
    """A protocol that closes from data_received hears connection_lost as soon as that returns
    (no loop callback, so no extra loop iteration per short connection); one that fails there
    is logged and the poller goes on serving."""
    poller = new_poller()
    assert poller is not None
    listener = ClientListener(
        poller, bind_sockets("127.0.0.1", 0, backlog=16, reuse_port=False), ClosesOnData, name="t"
    )
    listener.start()
    port = listener.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    ClosesOnData.fail_when_lost = fail_when_lost
    try:
        with capture_logs() as logs:
            for _ in range(2):
                ClosesOnData.order.clear()
                client = socket.create_connection(("127.0.0.1", port))
                client.setblocking(False)
                await loop.sock_sendall(client, b"bye")
                async with asyncio.timeout(10):
                    assert await loop.sock_recv(client, 10) == b""
                client.close()
                await wait_for(lambda: len(ClosesOnData.order) == 3)
                assert ClosesOnData.order == ["closed", "lost", "next callback"]
                assert listener.connections == 0 and not poller.transports
        failures = [e for e in logs if e["event"] == "client_protocol_callback_failed"]
        assert len(failures) == (2 if fail_when_lost else 0)
    finally:
        listener.close()
        poller.close()


async def _client_and_upstream_traffic() -> tuple[bool, bool]:
    """A client echoed through the poller, an upstream on it, an asyncio server and a timer on
    the same loop; returns (the poller shared the loop's epoll, it let go of it at close)."""
    loop = asyncio.get_running_loop()
    poller = new_poller()
    assert poller is not None
    listener = ClientListener(
        poller, bind_sockets("127.0.0.1", 0, backlog=16, reuse_port=False), Echo, name="t"
    )
    listener.start()
    server, upstream_port = await echo_server()  # asyncio's own transports, same loop
    timer = loop.create_future()
    loop.call_later(0.01, timer.set_result, "fired")
    try:
        shared = poller.epoll is getattr(getattr(loop, "_selector", None), "epoll", None)
        client = socket.create_connection(("127.0.0.1", listener.sockets[0].getsockname()[1]))
        client.setblocking(False)
        transport, proto = await open_connection(poller, Collect, "127.0.0.1", upstream_port)
        for _ in range(50):
            await loop.sock_sendall(client, b"ping")
            got = b""
            async with asyncio.timeout(10):
                while len(got) < 4:
                    got += await loop.sock_recv(client, 10)
            assert got == b"ping"
        transport.write(b"x" * 200_000)  # more than a socket buffer: write readiness too
        await wait_for(lambda: len(proto.data) == 200_000)
        assert await timer == "fired"
        transport.close()
        client.close()
        async with asyncio.timeout(10):
            await proto.lost
        await wait_for(lambda: not poller.transports)
    finally:
        server.close()
        listener.close()
        poller.close()
    selector = getattr(loop, "_selector", None)
    released = not isinstance(selector, PollerSelector) or (
        selector.poller is None and not poller.epoll.closed
    )
    return shared, released


@pytest.mark.parametrize("shared", [True, False])
def test_poller_on_the_loops_own_epoll_or_one_of_its_own(shared: bool) -> None:
    """With a PollerSelector the poller's sockets are on the loop's epoll, their events handled
    from the loop's own poll; without one the poller has an epoll of its own. Either way
    clients, upstreams, asyncio's transports and timers share the loop."""

    def factory() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(PollerSelector() if shared else None)

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(_client_and_upstream_traffic()) == (shared, True)


def test_the_common_loop_shares_its_epoll_with_the_poller() -> None:
    async def shares() -> bool:
        poller = new_poller()
        assert poller is not None
        try:
            return poller.epoll is asyncio.get_running_loop()._selector.epoll  # type: ignore[attr-defined]
        finally:
            poller.close()

    assert run(shares())
