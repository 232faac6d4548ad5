"""The module runtime's registration loop against a real (in-process) NLB gRPC server."""

from __future__ import annotations

import asyncio

from marchproxy_common.config import ModuleSettings
from marchproxy_common.module.example import EchoHooks
from marchproxy_common.module.hooks import LoadReport
from marchproxy_common.module.runtime import heartbeat_pace, run_module
from marchproxy_nlb.app import NlbApp
from marchproxy_nlb.config import NlbSettings

KEY = "runtime-test-key"


class FlakyLoadHooks(EchoHooks):
    """load() fails a few times, as a module's own bug might."""

    def __init__(self, settings: ModuleSettings, failures: int) -> None:
        super().__init__(settings)
        self.failures_left = failures

    def load(self) -> LoadReport:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("load() is broken for now")
        return super().load()


async def test_registration_survives_a_hook_that_raises() -> None:
    nlb = NlbApp(
        NlbSettings(cluster_api_key=KEY, nlb_grpc_port=0, nlb_admin_port=0),
        with_dataplane=False,
    )
    await nlb.start()
    try:
        settings = ModuleSettings(
            cluster_api_key=KEY, nlb_addr=f"127.0.0.1:{nlb.grpc.port}", heartbeat_interval=0.1
        )
        hooks = FlakyLoadHooks(settings, failures=2)
        async with run_module(settings, hooks) as rt:
            async with asyncio.timeout(20):
                while hooks.failures_left or not rt.last_heartbeat_ok:
                    await asyncio.sleep(0.05)
            inst = nlb.registry.get(rt.instance_id)
            assert inst is not None and inst.heartbeats >= 1
    finally:
        await nlb.stop()


def test_heartbeat_pace() -> None:
    assert heartbeat_pace(5.0, 0) == 5.0  # an NLB that announces nothing
    assert heartbeat_pace(5.0, 30) == 5.0
    assert heartbeat_pace(5.0, 3) == 1.0
    assert heartbeat_pace(0.2, 1) == 0.2
