"""Rate limits and blue/green splits set over gRPC (UpdateNLBConfig), seen by real connections:
they take effect for new connections, leave open ones alone, and hold until desired state
changes the same field."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from marchproxy_nlb.app import NlbApp
from marchproxy_nlb.config import NlbSettings
from tests.conftest import ProxiedEchoBackend

KEY = "dynamic-config-key"
META = (("x-cluster-api-key", KEY),)
HTTP = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@dataclass
class Live:
    app: NlbApp
    stub: nlb_pb2_grpc.NLBServiceStub
    port: int

    async def update(self, **config: Any) -> nlb_pb2.UpdateNLBConfigResponse:
        resp: nlb_pb2.UpdateNLBConfigResponse = await self.stub.UpdateNLBConfig(
            nlb_pb2.UpdateNLBConfigRequest(config_json=json.dumps(config)), metadata=META
        )
        return resp

    def metric(self, name: str, **labels: str) -> float:
        return self.app.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    app = NlbApp(
        NlbSettings(cluster_api_key=KEY, nlb_grpc_port=0, nlb_admin_port=0, nlb_listeners="0=http")
    )
    await app.start()
    backends = []
    try:
        for name, version in (("blue", "1.0.0"), ("green", "1.1.0")):
            b = await ProxiedEchoBackend(name).start()
            backends.append(b)
            app.registry.register(
                module_id="web",
                module_type=types_pb2.MODULE_TYPE_ALB,
                protocols=[types_pb2.PROTOCOL_HTTP],
                data_host="127.0.0.1",
                data_port=b.port,
                instance_id=name,
                version=version,
            )
        assert app.dataplane is not None
        port = app.dataplane.listener_addresses()[0][1]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as ch:
            yield Live(app, nlb_pb2_grpc.NLBServiceStub(ch), port)
    finally:
        for b in backends:
            await b.stop()
        await app.stop()


async def who(port: int) -> str:
    """Open a connection, send a request; the name of the instance that answered, or "" when
    the NLB refused the connection."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return ""
    try:
        writer.write(HTTP)
        async with asyncio.timeout(10):
            return (await reader.readuntil(b"|")).decode().rstrip("|")
    except (OSError, asyncio.IncompleteReadError):
        return ""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def tally(port: int, n: int) -> Counter[str]:
    sem = asyncio.Semaphore(16)

    async def one() -> str:
        async with sem:
            return await who(port)

    return Counter(await asyncio.gather(*(one() for _ in range(n))))


def split(weights: dict[str, int]) -> list[dict[str, Any]]:
    return [{"module": "web", "version": v, "traffic_weight": w} for v, w in weights.items()]


async def test_rpc_split_and_rate_limit_are_seen_by_real_connections(live: Live) -> None:
    assert (
        await live.app.dataplane.apply_config(  # type: ignore[union-attr]
            {"version": 1, "deployments": split({"1.0.0": 50, "1.1.0": 50})}
        )
        == []
    )
    limit = {"target": f"listener:{live.port}", "requests_per_second": 0.001, "burst": 200}
    resp = await live.update(traffic_split=split({"1.0.0": 90, "1.1.0": 10}), rate_limits=[limit])
    assert resp.success, resp.validation_errors
    counts = await tally(live.port, 200)
    assert sum(counts.values()) == 200 and "" not in counts
    assert abs(counts["green"] - 20) <= 6, counts  # 10 % of 200, ±3 points
    assert await who(live.port) == ""  # the 201st: the bucket is empty
    assert live.metric("nlb_ratelimit_denied_total", bucket=f"listener:{live.port}") == 1
    assert live.metric("nlb_bluegreen_traffic_split", module="web", version="1.1.0") == 10
    cfg = json.loads(
        (await live.stub.GetNLBConfig(nlb_pb2.GetNLBConfigRequest(), metadata=META)).config_json
    )
    assert cfg["dynamic"]["rate_limits"] == [limit]


async def test_changing_the_split_keeps_open_connections(live: Live) -> None:
    assert (await live.update(traffic_split=split({"1.0.0": 100, "1.1.0": 0}))).success
    held = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(HTTP)
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"|") == b"blue|"
            await reader.readuntil(b"|")
        held.append((reader, writer))
    try:
        assert (await live.update(traffic_split=split({"1.0.0": 0, "1.1.0": 100}))).success
        assert await tally(live.port, 10) == Counter({"green": 10})
        for i, (reader, writer) in enumerate(held):  # still relayed to blue
            writer.write(f"ping {i}".encode())
            async with asyncio.timeout(10):
                got = b""
                while f"ping {i}".encode() not in got:
                    chunk = await reader.read(1024)
                    assert chunk, "an open connection was dropped by the split change"
                    got += chunk
        blue = live.app.registry.get("blue")
        assert blue is not None and blue.active_connections == 4
    finally:
        for _, writer in held:
            writer.close()


