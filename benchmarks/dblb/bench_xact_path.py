"""The DBLB's own Python cost of one pgbench -S transaction, without sockets or a kernel.

Usage: uv run --frozen python benchmarks/dblb/bench_xact_path.py [--clients 16] [--xacts 200000]
Links ``--clients`` clients and a transaction-mode pool of as many servers over fake
transports, then times the per-transaction path: the client's Query in (framing, server
acquire, forward), the server's RowDescription/DataRow/CommandComplete/ReadyForQuery reply out
(framing, relay, release at ReadyForQuery 'I'). Prints microseconds of CPU per transaction
(median of ``--repeat`` runs). The send/recv syscalls and the event loop are not included:
bench_pgbench.py measures the whole. On a busy machine the timing moves by +-10%; ``--count``
instead counts the Python calls and bytecodes one transaction executes, which does not.
``--connect``: each transaction on a connection of its own, as ``pgbench -C`` does (protocol
object, SSLRequest answered 'N', startup and login, the query, Terminate, connection_lost).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from types import FrameType
from typing import Any

from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_dblb.config import DblbConfig, DblbSettings
from marchproxy_dblb.frontends.postgres import PostgresClient
from marchproxy_dblb.module import DblbHooks
from marchproxy_dblb.pool import ServerConnection

QUERY = enc.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
REPLY = (
    enc.row_description([("abalance", 23)])
    + enc.data_row([b"0"])
    + enc.command_complete("SELECT 1")
    + enc.ready_for_query(b"I")
)


class FakeTransport:
    """Just enough of asyncio.Transport: counts what is written."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


STARTUP = enc.startup_message({"user": "postgres", "database": "bench"})
SSL_REQUEST = enc.ssl_request()
TERMINATE = enc.terminate()


def setup(clients: int) -> list[PostgresClient]:
    config = DblbConfig.model_validate(
        {
            "pool_mode": "transaction",
            "default_pool_size": clients,
            "databases": {"bench": {"host": "127.0.0.1", "port": 5432}},
        }
    )
    hooks = DblbHooks(DblbSettings(register_with_nlb=False), config)
    pool = hooks.manager.pool_for("bench", "postgres", {})
    assert pool is not None
    for _ in range(clients):  # idle servers first: nothing connects anywhere
        server = ServerConnection(pool)
        server.connection_made(FakeTransport())  # type: ignore[arg-type]
        server.state = "idle"
        server.params = {"server_version": "16.0", "client_encoding": "UTF8"}
        pool.servers.add(server)
        pool.server_params = dict(server.params)
        pool.release(server)
    out = []
    for _ in range(clients):
        client = PostgresClient(hooks)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        client.data_received(STARTUP)
        assert client.state == "ready"
        out.append(client)
    return out


def run_connects(clients: list[PostgresClient], xacts: int) -> float:
    """CPU seconds for ``xacts`` transactions on a new connection each."""
    hooks = clients[0].hooks
    start = time.process_time()
    for _ in range(xacts):
        client = PostgresClient(hooks)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        client.data_received(SSL_REQUEST)
        client.data_received(STARTUP)
        client.data_received(QUERY)
        server = client.server
        assert server is not None
        server.data_received(REPLY)
        client.data_received(TERMINATE)
        client.connection_lost(None)
    elapsed = time.process_time() - start
    assert hooks.manager.client_count == len(clients)
    return elapsed


def run(clients: list[PostgresClient], xacts: int) -> float:
    """CPU seconds for ``xacts`` transactions, spread round robin over the clients."""
    rounds = xacts // len(clients)
    start = time.process_time()
    for _ in range(rounds):
        for client in clients:
            client.data_received(QUERY)
            server = client.server
            assert server is not None
            server.data_received(REPLY)
    elapsed = time.process_time() - start
    assert all(c.server is None for c in clients)
    return elapsed


def count(clients: list[PostgresClient], xacts: int, runner: Any) -> tuple[float, float]:
    """Python function calls and bytecodes per transaction (sys.settrace; C calls not seen)."""
    calls = opcodes = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal calls, opcodes
        if event == "call":
            calls += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            opcodes += 1
        return tracer

    sys.settrace(tracer)
    try:
        runner(clients, xacts)
    finally:
        sys.settrace(None)
    return calls / xacts, opcodes / xacts


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--xacts", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--count", action="store_true", help="count calls and bytecodes instead")
    ap.add_argument("--connect", action="store_true", help="a new connection per transaction")
    args = ap.parse_args()
    clients = setup(args.clients)
    runner = run_connects if args.connect else run
    xacts = args.xacts // 4 if args.connect else args.xacts
    runner(clients, 10_000)  # warm up
    if args.count:
        calls, opcodes = count(clients, 10 * len(clients), runner)
        print(f"{calls:.1f} Python calls, {opcodes:.0f} bytecodes per transaction")
        return
    per_xact = [runner(clients, xacts) / xacts * 1e6 for _ in range(args.repeat)]
    print(
        f"{statistics.median(per_xact):.2f} us CPU per transaction "
        f"(median of {args.repeat}; min {min(per_xact):.2f}, max {max(per_xact):.2f})"
    )


if __name__ == "__main__":
    asyncio.run(main())
