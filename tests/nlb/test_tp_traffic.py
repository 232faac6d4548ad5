"""The NLB data plane with real sockets: one port, many protocols, PROXY v2, retries, draining,
blue/green splits, rate limits, byte-exact bulk transfer and the data-path RPCs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from marchproxy.v1 import nlb_pb2, types_pb2
from marchproxy_common.wire.sniff import MAX_SNIFF_BYTES
from marchproxy_nlb.config import NlbSettings
from marchproxy_nlb.metrics import NlbMetrics
from marchproxy_nlb.registry.table import InstanceRegistry
from marchproxy_nlb.traffic.plane import DataPlane
from tests.conftest import ProxiedEchoBackend as Backend

P = types_pb2


class Stack:
    def __init__(self, **settings: object) -> None:
        base: dict[str, object] = {
            "nlb_listeners": "0=http,tls,postgresql,rtmp,redis",
            "nlb_sniff_timeout": 0.2,
            "nlb_connect_timeout": 2.0,
            "redis_url": "",
        }
        base.update(settings)
        self.settings = NlbSettings(**base)  # type: ignore[arg-type]
        self.registry = InstanceRegistry(heartbeat_timeout=30)
        self.metrics = NlbMetrics()
        self.plane = DataPlane(self.settings, self.registry, self.metrics)
        self.backends: list[Backend] = []

    @property
    def port(self) -> int:
        return self.plane.listener_addresses()[0][1]

    async def backend(
        self,
        name: str,
        protocols: tuple[int, ...],
        module: str = "",
        version: str = "1.0",
        *,
        weight: int = 100,
        module_type: int = P.MODULE_TYPE_ALB,
    ) -> Backend:
        b = await Backend(name).start()
        self.backends.append(b)
        self.registry.register(
            module_id=module or name,
            module_type=module_type,
            protocols=protocols,
            data_host="127.0.0.1",
            data_port=b.port,
            instance_id=name,
            version=version,
            weight=weight,
        )
        return b

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        await self.plane.stop_accepting()
        await self.plane.drain(asyncio.get_running_loop().time() + 2)
        for b in self.backends:
            await b.stop()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = Stack()
    await s.plane.start()
    try:
        yield s
    finally:
        await s.close()


async def exchange(port: int, payload: bytes, *, read_until: int = 1) -> tuple[bytes, tuple]:
    """Send ``payload``, read until ``read_until`` '|' separators arrived; return (answer, our
    local address)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local = writer.get_extra_info("sockname")
    try:
        writer.write(payload)
        await writer.drain()
        data = b""
        async with asyncio.timeout(10):
            while data.count(b"|") < read_until + 1:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
        return data, local
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def client_hello(sni: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def pg_startup(user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608) + f"user\0{user}\0database\0{database}\0\0".encode()
    return struct.pack("!I", len(body) + 4) + body


async def test_one_port_routes_http_tls_by_sni_postgres_and_rtmp(stack: Stack) -> None:
    await stack.backend("web", (P.PROTOCOL_HTTP,))
    await stack.backend("site-a", (P.PROTOCOL_TLS,))
    await stack.backend("site-b", (P.PROTOCOL_TLS,))
    await stack.backend("db", (P.PROTOCOL_POSTGRESQL,))
    await stack.backend("video", (P.PROTOCOL_RTMP,))
    errors = await stack.plane.apply_config(
        {
            "version": 1,
            "routes": [
                {"name": "a", "module": "site-a", "match_rules": {"host": "a.example"}},
                {"name": "b", "module": "site-b", "match_rules": {"host": "*.b.example"}},
            ],
        }
    )
    assert errors == []
    openings = {
        "web": b"GET /x HTTP/1.1\r\nHost: web.example\r\n\r\n",
        "site-a": client_hello("a.example"),
        "site-b": client_hello("www.b.example"),
        "db": pg_startup("postgres", "test"),
        "video": b"\x03" + os.urandom(1536),
    }
    results = await asyncio.gather(*(exchange(stack.port, o) for o in openings.values()))
    for (expected, opening), (answer, local) in zip(openings.items(), results, strict=True):
        name, src, echoed = answer.split(b"|", 2)
        assert name.decode() == expected
        # the instance sees the real client address from the PROXY v2 header
        assert src.decode() == f"{local[0]}:{local[1]}"
        assert opening.startswith(echoed) or echoed.startswith(opening)
    assert stack.metric("nlb_routed_connections_total", protocol="tls", module="site-b") == 1


@pytest.mark.parametrize(
    "host", ["[::1]:8080", "[::1]", "[2001:db8::7]:443", "[2001:db8::7]", "v6.example:8080"]
)
async def test_host_rules_match_ipv6_literals_with_and_without_a_port(
    stack: Stack, host: str
) -> None:
    await stack.backend("web", (P.PROTOCOL_HTTP,))
    await stack.backend("v6", (P.PROTOCOL_HTTP,))
    errors = await stack.plane.apply_config(
        {
            "routes": [
                {"name": "lo6", "module": "v6", "match_rules": {"host": "::1"}},
                {"name": "doc6", "module": "v6", "match_rules": {"host": "[2001:db8::7]"}},
                {"name": "named", "module": "v6", "match_rules": {"host": "v6.example"}},
                {"name": "rest", "module": "web", "match_rules": {"ports": [stack.port]},
                 "priority": -1},
            ]
        }
    )  # fmt: skip
    assert errors == []
    answer, _ = await exchange(stack.port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert answer.startswith(b"v6|"), answer


async def test_no_candidate_is_closed_and_counted(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()
    assert stack.metric("nlb_routing_errors_total", protocol="http", error_type="no_module") == 1


async def test_unknown_bytes_without_default_are_refused(stack: Stack) -> None:
    await stack.backend("web", (P.PROTOCOL_HTTP,))
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(b"\x00\x01garbage that is no protocol")
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()
    assert (
        stack.metric("nlb_routing_errors_total", protocol="unknown", error_type="unknown_protocol")
        == 1
    )


async def test_dead_instance_is_skipped_before_any_byte_is_relayed(stack: Stack) -> None:
    dead = await stack.backend("dead", (P.PROTOCOL_HTTP,), module="web")
    await stack.backend("live", (P.PROTOCOL_HTTP,), module="web")
    await dead.stop()  # like SIGKILL: still registered until its heartbeats time out
    for _ in range(20):
        answer, _ = await exchange(stack.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert answer.startswith(b"live|")
    assert stack.plane.retried_connections >= 1


async def test_draining_instance_gets_nothing_new_while_open_connections_finish(
    stack: Stack,
) -> None:
    old = await stack.backend("old", (P.PROTOCOL_HTTP,), module="web")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    async with asyncio.timeout(10):
        first = await reader.readuntil(b"|")
        await reader.readuntil(b"|")
    assert first == b"old|"
    await stack.backend("new", (P.PROTOCOL_HTTP,), module="web")
    stack.registry.unregister("old", graceful=True)
    for _ in range(10):
        answer, _ = await exchange(stack.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert answer.startswith(b"new|")
    writer.write(b"still here")  # the draining instance still serves its open connection
    async with asyncio.timeout(10):
        got = b""
        while b"still here" not in got:
            got += await reader.read(1024)
    writer.close()
    assert old.open <= 1


async def test_ninety_ten_split_over_a_thousand_connections(stack: Stack) -> None:
    await stack.backend("blue", (P.PROTOCOL_HTTP,), module="alb", version="1.0.0")
    await stack.backend("green", (P.PROTOCOL_HTTP,), module="alb", version="1.1.0")
    errors = await stack.plane.apply_config(
        {
            "version": 2,
            "deployments": [
                {"module": "alb", "version": "1.0.0", "traffic_weight": 90},
                {"module": "alb", "version": "1.1.0", "traffic_weight": 10},
            ],
        }
    )
    assert errors == []
    counts: Counter[str] = Counter()
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem:
            answer, _ = await exchange(stack.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            counts[answer.split(b"|")[0].decode()] += 1

    await asyncio.gather(*(one() for _ in range(1000)))
    assert sum(counts.values()) == 1000
    assert abs(counts["green"] / 10 - 10) <= 3, counts
    assert stack.metric("nlb_bluegreen_traffic_split", module="alb", version="1.1.0") == 10
    status = stack.plane.status()["bluegreen_stats"]["active_deployments"][0]
    assert status["green_version"] == "1.1.0"
    assert status["traffic_split_percent"] == 10


async def test_split_rolls_back_when_new_version_fails() -> None:
    s = Stack()
    s.plane.bluegreen.min_samples = 5
    await s.plane.start()
    try:
        await s.backend("blue", (P.PROTOCOL_HTTP,), module="alb", version="1.0.0")
        green = await s.backend("green", (P.PROTOCOL_HTTP,), module="alb", version="2.0.0")
        await green.stop()  # every connection to the new version fails
        await s.plane.apply_config(
            {
                "deployments": [
                    {"module": "alb", "version": "1.0.0", "traffic_weight": 50},
                    {"module": "alb", "version": "2.0.0", "traffic_weight": 50},
                ]
            }
        )
        for _ in range(30):
            answer, _ = await exchange(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert answer.startswith(b"blue|")
        [dep] = s.plane.status()["bluegreen_stats"]["active_deployments"]
        assert dep["status"] == "rolled_back"
        assert dep["weights"] == {"1.0.0": 100, "2.0.0": 0}
    finally:
        await s.close()


async def test_a_rollback_survives_desired_state_reloads_until_the_candidate_changes() -> None:
    s = Stack()
    s.plane.bluegreen.min_samples = 5
    await s.plane.start()
    try:
        await s.backend("blue", (P.PROTOCOL_HTTP,), module="alb", version="1.0.0")
        green = await s.backend("green", (P.PROTOCOL_HTTP,), module="alb", version="2.0.0")
        await green.stop()
        deployments = [
            {"module": "alb", "version": "1.0.0", "traffic_weight": 50},
            {"module": "alb", "version": "2.0.0", "traffic_weight": 50},
        ]
        assert await s.plane.apply_config({"version": 1, "deployments": deployments}) == []
        for _ in range(15):
            await exchange(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        [dep] = s.plane.status()["bluegreen_stats"]["active_deployments"]
        assert dep["status"] == "rolled_back"
        # the API republishes (another change, or a restart): the same deployments again
        for version in (2, 3):
            snapshot = {"version": version, "deployments": deployments, "routes": []}
            assert await s.plane.apply_config(snapshot) == []
            [dep] = s.plane.status()["bluegreen_stats"]["active_deployments"]
            assert dep["status"] == "rolled_back"
            assert dep["weights"] == {"1.0.0": 100, "2.0.0": 0}
            assert s.metric("nlb_bluegreen_traffic_split", module="alb", version="2.0.0") == 0
        retries = s.plane.retried_connections
        for _ in range(10):
            answer, _ = await exchange(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert answer.startswith(b"blue|")
        assert s.plane.retried_connections == retries  # nothing was sent to 2.0.0 again
        # a fixed build is a new candidate: a new rollout
        await s.backend("green-fixed", (P.PROTOCOL_HTTP,), module="alb", version="2.0.1")
        fixed = [
            {"module": "alb", "version": "1.0.0", "traffic_weight": 50},
            {"module": "alb", "version": "2.0.1", "traffic_weight": 50},
        ]
        assert await s.plane.apply_config({"version": 4, "deployments": fixed}) == []
        [dep] = s.plane.status()["bluegreen_stats"]["active_deployments"]
        assert (dep["status"], dep["green_version"]) == ("in_progress", "2.0.1")
        answers = [
            (await exchange(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))[0] for _ in range(4)
        ]
        assert sum(a.startswith(b"green-fixed|") for a in answers) == 2
    finally:
        await s.close()


async def test_listener_rate_limit_denies_with_metrics() -> None:
    s = Stack()
    await s.plane.start()
    try:
        await s.backend("web", (P.PROTOCOL_HTTP,))
        port = s.port
        await s.plane.apply_config(
            {
                "rate_limits": [
                    {"target": f"listener:{port}", "requests_per_second": 0.01, "burst": 3}
                ]
            }
        )
        outcomes = []
        for _ in range(5):
            answer, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            outcomes.append(answer.startswith(b"web|"))
        assert outcomes == [True, True, True, False, False]
        assert s.metric("nlb_ratelimit_denied_total", bucket=f"listener:{port}") == 2
        assert s.metric("nlb_ratelimit_allowed_total", bucket=f"listener:{port}") == 3
        bucket = s.plane.status()["ratelimit_stats"]["buckets"][f"listener:{port}"]
        assert bucket["denied_total"] == 2
    finally:
        await s.close()


async def test_tokens_available_gauge_follows_every_decision() -> None:
    """The gauge is set by the connection path itself (nobody reads /status here), under the
    rule's name, from the bucket the rule really draws from (a bare protocol target's bucket
    is keyed protocol:<name>)."""
    s = Stack()
    await s.plane.start()
    try:
        await s.backend("web", (P.PROTOCOL_HTTP,))
        port = s.port
        rules = [
            {"target": "http", "requests_per_second": 0.001, "burst": 10},
            {"target": f"listener:{port}", "requests_per_second": 0.001, "burst": 20},
            {"target": "client_ip", "requests_per_second": 0.001, "burst": 30},
        ]
        assert await s.plane.apply_config({"rate_limits": rules}) == []
        for _ in range(3):
            answer, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert answer.startswith(b"web|")
        gauge = "nlb_ratelimit_tokens_available"
        assert s.metric(gauge, bucket="http") == 7
        assert s.metric(gauge, bucket=f"listener:{port}") == 17
        assert s.metric(gauge, bucket="client_ip") == 27
        buckets = s.plane.status()["ratelimit_stats"]["buckets"]
        assert buckets["http"]["tokens_available"] == pytest.approx(7, abs=0.01)
        assert buckets["client_ip"]["tokens_available"] == 27
        # a rule that goes away takes its gauge with it
        assert await s.plane.apply_config({"rate_limits": rules[:1]}) == []
        assert s.metrics.registry.get_sample_value(gauge, {"bucket": "client_ip"}) is None
    finally:
        await s.close()


async def from_address(port: int, source: str) -> bool:
    """One HTTP request from the loopback address ``source``; True if an instance answered."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return False
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        async with asyncio.timeout(10):
            return (await reader.readuntil(b"|")) == b"web|"
    except (OSError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def test_client_ip_churn_does_not_evict_the_global_bucket() -> None:
    """Per-client buckets are bounded; new client addresses must push out other clients'
    buckets, never the global one (it would come back full and let a flood through)."""
    s = Stack(nlb_ratelimit_max_client_buckets=8)
    await s.plane.start()
    try:
        await s.backend("web", (P.PROTOCOL_HTTP,))
        errors = await s.plane.apply_config(
            {
                "rate_limits": [
                    {"target": "client_ip", "requests_per_second": 0.001, "burst": 1},
                    {"target": "global", "requests_per_second": 0.001, "burst": 5},
                ]
            }
        )
        assert errors == []
        # 40 different client addresses (all of 127.0.0.0/8 is loopback on Linux)
        outcomes = [await from_address(s.port, f"127.0.1.{i}") for i in range(1, 41)]
        assert sum(outcomes) == 5, outcomes
        assert s.metric("nlb_ratelimit_denied_total", bucket="global") == 35
        backend = s.plane.status()["ratelimit_stats"]["backend"]
        assert backend["client_buckets"] == 8  # bounded
        assert backend["shared_buckets"] == 1  # the global bucket, never evicted
        # an address seen recently still has its own (empty) bucket
        assert not await from_address(s.port, "127.0.1.40")
        assert s.metric("nlb_ratelimit_denied_total", bucket="client_ip") == 1
    finally:
        await s.close()


@pytest.mark.integration
async def test_cluster_rate_limit_is_shared_by_two_nlbs_through_redis() -> None:
    # a unique key prefix keeps parallel runs apart in the machine's shared Redis
    shared = {
        "redis_url": "redis://127.0.0.1:6379/0",
        "nlb_ratelimit_prefix": f"mp-test:{uuid.uuid4().hex}:",
    }
    a, b = Stack(**shared), Stack(**shared)
    for s in (a, b):
        await s.plane.start()
    try:
        for s in (a, b):
            await s.backend("web", (P.PROTOCOL_HTTP,))
            await s.plane.apply_config(
                {
                    "rate_limits": [
                        {"target": "global", "requests_per_second": 0.01, "burst": 4,
                         "scope": "cluster"}
                    ]
                }
            )  # fmt: skip
        passed = 0
        for s in (a, b, a, b, a, b):
            answer, _ = await exchange(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            passed += answer.startswith(b"web|")
        assert passed == 4
        denied = a.metric("nlb_ratelimit_denied_total", bucket="global") + b.metric(
            "nlb_ratelimit_denied_total", bucket="global"
        )
        assert denied == 2
    finally:
        await a.close()
        await b.close()


async def test_bulk_transfer_is_byte_exact_both_ways(stack: Stack) -> None:
    await stack.backend("bulk", (P.PROTOCOL_HTTP,))
    size = 100 * 1024 * 1024
    block = os.urandom(1 << 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    opening = b"POST /upload HTTP/1.1\r\nHost: h\r\n\r\n"
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        writer.write(opening)
        sent_hash.update(opening)
        remaining = size
        while remaining:
            chunk = block[: min(len(block), remaining)]
            writer.write(chunk)
            sent_hash.update(chunk)
            remaining -= len(chunk)
            await writer.drain()
        writer.write_eof()

    prefix = b""

    async def receive() -> int:
        nonlocal prefix
        prefix = await reader.readuntil(b"|")
        prefix += await reader.readuntil(b"|")
        assert prefix.startswith(b"bulk|")
        total = 0
        while chunk := await reader.read(1 << 18):
            got_hash.update(chunk)
            total += len(chunk)
        return total

    async with asyncio.timeout(120):
        _, received = await asyncio.gather(send(), receive())
    writer.close()
    assert received == size + len(opening)
    assert got_hash.hexdigest() == sent_hash.hexdigest()
    async with asyncio.timeout(10):
        while stack.plane.status()["client_pool_stats"]["active_connections"]:
            await asyncio.sleep(0.02)
    assert stack.metric("nlb_bytes_total", direction="up") == size + len(opening)
    assert stack.metric("nlb_bytes_total", direction="down") == size + len(opening) + len(prefix)


async def test_data_path_rpcs_answer_from_routing_state(stack: Stack) -> None:
    await stack.backend("pg-main", (P.PROTOCOL_POSTGRESQL,), module="dblb")
    await stack.backend("pg-reports", (P.PROTOCOL_POSTGRESQL,), module="dblb-reports")
    update = await stack.plane.update_routing(
        nlb_pb2.UpdateRoutingRequest(
            routes=[
                types_pb2.Route(
                    name="reports",
                    module_id="dblb-reports",
                    priority=10,
                    enabled=True,
                    match={"database": "rep"},
                )
            ]
        )
    )
    assert update.success
    routed = await stack.plane.route_request(
        nlb_pb2.RouteRequestRequest(
            protocol=P.PROTOCOL_POSTGRESQL, client_ip="127.0.0.1", attributes={"database": "rep"}
        )
    )
    assert routed.success
    assert routed.instance.instance_id == "pg-reports"
    assert routed.route_id == "reports"
    answer, _ = await exchange(stack.port, pg_startup("u", "rep"))
    assert answer.startswith(b"pg-reports|")
    table = await stack.plane.get_routing_table(nlb_pb2.GetRoutingTableRequest())
    [entry] = table.entries
    assert entry.connections_routed == 1
    assert list(entry.target_instance_ids) == ["pg-reports"]
    invalid = await stack.plane.validate_route(
        nlb_pb2.ValidateRouteRequest(route=types_pb2.Route(name="x", module_id="nope"))
    )
    assert not invalid.valid
    bad = await stack.plane.update_routing(
        nlb_pb2.UpdateRoutingRequest(routes=[types_pb2.Route(name="", module_id="dblb")])
    )
    assert not bad.success
    dist = await stack.plane.get_load_distribution(nlb_pb2.GetLoadDistributionRequest())
    assert {i.instance_id for i in dist.instances} == {"pg-main", "pg-reports"}


async def test_invalid_snapshot_is_rejected_whole(stack: Stack) -> None:
    await stack.plane.apply_config(
        {"rate_limits": [{"target": "global", "requests_per_second": 5, "burst": 5}]}
    )
    errors = await stack.plane.apply_config(
        {
            "listeners": [{"name": "bad", "port": 70000, "protocols": ["http"]}],
            "rate_limits": [{"target": "", "requests_per_second": -1}],
            "deployments": [{"module": "alb", "version": "1", "traffic_weight": 500}],
        }
    )
    assert len(errors) == 3
    assert [r.target for r in stack.plane.limits.rules] == ["global"]


async def test_udp_listener_relays_datagrams_per_client() -> None:
    s = Stack(nlb_listeners="0/udp=udp")
    await s.plane.start()
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.t.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]

    backend, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.put_nowait(data)

    client = None
    try:
        s.registry.register(
            module_id="dns",
            module_type=P.MODULE_TYPE_L3_NETWORK,
            protocols=(P.PROTOCOL_UDP,),
            data_host="127.0.0.1",
            data_port=backend.get_extra_info("sockname")[1],
            instance_id="dns-1",
        )
        port = s.plane.listener_addresses()[0][1]
        client, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
        for i in range(3):
            client.sendto(f"q{i}".encode())
        async with asyncio.timeout(10):
            answers = {await got.get() for _ in range(3)}
        assert answers == {b"echo:q0", b"echo:q1", b"echo:q2"}
        assert s.registry.get("dns-1").routed_total == 1  # type: ignore[union-attr]
    finally:
        if client is not None:
            client.close()
        backend.close()
        await s.close()


async def test_server_first_protocol_goes_to_its_own_address_of_the_instance() -> None:
    """MySQL (the server speaks first) is routed by the listener's default protocol, to the
    MySQL listener a DBLB registered next to its PostgreSQL data port."""
    s = Stack(nlb_listeners="0=postgresql,mysql", nlb_sniff_timeout=0.05)
    await s.plane.start()
    try:
        pg = await Backend("pg").start()
        mysql = await Backend("mysql").start()
        s.backends += [pg, mysql]
        s.registry.register(
            module_id="dblb",
            module_type=P.MODULE_TYPE_DBLB,
            protocols=(P.PROTOCOL_POSTGRESQL, P.PROTOCOL_MYSQL),
            data_host="127.0.0.1",
            data_port=pg.port,
            instance_id="dblb-1",
            addresses={P.PROTOCOL_MYSQL: ("127.0.0.1", mysql.port)},
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        async with asyncio.timeout(10):  # we send nothing, like a MySQL client
            assert await reader.readuntil(b"|") == b"mysql|"
        writer.close()
        answer, _ = await exchange(s.port, pg_startup("postgres", "test"))
        assert answer.startswith(b"pg|")
    finally:
        await s.close()


def loop_factories() -> list[object]:
    import uvloop

    return [
        pytest.param(asyncio.new_event_loop, id="asyncio"),
        pytest.param(uvloop.new_event_loop, id="uvloop"),
    ]


@pytest.mark.parametrize("loop_factory", loop_factories())
def test_bytes_sent_while_the_upstream_connects_are_bounded(loop_factory) -> None:  # type: ignore[no-untyped-def]
    """A one-protocol listener decides at once; the upstream connect then hangs (the
    instance's accept queue is full) while the client sends 16 MiB. The NLB reads none of it
    meanwhile (at most the sniffed prefix): the bytes wait in the kernel's socket buffers and
    TCP flow control stops the client."""

    async def scenario() -> tuple[int, int, bool]:
        s = Stack(nlb_listeners="0=tcp", nlb_connect_timeout=3.0, nlb_connect_attempts=1)
        await s.plane.start()
        stuck = socket.socket()
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        filler = socket.create_connection(stuck.getsockname())  # the queue is full now
        try:
            s.registry.register(
                module_id="slow",
                module_type=P.MODULE_TYPE_OBSERVABILITY,
                protocols=(P.PROTOCOL_TCP,),
                data_host="127.0.0.1",
                data_port=stuck.getsockname()[1],
                instance_id="slow-1",
            )
            _, writer = await asyncio.open_connection("127.0.0.1", s.port)
            most = seen = 0

            async def watch() -> None:
                nonlocal most, seen
                while True:
                    for conn in list(s.plane._pending):
                        seen += 1
                        most = max(most, len(conn.sniffed))
                    await asyncio.sleep(0.005)

            watcher = asyncio.ensure_future(watch())
            block = os.urandom(1 << 20)
            held_back = False
            with contextlib.suppress(OSError):
                for _ in range(16):
                    writer.write(block)
                    try:
                        await asyncio.wait_for(writer.drain(), 0.5)
                    except TimeoutError:
                        held_back = True
                        break
            await asyncio.sleep(0.2)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher  # a failure in the watcher fails the test
            writer.close()
            return most, seen, held_back
        finally:
            filler.close()
            stuck.close()
            await s.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        most, seen, held_back = runner.run(scenario())
    assert seen, "the connection was never seen waiting for its upstream"
    assert held_back, "the client could write 16 MiB while nothing took its bytes"
    assert most <= MAX_SNIFF_BYTES, most


class PlainEcho:
    """A plain TCP backend (no PROXY protocol): records what it received first, echoes."""

    def __init__(self) -> None:
        self.first: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(65536)
            self.first.append(data)
            while data:
                writer.write(data)
                await writer.drain()
                data = await reader.read(65536)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self) -> PlainEcho:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


@pytest.mark.parametrize(
    ("listeners", "from_state"),
    [
        ("0=tcp?proxy_protocol=none", False),
        ("", True),  # the same listener from desired state
    ],
)
async def test_passthrough_listener_sends_no_proxy_header(listeners: str, from_state: bool) -> None:
    s = Stack(nlb_listeners=listeners)
    await s.plane.start()
    plain = await PlainEcho().start()
    try:
        if from_state:
            errors = await s.plane.apply_config(
                {"listeners": [{"name": "l4", "port": 0, "protocols": ["tcp"],
                                "proxy_protocol": "none"}]}
            )  # fmt: skip
            assert errors == []
        s.registry.register(
            module_id="l4-tcp",
            module_type=P.MODULE_TYPE_L3_NETWORK,
            protocols=(P.PROTOCOL_TCP,),
            data_host="127.0.0.1",
            data_port=plain.port,
            instance_id="plain-1",
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(b"SSH-2.0-client\r\n")  # a protocol the NLB does not know
        async with asyncio.timeout(10):
            assert await reader.readexactly(16) == b"SSH-2.0-client\r\n"
        writer.write(b"more")
        async with asyncio.timeout(10):
            assert await reader.readexactly(4) == b"more"
        writer.close()
        assert plain.first[0] == b"SSH-2.0-client\r\n"  # nothing in front of the client's bytes
        [listener] = s.plane.status()["listeners"]
        assert listener["proxy_protocol"] == "none"
    finally:
        assert plain.server is not None
        plain.server.close()
        await s.close()


async def test_v1_listener_sends_a_text_header() -> None:
    s = Stack(nlb_listeners="0=tcp?proxy_protocol=v1")
    await s.plane.start()
    plain = await PlainEcho().start()
    try:
        s.registry.register(
            module_id="l4-tcp",
            module_type=P.MODULE_TYPE_L3_NETWORK,
            protocols=(P.PROTOCOL_TCP,),
            data_host="127.0.0.1",
            data_port=plain.port,
            instance_id="plain-1",
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        local = writer.get_extra_info("sockname")
        writer.write(b"hi")
        async with asyncio.timeout(10):
            echoed = await reader.readuntil(b"hi")
        writer.close()
        expected = f"PROXY TCP4 127.0.0.1 127.0.0.1 {local[1]} {s.port}\r\n".encode()
        assert echoed == expected + b"hi"
    finally:
        assert plain.server is not None
        plain.server.close()
        await s.close()


# -- balancing strategies and rule matching through real connections ----------------------------

HTTP_GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


async def hold(
    port: int, host: str = "h", source: str = "127.0.0.1"
) -> tuple[str, asyncio.StreamWriter]:
    """Open a connection that stays open; the instance that took it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    async with asyncio.timeout(10):
        name = (await reader.readuntil(b"|")).decode().rstrip("|")
        await reader.readuntil(b"|")
    return name, writer


async def test_least_connections_sends_new_connections_to_the_idlest_instance() -> None:
    s = Stack(nlb_balance="least_conn")
    await s.plane.start()
    held: list[tuple[str, asyncio.StreamWriter]] = []
    try:
        for name in ("a", "b", "c"):
            await s.backend(name, (P.PROTOCOL_HTTP,), module="web")
        for _ in range(6):
            held.append(await hold(s.port))
        assert Counter(n for n, _ in held) == {"a": 2, "b": 2, "c": 2}
        # "b" loses both its connections: the next two go there
        for _, writer in [h for h in held if h[0] == "b"]:
            writer.close()
        held = [h for h in held if h[0] != "b"]
        async with asyncio.timeout(10):
            while s.registry.get("b").active_connections:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        for _ in range(2):
            held.append(await hold(s.port))
            assert held[-1][0] == "b"
        assert Counter(n for n, _ in held) == {"a": 2, "b": 2, "c": 2}
    finally:
        for _, writer in held:
            writer.close()
        await s.close()


async def test_weighted_round_robin_follows_the_weights_exactly() -> None:
    s = Stack(nlb_balance="round_robin")
    await s.plane.start()
    try:
        for name, weight in (("light", 1), ("medium", 2), ("heavy", 3)):
            await s.backend(name, (P.PROTOCOL_HTTP,), module="web", weight=weight)
        names = []
        for _ in range(60):
            answer, _ = await exchange(s.port, HTTP_GET)
            names.append(answer.split(b"|")[0].decode())
        assert Counter(names) == {"light": 10, "medium": 20, "heavy": 30}
        # smooth: every window of 6 consecutive picks holds the exact shares, interleaved
        assert Counter(names[:6]) == {"light": 1, "medium": 2, "heavy": 3}
        assert "heavy heavy heavy" not in " ".join(names)
    finally:
        await s.close()


async def test_client_ip_hash_keeps_each_client_on_its_instance() -> None:
    s = Stack(nlb_balance="hash")
    await s.plane.start()
    try:
        for name in ("a", "b", "c"):
            await s.backend(name, (P.PROTOCOL_HTTP,), module="web")
        clients = [f"127.0.2.{i}" for i in range(1, 31)]

        async def assignment() -> dict[str, str]:
            out = {}
            for ip in clients:
                name, writer = await hold(s.port, source=ip)
                writer.close()
                out[ip] = name
            return out

        first = await assignment()
        assert await assignment() == first  # stable across connections
        assert set(first.values()) == {"a", "b", "c"}  # and spread
        # an instance leaves: only its clients move (rendezvous hashing)
        s.registry.unregister("c", graceful=False)
        after = await assignment()
        assert all(after[ip] == first[ip] for ip in clients if first[ip] != "c")
        assert all(after[ip] in ("a", "b") for ip in clients)
    finally:
        await s.close()


async def test_rules_match_by_port_and_host_in_priority_order() -> None:
    from tests.conftest import free_port

    p1, p2 = free_port(), free_port()
    s = Stack(nlb_listeners=f"{p1}=http;{p2}=http")
    await s.plane.start()
    try:
        await s.backend("web", (P.PROTOCOL_HTTP,))  # the ALB: takes what no rule claims
        for name in ("alt", "wild", "api", "off", "tie-a", "tie-b"):
            await s.backend(name, (P.PROTOCOL_HTTP,), module_type=P.MODULE_TYPE_AILB)
        rules = [
            {"name": "r-alt", "module": "alt", "priority": 10, "match_rules": {"ports": [p2]}},
            {"name": "r-wild", "module": "wild", "priority": 5,
             "match_rules": {"host": "*.example"}},
            {"name": "r-api", "module": "api", "priority": 20,
             "match_rules": {"host": "api.example", "ports": [p2]}},
            {"name": "r-off", "module": "off", "priority": 99, "enabled": False,
             "match_rules": {"host": "*"}},
            {"name": "r-tie-b", "module": "tie-b", "priority": 7,
             "match_rules": {"host": "tie.test"}},
            {"name": "r-tie-a", "module": "tie-a", "priority": 7,
             "match_rules": {"host": "tie.test"}},
        ]  # fmt: skip
        assert await s.plane.apply_config({"routes": rules}) == []
        cases = [
            (p1, "a.example", "wild"),  # host rule
            (p2, "a.example", "alt"),  # port rule, higher priority than the host rule
            (p2, "api.example", "api"),  # both conditions, highest priority
            (p1, "api.example", "wild"),  # r-api needs port p2
            (p1, "other.test", "web"),  # no rule: the owning module type
            (p1, "tie.test", "tie-a"),  # equal priority: by name
            (p2, "tie.test", "alt"),
        ]
        for port, host, expected in cases:
            name, writer = await hold(port, host=host)
            writer.close()
            assert name == expected, (port, host)
    finally:
        await s.close()
