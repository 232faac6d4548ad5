"""Hitless restart: a new NLB process takes over from the running one (HAProxy's
``expose-fd listeners`` / Envoy's hot restart).

1. The new process copies the old one's instance registry over gRPC (``ListModules``), so it can
   route from its first accepted connection instead of waiting for modules to re-register, and
   the values set with UpdateNLBConfig (``GetNLBConfig``: rate limits, traffic split, heartbeat
   timeout) and the route rules set with UpdateRouting (``GetRoutingTable``), which live in no
   desired state and would otherwise be lost.
2. It asks for the listening sockets (TCP and UDP) on ``NLB_HANDOFF_PATH`` (SCM_RIGHTS, see
   ``marchproxy_common.net.fdpass``) and keeps that connection open while it finishes its own
   start-up: listeners on the inherited sockets, gRPC, admin, desired state. Only then does it
   acknowledge. A new process that dies before that (a bad port, a crash) never acknowledges,
   and the old one keeps serving as if nothing happened.
3. On the acknowledgement the old process stops accepting, stops its gRPC and admin servers at
   once (so modules reconnect their heartbeats to the new process), drains its open
   connections up to DRAIN_TIMEOUT and exits. gRPC and admin ports use SO_REUSEPORT while both
   run. An inherited socket that no listener of the new process claims is closed.

The old side of the exchange is ``marchproxy_common.net.fdpass.ListenerHandoffServer``; it
waits at most ``HANDOFF_SERVER_TIMEOUT`` seconds for the acknowledgement, so the new process
acknowledges within ``ACK_BUDGET`` of asking (desired state still loading by then keeps loading
after the acknowledgement).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import grpc
import structlog

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc, types_pb2
from marchproxy_common.grpc_server import API_KEY_HEADER
from marchproxy_common.net.fdpass import HANDOFF_ACK, HANDOFF_REQUEST, FdPassError, recv_sockets

from .config import NlbSettings
from .grpc.servicer import validate_dynamic_config
from .registry.table import InstanceRegistry

_log = structlog.get_logger("marchproxy.nlb.hotrestart")

HANDOFF_DEADLINE = 10.0  # seconds to copy the registry and to receive the sockets
HANDOFF_SERVER_TIMEOUT = 10.0  # ListenerHandoffServer's limit for the whole exchange
ACK_BUDGET = 7.0  # seconds from asking for the sockets to acknowledging them (< the above)
OLD_PATH_WAIT = 5.0  # seconds the old process gets to release the hand-off path


class HandoverFailed(RuntimeError):
    """The old process did not take our acknowledgement: it keeps serving, we must leave."""


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def old_process_channel(settings: NlbSettings) -> grpc.aio.Channel:
    """A channel to the running NLB's gRPC server: the host we bind too, over TLS when we
    serve TLS (trusting GRPC_TLS_CA, else our own certificate; with a CA, i.e. mTLS, our own
    certificate is the client certificate as well)."""
    target = settings.local_grpc_target(settings.nlb_grpc_port)
    if not settings.grpc_tls_cert:
        return grpc.aio.insecure_channel(target)
    cert = await asyncio.to_thread(_read, settings.grpc_tls_cert)
    if settings.grpc_tls_ca:
        root = await asyncio.to_thread(_read, settings.grpc_tls_ca)
        key = await asyncio.to_thread(_read, settings.grpc_tls_key)
        creds = grpc.ssl_channel_credentials(root, key, cert)
    else:
        creds = grpc.ssl_channel_credentials(cert)
    return grpc.aio.secure_channel(target, creds)


async def copy_registry(
    settings: NlbSettings, old: nlb_pb2_grpc.NLBServiceStub, registry: InstanceRegistry
) -> int:
    """Register every instance the running NLB knows; returns how many."""
    resp = await old.ListModules(
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


async def copy_dynamic_config(
    settings: NlbSettings, old: nlb_pb2_grpc.NLBServiceStub
) -> tuple[dict[str, Any], int]:
    """The running NLB's UpdateNLBConfig values still in force (under their RPC names) and the
    desired-state version it had applied when it reported them. Values that would not pass the
    RPC's own validation are left behind."""
    resp = await old.GetNLBConfig(
        nlb_pb2.GetNLBConfigRequest(),
        metadata=((API_KEY_HEADER, settings.effective_cluster_api_key),),
        timeout=HANDOFF_DEADLINE,
    )
    dynamic = set_by_rpc(json.loads(resp.config_json))
    errors = validate_dynamic_config(json.dumps(dynamic)) if dynamic else []
    if errors:
        _log.warning("handoff_dynamic_config_dropped", errors=errors)
        return {}, resp.config_version
    return dynamic, resp.config_version


async def copy_rpc_routes(
    settings: NlbSettings, old: nlb_pb2_grpc.NLBServiceStub
) -> list[types_pb2.Route]:
    """The route rules the running NLB took from UpdateRouting (desired state's rules come
    with the snapshot this process loads itself)."""
    resp = await old.GetRoutingTable(
        nlb_pb2.GetRoutingTableRequest(),
        metadata=((API_KEY_HEADER, settings.effective_cluster_api_key),),
        timeout=HANDOFF_DEADLINE,
    )
    return [e.route for e in resp.entries if e.route.metadata.get("origin") == "rpc"]


