"""A do-nothing asyncio relay in front of Postgres: the floor under any asyncio pooler.

    python benchmarks/dblb/relay_floor.py LISTEN_PORT [UPSTREAM_PORT]

One upstream connection per client (no pooling, no parsing): each side's ``data_received``
writes to the other. pgbench through it costs what the event loop, the transports and the
send/recv calls cost, and nothing else; bench_pgbench.py --floor runs it beside the DBLB.
Benchmark only.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from marchproxy_common.loop import run
from marchproxy_common.tasks import spawn


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.early: list[bytes] = []  # read before the upstream is connected (uvloop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        spawn(self._connect(), name="relay floor connect")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.upstream = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert self.upstream.transport is not None
        self.upstream.transport.write(b"".join(self.early))
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None or self.upstream.transport is None:
            self.early.append(data)
            return
        self.upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("upstream_port", type=int, nargs="?", default=5432)
    args = ap.parse_args()
    run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
