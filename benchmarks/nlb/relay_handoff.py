"""Relay vs socket hand-over (SCM_RIGHTS) from an NLB-like front to a co-located module.

    uv run --frozen python benchmarks/nlb/relay_handoff.py [--seconds 3]

Three processes: wrk -> front -> module (a tiny asyncio HTTP responder). The front reads the
first bytes, then either relays to the module's TCP port (marchproxy_common.net.relay) or hands
the client socket to the module over a Unix socket (marchproxy_common.net.handoff). Reported:
keep-alive requests/s and Connection: close requests/s for direct-to-module, relay, hand-over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from relay_bench import free_port, proc, wrk

from marchproxy_common.net.handoff import ConnectionHandoff, HandoffReceiver
from marchproxy_common.net.relay import Relay
from marchproxy_common.tasks import spawn

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Responder(asyncio.Protocol):
    """Answers each request head; closes after answering a 'Connection: close' request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            if b"onnection: close" in head or b"onnection: Close" in head:
                self.transport.write(CLOSE_RESPONSE)
                self.transport.close()
                return
            self.transport.write(RESPONSE)


class Front(asyncio.Protocol):
    def __init__(self, mode: str, module_port: int, handoff: ConnectionHandoff) -> None:
        self.mode, self.module_port, self.handoff = mode, module_port, handoff
        self.buf = b""
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.transport.pause_reading()
        if not self.started:
            self.started = True
            spawn(self.route(), name="bench-route")

    async def route(self) -> None:
        if self.mode == "handoff":
            peer = self.transport.get_extra_info("peername")
            try:
                await self.handoff.send(
                    self.transport.get_extra_info("socket"), first_bytes=self.buf, client=peer[:2]
                )
            finally:
                self.transport.abort()
            return
        relay = Relay(idle_timeout=300)
        try:
            await relay.connect_upstream(
                "127.0.0.1", self.module_port, connect_timeout=5, first_bytes=self.buf
            )
        except OSError:
            self.transport.close()
            return
        self.buf = b""
        relay.attach_downstream(self.transport)


async def serve_module(port: int, path: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Responder, "127.0.0.1", port, backlog=4096)
    receiver = HandoffReceiver(path, Responder)
    await receiver.start()
    async with server:
        await server.serve_forever()


async def serve_front(port: int, mode: str, module_port: int, path: str) -> None:
    loop = asyncio.get_running_loop()
    handoff = ConnectionHandoff(path)
    server = await loop.create_server(
        lambda: Front(mode, module_port, handoff), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", nargs="?", default="bench", choices=["bench", "module", "front"])
    ap.add_argument("--port", type=int)
    ap.add_argument("--module-port", type=int)
    ap.add_argument("--path")
    ap.add_argument("--mode", choices=["relay", "handoff"])
    ap.add_argument("--seconds", type=int, default=3)
    a = ap.parse_args()
    if a.role == "module":
        asyncio.run(serve_module(a.port, a.path))
        return
    if a.role == "front":
        asyncio.run(serve_front(a.port, a.mode, a.module_port, a.path))
        return
    me = [sys.executable, str(Path(__file__).resolve())]
    tmp = Path(tempfile.mkdtemp(prefix="handoff-bench-"))
    path = str(tmp / "module.sock")
    module_port = free_port()
    results: dict[str, dict[str, float]] = {}
    with proc([*me, "module", "--port", str(module_port), "--path", path], module_port):
        results["direct"] = {
            "keepalive_rps": wrk(module_port, a.seconds, close=False),
            "close_rps": wrk(module_port, a.seconds, close=True),
        }
        for mode in ("relay", "handoff"):
            port = free_port()
            cmd = [*me, "front", "--port", str(port), "--mode", mode]
            cmd += ["--module-port", str(module_port), "--path", path]
            with proc(cmd, port):
                results[mode] = {
                    "keepalive_rps": wrk(port, a.seconds, close=False),
                    "close_rps": wrk(port, a.seconds, close=True),
                }
    for name, res in results.items():
        print(f"{name:8s} {json.dumps(res)}")
    base = results["relay"]
    ratios = {k: round(v / base[k], 2) if base[k] else 0.0 for k, v in results["handoff"].items()}
    print(f"handoff / relay: {json.dumps(ratios)}")


if __name__ == "__main__":
    main()