def set_by_rpc(config: Any) -> dict[str, Any]:
    """From a GetNLBConfig document, the dynamic values an RPC changed. The heartbeat timeout
    is always listed; it is the old process's setting unless it differs from its static one,
    and then this process's own HEARTBEAT_TIMEOUT must win (a restart may be meant to change
    it)."""
    if not isinstance(config, dict) or not isinstance(config.get("dynamic"), dict):
        return {}
    dynamic = dict(config["dynamic"])
    static = config.get("static")
    if not isinstance(static, dict):
        static = {}
    if dynamic.get("heartbeat_timeout") == static.get("heartbeat_timeout"):
        dynamic.pop("heartbeat_timeout", None)
    return dynamic


class Takeover:
    """The new process's half of a hand-over: the inherited sockets, and the open connection
    to the old process on which :meth:`acknowledge` tells it to let go."""

    def __init__(
        self,
        path: str,
        conn: socket.socket,
        sockets: dict[str, socket.socket],
        dynamic_config: dict[str, Any] | None = None,
        config_version: int = 0,
        routes: list[types_pb2.Route] | None = None,
    ) -> None:
        self.path = path
        self.sockets = sockets
        #: the old process's UpdateNLBConfig values, set on top of desired state version
        #: ``config_version``
        self.dynamic_config = dynamic_config or {}
        self.config_version = config_version
        #: the old process's UpdateRouting rules
        self.routes = routes or []
        self._conn: socket.socket | None = conn
        self._asked_at = asyncio.get_running_loop().time()

    def remaining(self) -> float:
        """Seconds left to acknowledge before the old process gives up on us."""
        return max(0.0, self._asked_at + ACK_BUDGET - asyncio.get_running_loop().time())

    async def acknowledge(self) -> None:
        """Tell the old process we serve now; wait until it released the hand-off path.
        Raises :class:`HandoverFailed` if it did not take the acknowledgement."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise HandoverFailed("the hand-over was already acknowledged or abandoned")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(HANDOFF_DEADLINE):
                await loop.sock_sendall(conn, HANDOFF_ACK)
        except (OSError, TimeoutError) as exc:
            raise HandoverFailed(f"could not acknowledge the hand-over: {exc!r}") from exc
        finally:
            conn.close()
        # The old process unlinks the path once it took the acknowledgement (a file has no
        # event to await); one that timed out on us keeps it, and keeps serving.
        deadline = loop.time() + OLD_PATH_WAIT
        while await asyncio.to_thread(os.path.exists, self.path):
            if loop.time() >= deadline:
                raise HandoverFailed("the old NLB did not let go of the hand-off path")
            await asyncio.sleep(0.02)

    def abandon(self) -> None:
        """Close the exchange without acknowledging (the old process keeps serving) and our
        copies of the sockets."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.close_unclaimed()

    def close_unclaimed(self) -> list[str]:
        """Close inherited sockets that no listener took; returns their names."""
        names = sorted(self.sockets)
        for name in names:
            with contextlib.suppress(OSError):
                self.sockets.pop(name).close()
        return names


async def _fetch(path: str) -> tuple[socket.socket, dict[str, socket.socket]]:
    loop = asyncio.get_running_loop()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setblocking(False)
    try:
        async with asyncio.timeout(HANDOFF_DEADLINE):
            await loop.sock_connect(conn, path)
            await loop.sock_sendall(conn, HANDOFF_REQUEST)
            meta, socks = await recv_sockets(conn)
    except BaseException:
        conn.close()
        raise
    names = meta.get("names")
    if not isinstance(names, list) or len(names) != len(socks):
        for s in socks:
            s.close()
        conn.close()
        raise FdPassError("listener names do not match the descriptors")
    return conn, {str(n): s for n, s in zip(names, socks, strict=True)}


async def take_over(settings: NlbSettings, registry: InstanceRegistry) -> Takeover | None:
    """Inherit registry and listening sockets from a running NLB, if there is one. The caller
    finishes its start-up, then calls ``acknowledge()`` (or ``abandon()``)."""
    path = settings.nlb_handoff_path
    if not path or not await asyncio.to_thread(os.path.exists, path):
        return None
    try:
        async with await old_process_channel(settings) as ch:  # one channel for every copy
            old = nlb_pb2_grpc.NLBServiceStub(ch)
            copied = await copy_registry(settings, old, registry)
            dynamic, version = await copy_dynamic_config(settings, old)
            routes = await copy_rpc_routes(settings, old)
        conn, sockets = await _fetch(path)
    except (OSError, FdPassError, TimeoutError, grpc.aio.AioRpcError, ValueError) as exc:
        _log.warning("handoff_unavailable", path=path, error=repr(exc))
        return None
    _log.info(
        "handoff_received",
        listeners=sorted(sockets),
        instances=copied,
        dynamic_config=sorted(dynamic),
        rpc_routes=len(routes),
    )
    return Takeover(path, conn, sockets, dynamic, version, routes)
