"""The pooled gRPC channels to modules: least recently used evicted (and closed) beyond
grpc_max_channels, instead of refusing new modules."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import grpc
import pytest

from marchproxy_api.keys import grpc_clients_key
from tests.api.conftest import CLUSTER_KEY, fake_module

pytestmark = pytest.mark.integration


async def test_lru_channel_pool_evicts_and_closes(pg_url, api_factory) -> None:
    async with AsyncExitStack() as stack, api_factory(pg_url, grpc_max_channels=2) as api:
        fakes = [await stack.enter_async_context(fake_module(CLUSTER_KEY)) for _ in range(3)]
        mods = []
        for i, (_, port) in enumerate(fakes):
            status, mod = await api.call(
                "POST",
                "/api/v1/modules",
                {"name": f"pool-{i}", "type": "ALB", "grpc_host": "127.0.0.1", "grpc_port": port},
            )
            assert status == 201
            mods.append(mod)
        targets = [f"127.0.0.1:{port}" for _, port in fakes]
        pool = api.app[grpc_clients_key]

        async def health(i: int) -> None:
            status, h = await api.call("POST", f"/api/v1/modules/{mods[i]['id']}/health")
            assert status == 200 and h["healthy"] is True, h

        await health(0)
        first = pool._channels[targets[0]]
        await health(1)
        await health(2)  # a third module: the least recently used channel goes
        assert pool.targets == [targets[1], targets[2]]
        async with asyncio.timeout(10):
            while first.get_state() != grpc.ChannelConnectivity.SHUTDOWN:
                await asyncio.sleep(0.02)
        await health(1)  # used: now the most recent
        assert pool.targets == [targets[2], targets[1]]
        await health(0)  # comes back on a new channel, evicting module 2's
        assert pool.targets == [targets[1], targets[0]]
        assert [fake.calls for fake, _ in fakes] == [2, 2, 1]
