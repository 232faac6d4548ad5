"""Hitless restart with real NLB processes: a new process takes the listening sockets of the
running one (SCM_RIGHTS), the old one drains and exits 0; a client opening connections in a loop
sees no refused or reset connection, and connections open across the restart finish normally."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import grpc
import pytest

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from tests.conftest import ProcessGroup, ProxiedEchoBackend, free_port, wait_port

pytestmark = pytest.mark.integration

KEY = "hot-restart-key"
REQUEST = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


async def one_request(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(REQUEST)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"|")
            await reader.readuntil(b"|")
        return head == b"web|"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_hitless_restart_loses_no_connection(procs: ProcessGroup, tmp_path: Path) -> None:
    backend = await ProxiedEchoBackend("web").start()
    listen, grpc_port, admin = free_port(), free_port(), free_port()
    env = {
        "CLUSTER_API_KEY": KEY,
        "NLB_LISTENERS": f"{listen}=http",
        "NLB_GRPC_PORT": str(grpc_port),
        "NLB_ADMIN_PORT": str(admin),
        "NLB_HANDOFF_PATH": str(tmp_path / "handoff.sock"),
        "HEARTBEAT_TIMEOUT": "120",
        "DRAIN_TIMEOUT": "20",
    }
    old = procs.python("nlb-old", "marchproxy_nlb", env)
    wait_port(grpc_port)
    wait_port(listen)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        await nlb_pb2_grpc.NLBServiceStub(ch).RegisterModule(
            nlb_pb2.RegisterModuleRequest(
                module_id="web",
                instance_id="web-1",
                module_type=types_pb2.MODULE_TYPE_ALB,
                protocols=[types_pb2.PROTOCOL_HTTP],
                data_address=types_pb2.Address(host="127.0.0.1", port=backend.port),
            ),
            metadata=(("x-cluster-api-key", KEY),),
            timeout=10,
        )
    # Connections that stay open across the restart.
    long_lived = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        writer.write(REQUEST)
        async with asyncio.timeout(10):
            await reader.readuntil(b"|")
            await reader.readuntil(b"|")
        long_lived.append((reader, writer))

    stop = asyncio.Event()
    ok = failed = 0
    errors: list[str] = []

    async def client_loop() -> None:
        nonlocal ok, failed
        deadline = time.monotonic() + 90
        for _ in range(20_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                if await one_request(listen):
                    ok += 1
                else:
                    failed += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                failed += 1
                errors.append(repr(exc))

    loop_task = asyncio.gather(client_loop(), client_loop())
    try:
        await asyncio.sleep(0.5)
        before = ok
        new = procs.python("nlb-new", "marchproxy_nlb", env)
        async with asyncio.timeout(30):
            while "listeners_handed_over" not in old.output():
                assert new.proc.poll() is None, procs.dump()
                await asyncio.sleep(0.05)
        # The connections opened before the restart still work, then end normally.
        for reader, writer in long_lived:
            writer.write(b"after the restart")
            async with asyncio.timeout(10):
                got = b""
                while b"after the restart" not in got:
                    got += await reader.read(1024)
            writer.write_eof()
            async with asyncio.timeout(10):
                await reader.read()
            writer.close()
        assert await asyncio.to_thread(old.wait, 30) == 0
        after_exit = ok
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await loop_task
        await backend.stop()
    assert failed == 0, errors[:5]
    assert before > 0
    assert ok > after_exit  # the new process kept serving after the old one left
    assert new.proc.poll() is None
