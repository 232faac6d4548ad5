"""Hitless restart with real NLB processes: a new process takes the listening sockets of the
running one (SCM_RIGHTS), the old one drains and exits 0; a client opening connections in a loop
sees no refused or reset connection, and connections open across the restart finish normally."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import grpc
import pytest

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from marchproxy_nlb.hotrestart import set_by_rpc
from tests.conftest import ProcessGroup, ProxiedEchoBackend, ServiceProcess, free_port, wait_port
from tests.nlb.pki import make_pki

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


async def register(grpc_port: int, **fields: object) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        await nlb_pb2_grpc.NLBServiceStub(ch).RegisterModule(
            nlb_pb2.RegisterModuleRequest(**fields),  # type: ignore[arg-type]
            metadata=(("x-cluster-api-key", KEY),),
            timeout=10,
        )


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


async def udp_ask(port: int, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        for _ in range(20):  # datagrams may be lost: ask again until an answer comes
            transport.sendto(payload)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(got), 0.5)
        raise AssertionError(f"no UDP answer on port {port}")
    finally:
        transport.close()


def nlb_env(tmp_path: Path, listeners: str, grpc_port: int, admin: int) -> dict[str, str]:
    return {
        "CLUSTER_API_KEY": KEY,
        "NLB_LISTENERS": listeners,
        "NLB_GRPC_PORT": str(grpc_port),
        "NLB_ADMIN_PORT": str(admin),
        "NLB_HANDOFF_PATH": str(tmp_path / "handoff.sock"),
        "HEARTBEAT_TIMEOUT": "120",
        "DRAIN_TIMEOUT": "10",
    }


async def wait_output(
    proc: ServiceProcess, needle: str, procs: ProcessGroup, timeout: float = 30
) -> None:
    async with asyncio.timeout(timeout):
        while needle not in proc.output():
            await asyncio.sleep(0.05)


async def test_udp_listeners_are_handed_over_and_unclaimed_sockets_closed(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    backend = await ProxiedEchoBackend("web").start()
    udp_backend, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    tcp, udp, dropped, grpc_port, admin = (free_port() for _ in range(5))
    old = procs.python(
        "nlb-old",
        "marchproxy_nlb",
        nlb_env(tmp_path, f"{tcp}=http;{udp}/udp=udp;{dropped}=http", grpc_port, admin),
    )
    try:
        wait_port(grpc_port)
        wait_port(tcp)
        await register(
            grpc_port,
            module_id="web",
            instance_id="web-1",
            module_type=types_pb2.MODULE_TYPE_ALB,
            protocols=[types_pb2.PROTOCOL_HTTP],
            data_address=types_pb2.Address(host="127.0.0.1", port=backend.port),
        )
        await register(
            grpc_port,
            module_id="dns",
            instance_id="dns-1",
            module_type=types_pb2.MODULE_TYPE_L3_NETWORK,
            protocols=[types_pb2.PROTOCOL_UDP],
            data_address=types_pb2.Address(
                host="127.0.0.1", port=udp_backend.get_extra_info("sockname")[1]
            ),
        )
        assert await udp_ask(udp, b"before") == b"echo:before"
        assert await one_request(dropped)
        # the new configuration no longer has the third listener
        new = procs.python(
            "nlb-new",
            "marchproxy_nlb",
            nlb_env(tmp_path, f"{tcp}=http;{udp}/udp=udp", grpc_port, admin),
        )
        await wait_output(old, "listeners_handed_over", procs)
        assert await asyncio.to_thread(old.wait, 30) == 0, procs.dump()
        assert new.proc.poll() is None, procs.dump()
        assert await udp_ask(udp, b"after") == b"echo:after"
        assert await one_request(tcp)
        # the new process closes what it does not listen on once its start-up is complete,
        # which may be just after the old process is gone
        await wait_output(new, "inherited_listeners_closed", procs)
        with pytest.raises(ConnectionRefusedError):
            await one_request(dropped)
    finally:
        udp_backend.close()
        await backend.stop()


async def test_rpc_config_values_and_routes_survive_the_hand_over(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """Rate limits, traffic split and heartbeat timeout set with UpdateNLBConfig, and route
    rules set with UpdateRouting, live in no desired state: the new process takes them from
    the old one (GetNLBConfig, GetRoutingTable)."""
    backend = await ProxiedEchoBackend("web").start()
    tcp, grpc_port, admin = free_port(), free_port(), free_port()
    env = nlb_env(tmp_path, f"{tcp}=http", grpc_port, admin)
    old = procs.python("nlb-old", "marchproxy_nlb", env)
    limit = {"target": f"listener:{tcp}", "requests_per_second": 0.001, "burst": 1}
    split = [{"module": "web", "version": "1.0.0", "traffic_weight": 100}]
    wanted = {"heartbeat_timeout": 77, "rate_limits": [limit], "traffic_split": split}
    try:
        wait_port(grpc_port)
        wait_port(tcp)
        await register(
            grpc_port,
            module_id="web",
            instance_id="web-1",
            module_type=types_pb2.MODULE_TYPE_ALB,
            protocols=[types_pb2.PROTOCOL_HTTP],
            version="1.0.0",
            data_address=types_pb2.Address(host="127.0.0.1", port=backend.port),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            resp = await nlb_pb2_grpc.NLBServiceStub(ch).UpdateNLBConfig(
                nlb_pb2.UpdateNLBConfigRequest(config_json=json.dumps(wanted)),
                metadata=(("x-cluster-api-key", KEY),),
                timeout=10,
            )
            assert resp.success, resp.validation_errors
            rule = types_pb2.Route(
                name="carried",
                module_id="web",
                protocol=types_pb2.PROTOCOL_POSTGRESQL,
                priority=7,
                ports=[tcp],
                match={"database": "orders", "user": "app"},
                source_pattern="127.0.0.0/8",
            )
            routed = await nlb_pb2_grpc.NLBServiceStub(ch).UpdateRouting(
                nlb_pb2.UpdateRoutingRequest(routes=[rule]),
                metadata=(("x-cluster-api-key", KEY),),
                timeout=10,
            )
            assert routed.success, routed.validation_errors
        new = procs.python("nlb-new", "marchproxy_nlb", env)
        await wait_output(old, "listeners_handed_over", procs)
        assert await asyncio.to_thread(old.wait, 30) == 0, procs.dump()
        assert "handoff_dynamic_config_applied" in new.output(), procs.dump()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            cfg = await nlb_pb2_grpc.NLBServiceStub(ch).GetNLBConfig(
                nlb_pb2.GetNLBConfigRequest(), metadata=(("x-cluster-api-key", KEY),), timeout=10
            )
            table = await nlb_pb2_grpc.NLBServiceStub(ch).GetRoutingTable(
                nlb_pb2.GetRoutingTableRequest(), metadata=(("x-cluster-api-key", KEY),), timeout=10
            )
        dynamic = json.loads(cfg.config_json)["dynamic"]
        assert dynamic == wanted
        assert "handoff_rpc_routes_applied" in new.output(), procs.dump()
        carried = [e.route for e in table.entries if e.route.name == "carried"]
        assert len(carried) == 1, table
        got = carried[0]
        assert (got.module_id, got.protocol, got.priority, list(got.ports)) == (
            "web",
            types_pb2.PROTOCOL_POSTGRESQL,
            7,
            [tcp],
        )
        assert dict(got.match) == {"database": "orders", "user": "app"}
        assert (got.source_pattern, got.metadata["origin"]) == ("127.0.0.0/8", "rpc")
        # the limit works in the new process: its own bucket, one connection, then refused
        assert await one_request(tcp)
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await one_request(tcp)
    finally:
        await backend.stop()


def test_only_rpc_set_values_are_carried() -> None:
    static = {"heartbeat_timeout": 120.0}
    split = [{"module": "web", "version": "1", "traffic_weight": 100}]
    # the old process's own HEARTBEAT_TIMEOUT stays behind: the new one's env decides
    assert set_by_rpc({"static": static, "dynamic": {"heartbeat_timeout": 120.0}}) == {}
    got = set_by_rpc(
        {"static": static, "dynamic": {"heartbeat_timeout": 30, "traffic_split": split}}
    )
    assert got == {"heartbeat_timeout": 30, "traffic_split": split}
    assert set_by_rpc({"static": static}) == {} and set_by_rpc([]) == {}


async def test_old_process_keeps_serving_when_the_new_one_dies_during_start_up(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    backend = await ProxiedEchoBackend("web").start()
    tcp, grpc_port, admin, taken = (free_port() for _ in range(4))
    env = nlb_env(tmp_path, f"{tcp}=http", grpc_port, admin)
    old = procs.python("nlb-old", "marchproxy_nlb", env)
    blocker = socket.create_server(("127.0.0.1", taken))  # the new process cannot bind this
    try:
        wait_port(grpc_port)
        wait_port(tcp)
        await register(
            grpc_port,
            module_id="web",
            instance_id="web-1",
            module_type=types_pb2.MODULE_TYPE_ALB,
            protocols=[types_pb2.PROTOCOL_HTTP],
            data_address=types_pb2.Address(host="127.0.0.1", port=backend.port),
        )
        doomed = procs.python("nlb-doomed", "marchproxy_nlb", {**env, "NLB_ADMIN_PORT": str(taken)})
        assert await asyncio.to_thread(doomed.wait, 30) != 0
        assert "handoff_received" in doomed.output()  # it did get the sockets first
        for _ in range(20):
            assert await one_request(tcp)
        assert old.proc.poll() is None
        assert "listeners_handed_over" not in old.output()
        # and a healthy successor still can take over
        good = procs.python("nlb-good", "marchproxy_nlb", env)
        await wait_output(old, "listeners_handed_over", procs)
        assert await asyncio.to_thread(old.wait, 30) == 0
        assert await one_request(tcp)
        assert good.proc.poll() is None
    finally:
        blocker.close()
        await backend.stop()


async def echo_once(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        got = b""
        async with asyncio.timeout(10):
            while len(got) < len(payload):
                chunk = await reader.read(1024)
                if not chunk:
                    break
                got += chunk
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_modules_follow_the_new_process_while_the_old_one_drains(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """A real module heartbeats over one HTTP/2 connection. After the hand-over the old NLB
    drains (a connection stays open) for far longer than HEARTBEAT_TIMEOUT; the module must
    heartbeat the new process by then, or the new one expires it and routes nothing."""
    listen, grpc_port, admin = free_port(), free_port(), free_port()
    env = {
        **nlb_env(tmp_path, f"{listen}=tcp", grpc_port, admin),
        "HEARTBEAT_TIMEOUT": "2",
        "NLB_EXPIRY_INTERVAL": "0.1",
        "DRAIN_TIMEOUT": "60",
    }
    old = procs.python("nlb-old", "marchproxy_nlb", env)
    wait_port(grpc_port)
    wait_port(listen)
    procs.python(
        "echo-module",
        "marchproxy_common.module.example",
        {
            "CLUSTER_API_KEY": KEY,
            "NLB_ADDR": f"127.0.0.1:{grpc_port}",
            "HEARTBEAT_INTERVAL": "0.3",
            "DATA_PORT": "0",
            "GRPC_PORT": "0",
            "ADMIN_PORT": "0",
        },
    )
    async with asyncio.timeout(30):  # until the module registered (refused before)
        while True:
            with contextlib.suppress(OSError):
                if await echo_once(listen, b"ready?") == b"ready?":
                    break
            await asyncio.sleep(0.1)
    # held open through the old process: it keeps draining until we close it
    reader, writer = await asyncio.open_connection("127.0.0.1", listen)
    writer.write(b"held")
    async with asyncio.timeout(10):
        assert await reader.readexactly(4) == b"held"
    new = procs.python("nlb-new", "marchproxy_nlb", env)
    await wait_output(old, "listeners_handed_over", procs)
    await asyncio.sleep(2 * 2.0 + 1)  # well past HEARTBEAT_TIMEOUT
    assert old.proc.poll() is None, "the old process should still be draining"
    for i in range(20):
        payload = f"after-{i}".encode()
        assert await echo_once(listen, payload) == payload, procs.dump()
    assert "instance_expired" not in new.output(), procs.dump()
    assert "control_plane_stopped" in old.output()
    # the held connection still works through the old process, then ends it
    writer.write(b"still")
    async with asyncio.timeout(10):
        assert await reader.readexactly(5) == b"still"
    writer.close()
    assert await asyncio.to_thread(old.wait, 30) == 0
    assert new.proc.poll() is None


async def test_hand_over_copies_the_registry_over_mtls_on_the_configured_host(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """gRPC served with mTLS on 127.0.0.2: the new process must reach the old one there, with
    TLS and a client certificate, or it has no registry (and no sockets) to take over."""
    await asyncio.to_thread(make_pki, tmp_path, "DNS:localhost,IP:127.0.0.1,IP:127.0.0.2")
    backend = await ProxiedEchoBackend("web").start()
    listen, grpc_port, admin = free_port(), free_port("127.0.0.2"), free_port()
    env = {
        **nlb_env(tmp_path, f"{listen}=http", grpc_port, admin),
        "NLB_GRPC_HOST": "127.0.0.2",
        "GRPC_TLS_CERT": str(tmp_path / "server.pem"),
        "GRPC_TLS_KEY": str(tmp_path / "server.key"),
        "GRPC_TLS_CA": str(tmp_path / "ca.pem"),
    }
    old = procs.python("nlb-old", "marchproxy_nlb", env)
    try:
        wait_port(grpc_port, host="127.0.0.2")
        wait_port(listen)
        creds = grpc.ssl_channel_credentials(
            (tmp_path / "ca.pem").read_bytes(),
            (tmp_path / "server.key").read_bytes(),
            (tmp_path / "server.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.2:{grpc_port}", creds) as ch:
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
        new = procs.python("nlb-new", "marchproxy_nlb", env)
        await wait_output(old, "listeners_handed_over", procs)
        assert "instances=1" in new.output(), procs.dump()
        assert await asyncio.to_thread(old.wait, 30) == 0
        # served by the new process from the copied registry: nobody registered with it
        for _ in range(5):
            assert await one_request(listen)
        assert new.proc.poll() is None
    finally:
        await backend.stop()
