"""Connection hand-over: an NLB-like front passes the client socket to a module over SCM_RIGHTS."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from marchproxy_common.net.fdpass import FdPassError
from marchproxy_common.net.handoff import ConnectionHandoff, HandoffReceiver
from marchproxy_common.net.proxied import client_address, proxy_info
from marchproxy_common.tasks import spawn


def run(kind: str, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(coro(), 30))


class ModuleEcho(asyncio.Protocol):
    """Greets with the client address it sees, then echoes (upper-cased, to prove who answers)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        host, port = client_address(transport)
        transport.write(f"module sees {host} {port}\n".encode())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return False


class Front(asyncio.Protocol):
    """The NLB: reads the first bytes, then hands the socket over and forgets it."""

    def __init__(self, handoff: ConnectionHandoff, handed: list[int]) -> None:
        self.handoff = handoff
        self.handed = handed
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b";" not in self.buf:
            return  # "sniffing"
        self.transport.pause_reading()  # type: ignore[attr-defined]
        spawn(self.hand_over(), name="test-handoff")

    async def hand_over(self) -> None:
        peer = self.transport.get_extra_info("peername")
        await self.handoff.send(
            self.transport.get_extra_info("socket"), first_bytes=self.buf, client=peer[:2]
        )
        self.handed.append(1)
        self.transport.abort()  # our descriptor only: the module keeps the connection


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_client_talks_to_the_module_directly_after_handoff(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "module.sock")
            receiver = HandoffReceiver(path, ModuleEcho)
            await receiver.start()
            handoff = ConnectionHandoff(path)
            handed: list[int] = []
            front = await loop.create_server(lambda: Front(handoff, handed), "127.0.0.1", 0)
            port = front.sockets[0].getsockname()[1]
            try:
                for _ in range(3):  # several connections over one channel
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    try:
                        local = writer.get_extra_info("sockname")
                        writer.write(b"sniffed;")
                        greeting = await reader.readline()
                        assert greeting == f"module sees 127.0.0.1 {local[1]}\n".encode()
                        assert await reader.readexactly(8) == b"SNIFFED;"
                        writer.write(b"after the hand-over")
                        assert await reader.readexactly(19) == b"AFTER THE HAND-OVER"
                        writer.write_eof()
                        assert await reader.read() == b""  # the module closed on our EOF
                    finally:
                        writer.close()
                assert len(handed) == 3
                assert receiver.adopted == 3
                assert handoff.sent == 3
            finally:
                front.close()
                await front.wait_closed()
                await handoff.close()
                await receiver.close()

    run(loop_kind, main)


async def test_send_fails_cleanly_when_no_module_listens() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        handoff = ConnectionHandoff(str(Path(tmp) / "nobody.sock"))
        a, b = socket.socketpair()
        try:
            with pytest.raises(OSError):
                await handoff.send(a, first_bytes=b"x", client=("127.0.0.1", 1))
        finally:
            a.close()
            b.close()
            await handoff.close()


class Named(asyncio.Protocol):
    """Says which listener it stands for and whether the client address was known when the
    connection was made (a module may read it in connection_made)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        known = proxy_info(transport) is not None
        transport.write(f"{self.name} {known}\n".encode())  # type: ignore[attr-defined]


async def test_the_port_picks_the_listener_protocol() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "module.sock")
        receiver = HandoffReceiver(path, {8080: lambda: Named("plain"), 8443: lambda: Named("tls")})
        await receiver.start()
        handoff = ConnectionHandoff(path)
        try:
            for port, expect in ((8443, b"tls True\n"), (8080, b"plain True\n"), (9, b"")):
                ours, theirs = socket.socketpair()
                ours.setblocking(False)
                try:
                    await handoff.send(theirs, first_bytes=b"", client=("10.1.2.3", 5), port=port)
                    theirs.close()  # as the NLB drops its copy
                    loop = asyncio.get_running_loop()
                    got = b""
                    async with asyncio.timeout(10):
                        while not got.endswith(b"\n"):
                            chunk = await loop.sock_recv(ours, 100)
                            if not chunk:
                                break  # no listener for that port: closed
                            got += chunk
                    assert got == expect
                finally:
                    ours.close()
            assert (receiver.adopted, receiver.errors) == (2, 1)
        finally:
            await handoff.close()
            await receiver.close()


async def test_a_channel_is_used_only_by_the_instance_it_expects() -> None:
    """A path names a socket on the NLB's host: when another host's instance advertises the
    same path, the module answering there is not it, and nothing is handed over."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "module.sock")
        receiver = HandoffReceiver(path, ModuleEcho, identity=lambda: "alb-local")
        await receiver.start()
        other = ConnectionHandoff(path, expect="alb-elsewhere")
        mine = ConnectionHandoff(path, expect="alb-local")
        a, b = socket.socketpair()
        try:
            with pytest.raises(FdPassError, match="alb-local"):
                await other.send(a, first_bytes=b"", client=("10.0.0.1", 1))
            assert other.sent == 0
            await mine.send(a, first_bytes=b"", client=("10.0.0.1", 1))
            async with asyncio.timeout(10):
                while receiver.adopted == 0:
                    await asyncio.sleep(0.01)
            assert mine.sent == 1 and receiver.errors == 0
        finally:
            a.close()
            b.close()
            await other.close()
            await mine.close()
            await receiver.close()
