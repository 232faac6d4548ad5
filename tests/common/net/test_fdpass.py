"""SCM_RIGHTS socket passing: in-process, and to a real second process."""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from marchproxy_common.net.fdpass import (
    FdPassError,
    ListenerHandoffServer,
    recv_sockets,
    send_sockets,
)


async def test_pass_listening_and_accepted_sockets() -> None:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    try:
        await send_sockets(a, [listener, accepted], {"names": ["l", "c"], "port": port})
        meta, (l2, c2) = await recv_sockets(b)
        assert meta == {"names": ["l", "c"], "port": port}
        assert l2.getsockname() == listener.getsockname()
        listener.close()
        accepted.close()  # the receiver's copies keep both sockets alive
        client.sendall(b"hello through a passed fd")
        c2.setblocking(False)
        data = await asyncio.wait_for(loop.sock_recv(c2, 100), 10)
        assert data == b"hello through a passed fd"
        c3 = socket.create_connection(("127.0.0.1", port))  # the passed listener still listens
        l2.setblocking(False)
        new, _ = await asyncio.wait_for(loop.sock_accept(l2), 10)
        new.close()
        c3.close()
        l2.close()
        c2.close()
    finally:
        for s in (a, b, client, listener, accepted):
            s.close()


async def test_recv_rejects_garbage_and_eof() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(b"\x00\x00\x00\x05{nope")
        with pytest.raises(FdPassError):
            await recv_sockets(b)
        a.close()
        with pytest.raises(FdPassError):
            await recv_sockets(b)
    finally:
        a.close()
        b.close()


@pytest.mark.integration
async def test_listener_handoff_between_processes() -> None:
    """The old side hands its listener to a real new process, which then serves the port."""
    handed = asyncio.Event()

    async def old_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"old\n")
        writer.close()

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    old_server = await asyncio.start_server(old_handler, sock=listener)

    def on_handed_over() -> None:
        old_server.close()  # stop accepting; the new process owns the port now
        handed.set()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "handoff.sock")
        handoff = ListenerHandoffServer(path, lambda: [("data", listener)], on_handed_over)
        await handoff.start()
        script = textwrap.dedent(
            f"""
            import asyncio, sys
            from marchproxy_common.net.fdpass import fetch_listeners

            async def main():
                socks = await fetch_listeners({path!r})
                served = asyncio.Event()

                async def handler(reader, writer):
                    writer.write(b"new\\n")
                    await writer.drain()
                    writer.close()
                    served.set()

                server = await asyncio.start_server(handler, sock=socks["data"])
                print("ready", flush=True)
                await asyncio.wait_for(served.wait(), 20)
                server.close()

            asyncio.run(main())
            """
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(30):
                assert proc.stdout is not None
                assert await proc.stdout.readline() == b"ready\n"
                await handed.wait()
                await old_server.wait_closed()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await reader.readline() == b"new\n"
                writer.close()
                assert await proc.wait() == 0
            assert handoff.handoffs == 1
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await handoff.close()
            listener.close()
