"""Pass sockets between processes over a Unix socket (SCM_RIGHTS), asyncio-friendly.

For hitless restarts (a new NLB takes the listening sockets of the running one, as HAProxy's
``expose-fd listeners`` / Envoy's hot restart) and for handing an accepted client socket to a
co-located module.

API (stable):

- ``await send_sockets(conn, socks, meta)``: one message = a JSON ``meta`` object plus the file
  descriptors of ``socks`` (at most ``MAX_FDS_PER_MESSAGE``). ``conn`` is a connected
  ``AF_UNIX`` ``SOCK_STREAM`` socket; it is switched to non-blocking.
- ``await recv_sockets(conn) -> (meta, list[socket.socket])``: the matching receive; sockets come
  back as ``socket.socket`` objects of the right family/type (via ``socket.socket(fileno=fd)``).
  Raises ``FdPassError`` on a malformed message, EOF, or too many descriptors.
- ``ListenerHandoffServer(path, provide, on_handed_over)``: ``await start()`` binds ``path``; a
  new process that connects with ``await fetch_listeners(path)`` receives ``provide()`` (a list
  of ``(name, socket)``), acknowledges, and then ``on_handed_over()`` runs in the old process
  (stop accepting, drain). ``await close()`` unlinks the path.
- ``await fetch_listeners(path, deadline=10.0) -> dict[str, socket.socket]`` (seconds).

The sender keeps its own copies of the descriptors: closing them after the hand-over does not
affect the receiver (both refer to the same kernel socket until both have closed it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

__all__ = [
    "HANDOFF_ACK",
    "HANDOFF_REQUEST",
    "MAX_FDS_PER_MESSAGE",
    "MAX_META_BYTES",
    "FdPassError",
    "ListenerHandoffServer",
    "SupportsFileno",
    "fetch_listeners",
    "recv_sockets",
    "send_sockets",
]

MAX_FDS_PER_MESSAGE: Final = 64  # well under the kernel's SCM_MAX_FD (253)
MAX_META_BYTES: Final = 64 * 1024
HANDOFF_REQUEST: Final = b"LISTENERS\n"
HANDOFF_ACK: Final = b"OK\n"
_LEN = struct.Struct("!I")


class FdPassError(Exception):
    """A socket hand-over message was malformed, truncated or refused."""


async def _wait(conn: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class SupportsFileno(Protocol):
    def fileno(self) -> int: ...


async def send_sockets(
    conn: socket.socket, socks: Sequence[SupportsFileno], meta: dict[str, Any]
) -> None:
    if len(socks) > MAX_FDS_PER_MESSAGE:
        raise FdPassError(f"at most {MAX_FDS_PER_MESSAGE} sockets per message")
    body = json.dumps(meta, separators=(",", ":")).encode()
    if len(body) > MAX_META_BYTES:
        raise FdPassError("metadata too large")
    conn.setblocking(False)
    data = _LEN.pack(len(body)) + body
    fds = [s.fileno() for s in socks]
    # the descriptors travel with the first byte(s); the rest is plain stream data
    while True:
        try:
            sent = socket.send_fds(conn, [data], fds)
            break
        except BlockingIOError:
            await _wait(conn, write=True)
    view = memoryview(data)[sent:]
    while view:
        try:
            view = view[conn.send(view) :]
        except BlockingIOError:
            await _wait(conn, write=True)


async def _recv_exact(conn: socket.socket, n: int, buf: bytearray) -> None:
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except BlockingIOError:
            await _wait(conn, write=False)
            continue
        if not chunk:
            raise FdPassError("connection closed mid-message")
        buf += chunk


async def recv_sockets(conn: socket.socket) -> tuple[dict[str, Any], list[socket.socket]]:
    conn.setblocking(False)
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_META_BYTES, MAX_FDS_PER_MESSAGE)
            break
        except BlockingIOError:
            await _wait(conn, write=False)
    socks = [socket.socket(fileno=fd) for fd in fds]
    try:
        if flags & socket.MSG_CTRUNC:
            raise FdPassError("too many descriptors (control data truncated)")
        if not data:
            raise FdPassError("connection closed before a message")
        buf = bytearray(data)
        await _recv_exact(conn, _LEN.size, buf)
        (length,) = _LEN.unpack_from(buf)
        if length > MAX_META_BYTES:
            raise FdPassError("metadata too large")
        await _recv_exact(conn, _LEN.size + length, buf)
        if len(buf) != _LEN.size + length:
            raise FdPassError("unexpected bytes after the message")
        try:
            meta = json.loads(bytes(buf[_LEN.size :]))
        except ValueError as exc:
            raise FdPassError("metadata is not JSON") from exc
        if not isinstance(meta, dict):
            raise FdPassError("metadata is not an object")
        return meta, socks
    except BaseException:
        for s in socks:
            s.close()
        raise


class ListenerHandoffServer:
    """Runs in the old process: hands its listening sockets to whoever asks on ``path``."""

    def __init__(
        self,
        path: str,
        provide: Callable[[], list[tuple[str, socket.socket]]],
        on_handed_over: Callable[[], None],
    ) -> None:
        self.path = path
        self._provide = provide
        self._on_handed_over = on_handed_over
        self._server: asyncio.AbstractServer | None = None
        self.handoffs = 0

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                if await reader.readline() != HANDOFF_REQUEST:
                    return
                named = self._provide()
                raw: socket.socket = writer.get_extra_info("socket")
                # the transport owns the socket; pass a duplicate we can drive ourselves
                conn = socket.socket(fileno=os.dup(raw.fileno()))
                try:
                    await send_sockets(
                        conn, [s for _, s in named], {"names": [n for n, _ in named]}
                    )
                finally:
                    conn.close()
                if await reader.readline() == HANDOFF_ACK:
                    self.handoffs += 1
                    self._on_handed_over()
        except (TimeoutError, OSError, FdPassError):
            return
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def fetch_listeners(path: str, *, deadline: float = 10.0) -> dict[str, socket.socket]:
    """Runs in the new process: take over the old process's listening sockets."""
    loop = asyncio.get_running_loop()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setblocking(False)
    try:
        async with asyncio.timeout(deadline):
            await loop.sock_connect(conn, path)
            await loop.sock_sendall(conn, HANDOFF_REQUEST)
            meta, socks = await recv_sockets(conn)
            names = meta.get("names")
            if not isinstance(names, list) or len(names) != len(socks):
                for s in socks:
                    s.close()
                raise FdPassError("listener names do not match the descriptors")
            await loop.sock_sendall(conn, HANDOFF_ACK)
            return {str(n): s for n, s in zip(names, socks, strict=True)}
    finally:
        conn.close()
