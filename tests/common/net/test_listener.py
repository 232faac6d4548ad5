"""stop_serving: a listener closed under a stream of connects loses none of them.

Every connection the kernel accepted for the server must reach a protocol's connection_made; the
ones it had not accepted yet stay queued on the listening socket (kept alive here by a
duplicate, as a hitless hand-over keeps it alive in the new process) and are accepted there.
"""

from __future__ import annotations

import asyncio
import os
import socket

from marchproxy_common.net.listener import stop_serving

CLIENTS_PER_ROUND = 6


class Counting(asyncio.Protocol):
    def __init__(self, made: list[asyncio.BaseTransport]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


def accept_leftovers(sock: socket.socket) -> list[socket.socket]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return out
        out.append(conn)


async def one_round(yields: int) -> tuple[int, int]:
    """Connect a burst of clients, yield ``yields`` times, stop serving; returns
    (connections that reached connection_made, connections still queued)."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.BaseTransport] = []
    server = await loop.create_server(lambda: Counting(made), "127.0.0.1", 0)
    listening = server.sockets[0]
    keep = socket.socket(fileno=os.dup(listening.fileno()))
    clients = [socket.create_connection(listening.getsockname()) for _ in range(CLIENTS_PER_ROUND)]
    try:
        for _ in range(yields):
            await asyncio.sleep(0)
        await stop_serving(server)
        leftovers = accept_leftovers(keep)
        for conn in leftovers:
            conn.close()
        return len(made), len(leftovers)
    finally:
        for t in made:
            t.close()
        for c in clients:
            c.close()
        keep.close()


async def test_every_connection_is_served_or_still_queued() -> None:
    for _ in range(20):
        for yields in range(6):
            served, queued = await one_round(yields)
            assert served + queued == CLIENTS_PER_ROUND, (yields, served, queued)


async def test_a_server_stops_accepting_at_once() -> None:
    served, queued = await one_round(0)
    assert served + queued == CLIENTS_PER_ROUND
    # nothing was accepted before the first yield: all are still in the kernel's queue
    assert queued == CLIENTS_PER_ROUND
