"""A minimal module on the shared runtime: a TCP echo service.

It is the template for third-party modules (seed 000's L3_NETWORK, OBSERVABILITY, ... types)
and the subject of the module contract tests. Run it with
``python -m marchproxy_common.module.example``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from marchproxy.v1 import types_pb2
from marchproxy_common.config import ModuleSettings
from marchproxy_common.module.hooks import BaseModuleHooks, BoundAddress, LoadReport
from marchproxy_common.module.runtime import run_module_main
from marchproxy_common.net.listener import stop_serving
from marchproxy_common.net.proxied import wrap_proxy_protocol


class _EchoProtocol(asyncio.Protocol):
    def __init__(self, hooks: EchoHooks) -> None:
        self._hooks = hooks
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both behave as one
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._hooks.connections.add(transport)
        self._hooks.idle.clear()
        self._hooks.report.total_connections += 1

    def data_received(self, data: bytes) -> None:
        self._hooks.report.bytes_in += len(data)
        self._hooks.report.bytes_out += len(data)
        self._hooks.report.requests_total += 1
        assert self._transport is not None
        self._transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._hooks.connections.discard(self._transport)
            if not self._hooks.connections:
                self._hooks.idle.set()


class EchoHooks(BaseModuleHooks):
    module_type = types_pb2.MODULE_TYPE_OBSERVABILITY
    protocols = (types_pb2.PROTOCOL_TCP,)
    default_module_id = "echo"

    def __init__(self, settings: ModuleSettings) -> None:
        self.settings = settings
        self.report = LoadReport()
        self.connections: set[asyncio.Transport] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._server: asyncio.Server | None = None
        self._routes: list[dict[str, Any]] = []

    async def start_data_plane(self) -> BoundAddress:
        loop = asyncio.get_running_loop()
        # Connections from the NLB start with a PROXY v2 header carrying the client address.
        # Only PROXY_TRUSTED_SOURCES (loopback by default) may send one.
        factory = wrap_proxy_protocol(
            lambda: _EchoProtocol(self),
            self.settings.proxy_protocol,
            trusted_sources=self.settings.proxy_trusted_networks(),
        )
        self._server = await loop.create_server(
            factory, self.settings.data_host, self.settings.data_port
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        return BoundAddress(host, port)

    async def apply_config(self, snapshot: Mapping[str, Any]) -> list[str]:
        module_id = self.settings.module_id or self.default_module_id
        routes = [r for r in snapshot.get("routes") or [] if r.get("module") in (None, module_id)]
        self._routes = routes
        return []

    def routes(self) -> list[dict[str, Any]]:
        return list(self._routes)

    def load(self) -> LoadReport:
        self.report.active_connections = len(self.connections)
        return self.report

    async def stop_accepting(self) -> None:
        if self._server is not None:
            await stop_serving(self._server)

    async def drain(self, deadline: float) -> None:
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            pass
        for t in list(self.connections):
            t.close()


def main() -> None:
    run_module_main(ModuleSettings, EchoHooks)


if __name__ == "__main__":
    main()