async def test_rpc_values_hold_until_desired_state_changes_that_field(live: Live) -> None:
    dp = live.app.dataplane
    assert dp is not None
    state_split = split({"1.0.0": 100, "1.1.0": 0})
    assert await dp.apply_config({"version": 1, "deployments": state_split}) == []
    assert await tally(live.port, 5) == Counter({"blue": 5})
    assert (await live.update(traffic_split=split({"1.0.0": 0, "1.1.0": 100}))).success
    assert await tally(live.port, 5) == Counter({"green": 5})
    # a new snapshot that changes other things but not the split: the RPC's split holds
    assert await dp.apply_config({"version": 2, "deployments": state_split, "routes": []}) == []
    assert await tally(live.port, 5) == Counter({"green": 5})
    # a snapshot that changes the split: desired state wins again
    assert await dp.apply_config({"version": 3, "deployments": split({"1.0.0": 100})}) == []
    assert await tally(live.port, 5) == Counter({"blue": 5})
    # same for rate limits
    tight = [{"target": "global", "requests_per_second": 0.001, "burst": 1}]
    assert (await live.update(rate_limits=tight)).success
    assert await who(live.port) == "blue"
    assert await who(live.port) == ""
    assert await dp.apply_config({"version": 4, "deployments": split({"1.0.0": 100})}) == []
    assert await who(live.port) == ""  # still the RPC's limit
    assert await dp.apply_config({"version": 5, "deployments": split({"1.0.0": 100}),
                                  "rate_limits": []}) == []  # fmt: skip
    assert await who(live.port) == ""  # [] is what the snapshots said all along
    open_limit = [{"target": f"listener:{live.port}", "requests_per_second": 10, "burst": 10}]
    assert await dp.apply_config({"version": 6, "rate_limits": open_limit}) == []
    assert await who(live.port) == "blue"


async def test_values_carried_over_a_hand_over_follow_the_same_rule(live: Live) -> None:
    """After a hitless restart the new process holds the old one's RPC values (applied, then
    keep_rpc_values_over the old process's snapshot version):
    its first snapshot keeps them when it is the version they were set on top of, and, being
    unable to tell what changed otherwise, treats any other version as the usual rule does."""
    dp = live.app.dataplane
    assert dp is not None
    state_split = split({"1.0.0": 100, "1.1.0": 0})
    rpc_split = split({"1.0.0": 0, "1.1.0": 100})
    dp.apply_dynamic({"traffic_split": rpc_split})
    dp.keep_rpc_values_over(7)
    assert await tally(live.port, 5) == Counter({"green": 5})  # in force before any snapshot
    assert await dp.apply_config({"version": 7, "deployments": state_split}) == []
    assert await tally(live.port, 5) == Counter({"green": 5})
    assert dp.rpc_overrides() == {"traffic_split": rpc_split}
    # later snapshots: the usual rule against the snapshot before
    assert await dp.apply_config({"version": 8, "deployments": state_split}) == []
    assert await tally(live.port, 5) == Counter({"green": 5})
    assert await dp.apply_config({"version": 9, "deployments": split({"1.0.0": 100})}) == []
    assert await tally(live.port, 5) == Counter({"blue": 5})
    # a first snapshot of another version with a split of its own: desired state wins
    dp.apply_dynamic({"traffic_split": rpc_split})
    dp.keep_rpc_values_over(20)
    assert await dp.apply_config({"version": 21, "deployments": state_split}) == []
    assert await tally(live.port, 5) == Counter({"blue": 5})
    assert dp.rpc_overrides() == {}


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"traffic_split": {"web": 10}}, "traffic_split must be a list"),
        ({"traffic_split": ["x"]}, "traffic_split[0] must be an object"),
        ({"traffic_split": [{"module": "web", "version": "1", "traffic_weight": 101}]}, "0-100"),
        ({"traffic_split": [{"module": "web", "version": "1", "traffic_weight": True}]}, "0-100"),
        ({"traffic_split": [{"module": "", "version": "1"}]}, "module and version"),
        ({"rate_limits": "lots"}, "rate_limits must be a list"),
        ({"rate_limits": [{"target": "global", "requests_per_second": True}]}, "number > 0"),
        ({"rate_limits": [{"target": "global", "requests_per_second": -1}]}, "number > 0"),
        ({"rate_limits": [{"target": 7, "requests_per_second": 1}]}, "target"),
        (
            {"rate_limits": [{"target": "global", "requests_per_second": 1, "scope": "moon"}]},
            "scope",
        ),
    ],
)
async def test_bad_rpc_values_are_rejected_and_change_nothing(
    live: Live, config: dict[str, Any], needle: str
) -> None:
    resp = await live.update(**config)
    assert not resp.success
    assert any(needle in e for e in resp.validation_errors), resp.validation_errors
    assert live.app.dataplane is not None
    assert live.app.dataplane.limits.rules == ()
    assert live.app.dataplane.bluegreen.splits == {}
