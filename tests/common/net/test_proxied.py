"""wrap_proxy_protocol with real sockets, on the stdlib loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from marchproxy_common.net.proxied import (
    ProxyMode,
    client_address,
    proxy_info,
    wrap_proxy_protocol,
)
from marchproxy_common.wire.proxy_protocol import build_v1, build_v2

LOOPS = ["asyncio", "uvloop"]


def run(kind: str, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(coro(), 30))


class Recorder(asyncio.Protocol):
    """Inner protocol: replies with the client address it sees, then echoes."""

    def __init__(self, greet: bool = False) -> None:
        self.greet = greet
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host, port = client_address(transport)
        info = proxy_info(transport)
        ver = info.version if info else 0
        transport.write(f"addr {host} {port} v{ver}\n".encode())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        return False


class BufferedRecorder(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(4)  # tiny on purpose: the hand-over must loop
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host, port = client_address(transport)
        transport.write(f"addr {host} {port} v9\n".encode())

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        self.transport.write(bytes(self.buf[:nbytes]))


async def with_server(
    mode: ProxyMode,
    body: Callable[[int, list[str]], Awaitable[None]],
    *,
    timeout: float = 5.0,
    inner: Callable[[], asyncio.BaseProtocol] = Recorder,
) -> None:
    rejects: list[str] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        wrap_proxy_protocol(inner, mode, timeout, on_reject=rejects.append), "127.0.0.1", 0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        await body(port, rejects)
    finally:
        server.close()
        await server.wait_closed()


async def talk(port: int, *chunks: bytes, pause: float = 0.0) -> tuple[bytes, bytes]:
    """Send chunks (optionally pausing between them), half-close, read all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            for c in chunks:
                writer.write(c)
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
            writer.write_eof()
        except OSError:  # the server already dropped us
            return b"<reset>", b""
        try:
            data = await reader.read(-1)
        except ConnectionResetError:
            data = b"<reset>"
        first, _, rest = data.partition(b"\n")
        return first, rest
    finally:
        writer.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("mode", ["optional", "required"])
def test_v1_ipv4(loop_kind: str, mode: ProxyMode) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        hdr = build_v1(("203.0.113.7", 4242), ("127.0.0.1", port))
        first, rest = await talk(port, hdr + b"hello", b" world")
        assert first == b"addr 203.0.113.7 4242 v1"
        assert rest == b"hello world"
        assert rejects == []

    run(loop_kind, lambda: with_server(mode, body))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_v2_ipv6_split_header(loop_kind: str) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        hdr = build_v2(("2001:db8::5", 65000), ("::1", 443), tlvs={0x05: b"id"})
        first, rest = await talk(port, hdr[:5], hdr[5:20], hdr[20:] + b"x" * 10, pause=0.02)
        assert first == b"addr 2001:db8::5 65000 v2"
        assert rest == b"x" * 10

    run(loop_kind, lambda: with_server("required", body))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_v2_ipv4_into_buffered_protocol(loop_kind: str) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        hdr = build_v2(("198.51.100.1", 80), ("127.0.0.1", port))
        payload = bytes(range(256)) * 40
        first, rest = await talk(port, hdr + payload[:1000], payload[1000:])
        assert first == b"addr 198.51.100.1 80 v9"
        assert rest == payload

    run(loop_kind, lambda: with_server("optional", body, inner=BufferedRecorder))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_optional_without_header_passes_through(loop_kind: str) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        first, rest = await talk(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.startswith(b"addr 127.0.0.1 ")
        assert first.endswith(b" v0")
        assert rest == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        first, rest = await talk(port, b"P", b"UT / HTTP/1.1\r\n", pause=0.02)
        assert rest == b"PUT / HTTP/1.1\r\n"
        assert rejects == []

    run(loop_kind, lambda: with_server("optional", body))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_required_without_header_closes(loop_kind: str) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        first, _ = await talk(port, b"GET / HTTP/1.1\r\n\r\n")
        assert first in (b"", b"<reset>")
        assert rejects == ["missing"]

    run(loop_kind, lambda: with_server("required", body))


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("mode", ["optional", "required"])
def test_garbage_header_closes(loop_kind: str, mode: ProxyMode) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        first, _ = await talk(port, b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\nhello")
        assert first in (b"", b"<reset>")
        first, _ = await talk(port, b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x0c" + b"\x00" * 12)
        assert first in (b"", b"<reset>")
        assert rejects == ["invalid", "invalid"]

    run(loop_kind, lambda: with_server(mode, body))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_slow_header_times_out_when_required(loop_kind: str) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"PROXY TCP4 1.2.3.4")
            try:
                data = await reader.read(-1)
            except ConnectionResetError:
                data = b""
            assert data == b""
            assert rejects == ["timeout"]
        finally:
            writer.close()

    run(loop_kind, lambda: with_server("required", body, timeout=0.3))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_silent_client_gets_greeting_after_timeout_when_optional(loop_kind: str) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            line = await reader.readline()  # server speaks first once the wait is over
            assert line.startswith(b"addr 127.0.0.1 ")
            assert rejects == []
        finally:
            writer.close()

    run(loop_kind, lambda: with_server("optional", body, timeout=0.2))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_eof_before_header(loop_kind: str) -> None:
    async def body(port: int, rejects: list[str]) -> None:
        first, _ = await talk(port, b"PROXY TCP4")
        assert first in (b"", b"<reset>")
        assert rejects == ["eof"]

    run(loop_kind, lambda: with_server("required", body))


def test_off_returns_factory_unchanged() -> None:
    assert wrap_proxy_protocol(Recorder, "off") is Recorder
    with pytest.raises(ValueError, match="mode"):
        wrap_proxy_protocol(Recorder, "sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_untrusted_peer_cannot_claim_an_address(loop_kind: str) -> None:
    hdr = build_v1(("203.0.113.7", 4242), ("127.0.0.1", 80))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for mode in ("optional", "required"):
            rejects: list[str] = []
            server = await loop.create_server(
                wrap_proxy_protocol(
                    Recorder, mode, 5.0, on_reject=rejects.append, trusted_sources=["10.0.0.0/8"]
                ),
                "127.0.0.1",
                0,
            )
            try:
                port = server.sockets[0].getsockname()[1]
                first, rest = await talk(port, hdr + b"hi")
                if mode == "optional":  # passed through unparsed: the peer address stays
                    assert first.startswith(b"addr 127.0.0.1 ")
                    assert rest == hdr + b"hi"
                else:
                    assert first in (b"", b"<reset>")
                    assert rejects == ["untrusted"]
            finally:
                server.close()
                await server.wait_closed()
        trusted = await loop.create_server(
            wrap_proxy_protocol(Recorder, "required", 5.0, trusted_sources=["127.0.0.0/8", "::1"]),
            "127.0.0.1",
            0,
        )
        try:
            first, rest = await talk(trusted.sockets[0].getsockname()[1], hdr + b"hi")
            assert first == b"addr 203.0.113.7 4242 v1"
            assert rest == b"hi"
        finally:
            trusted.close()
            await trusted.wait_closed()

    run(loop_kind, main)
