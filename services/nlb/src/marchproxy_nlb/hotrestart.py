"""Hitless restart: a new NLB process takes over from the running one (HAProxy's
``expose-fd listeners`` / Envoy's hot restart, in two steps).

1. The new process copies the old one's instance registry over gRPC (``ListModules``), so it can
   route from its first accepted connection instead of waiting for modules to re-register.
2. It asks for the listening sockets on ``NLB_HANDOFF_PATH`` (SCM_RIGHTS, see
   ``marchproxy_common.net.fdpass``) and accepts on the very same kernel sockets: no connection
   is refused in between. The old process then stops accepting, drains its open connections up
   to DRAIN_TIMEOUT and exits. gRPC and admin ports use SO_REUSEPORT while both run.
"""

from __future__ import annotations

import asyncio
import os
import socket

import grpc
import structlog

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc
from marchproxy_common.grpc_server import API_KEY_HEADER
from marchproxy_common.net.fdpass import FdPassError, fetch_listeners
from marchproxy_nlb.config import NlbSettings
from marchproxy_nlb.registry.table import InstanceRegistry

_log = structlog.get_logger("marchproxy.nlb.hotrestart")

HANDOFF_DEADLINE = 10.0  # seconds for the whole exchange with the old process
OLD_PATH_WAIT = 5.0  # seconds the old process gets to release the hand-off path


async def copy_registry(settings: NlbSettings, registry: InstanceRegistry) -> int:
    """Register every instance the running NLB knows; returns how many."""
    addr = f"127.0.0.1:{settings.nlb_grpc_port}"
    async with grpc.aio.insecure_channel(addr) as ch:
        resp = await nlb_pb2_grpc.NLBServiceStub(ch).ListModules(
            nlb_pb2.ListModulesRequest(include_draining=True),
            metadata=((API_KEY_HEADER, settings.effective_cluster_api_key),),
            timeout=HANDOFF_DEADLINE,
        )
    for inst in resp.instances:
        registry.register(
            module_id=inst.module_id,
            module_type=inst.module_type,
            protocols=list(inst.protocols),
            data_host=inst.data_address.host,
            data_port=inst.data_address.port,
            instance_id=inst.instance_id,
            grpc_host=inst.grpc_address.host,
            grpc_port=inst.grpc_address.port,
            version=inst.version,
            weight=inst.weight,
            capacity=inst.capacity,
            labels=dict(inst.labels),
            addresses={
                pa.protocol: (pa.address.host, pa.address.port) for pa in inst.protocol_addresses
            },
        )
        if inst.draining:  # it must get nothing new here either, and leave when it is done
            registry.unregister(
                inst.instance_id, graceful=True, drain_timeout=settings.drain_timeout
            )
    return len(resp.instances)


async def take_over(settings: NlbSettings, registry: InstanceRegistry) -> dict[str, socket.socket]:
    """Inherit registry and listening sockets from a running NLB, if there is one."""
    path = settings.nlb_handoff_path
    if not path or not await asyncio.to_thread(os.path.exists, path):
        return {}
    try:
        copied = await copy_registry(settings, registry)
        sockets = await fetch_listeners(path, deadline=HANDOFF_DEADLINE)
    except (OSError, FdPassError, TimeoutError, grpc.aio.AioRpcError) as exc:
        _log.warning("handoff_unavailable", path=path, error=repr(exc))
        return {}
    _log.info("handoff_received", listeners=sorted(sockets), instances=copied)
    # The old process unlinks the path once it handed over; a file has no event to await.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OLD_PATH_WAIT
    while await asyncio.to_thread(os.path.exists, path) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return sockets
