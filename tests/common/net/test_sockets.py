"""net.sockets.ClientListener on real sockets: a client whose set-up fails is not counted."""

from __future__ import annotations

import asyncio
import socket

import pytest
from structlog.testing import capture_logs

from marchproxy_common.net.sockets import ClientListener, bind_sockets, new_poller


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
