"""README's first command: `make run` starts the whole stack and traffic flows through the NLB.

Runs `scripts/devstack.py --check` (the same code as `make run`, on free ports): API on SQLite,
NLB, ALB/DBLB/AILB/RTMP modules, demo backends; an HTTP request and an LLM chat completion go
through the NLB listener, then everything stops.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import struct
import subprocess
import sys
from types import ModuleType

import pytest

from tests.conftest import ROOT, free_port, free_port_block


def load_devstack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("devstack", ROOT / "scripts" / "devstack.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["devstack"] = mod  # (its dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def devstack_port_count() -> int:
    """len(FIXED_PORTS) of scripts/devstack.py."""
    return len(load_devstack().FIXED_PORTS)


pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_make_run_stack_carries_traffic_through_the_nlb() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "scripts/devstack.py",
            "--check",
            "--port-base",
            str(free_port_block(devstack_port_count())),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"service": "demo-http"' in out.stdout
    assert '"via": "1.1 marchproxy-alb"' in out.stdout
    assert "LLM through the NLB: demo upstream says: you wrote 'hello'" in out.stdout


async def test_devstack_waits_for_a_port_a_client_socket_holds() -> None:
    """The fixed gRPC ports (50051..) lie in the ephemeral range: a client socket can hold one,
    which a connect() probe does not see but a server's bind() fails on. devstack waits for
    such a port instead of letting a module die on it, and fails at once on a listener."""
    devstack = load_devstack()
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        client = socket.socket()
        held = free_port()
        client.bind(("127.0.0.1", held))  # no SO_REUSEADDR, as clients do
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        try:
            assert devstack.port_in_use(held) and not devstack.listening(held)
            waiting = asyncio.create_task(devstack.wait_ports_free({"x_grpc": held}))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            # abort (RST): the port is free at once, no TIME_WAIT
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            await asyncio.wait_for(waiting, 10)
            assert not devstack.port_in_use(held)
        finally:
            client.close()
            accepted.close()
        with pytest.raises(SystemExit, match="already in use"):
            await devstack.wait_ports_free({"listener": server.getsockname()[1]})
