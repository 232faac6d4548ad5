"""Async client for NLBService with the cluster key attached to every call.

Retries are the caller's policy (the module runtime retries registration forever with
exponential backoff and jitter); each call here is one attempt with a deadline.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc
from marchproxy_common.grpc_server import API_KEY_HEADER

DEFAULT_RPC_TIMEOUT = 5.0
# gRPC's default reconnect backoff grows to 120 s: after a long NLB outage (or a hitless
# restart that closes our connection) a module would wait that long to re-register.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


class NlbClient:
    def __init__(
        self,
        addr: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_RPC_TIMEOUT,
        root_certificates: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,  # (key, cert) for mTLS
    ) -> None:
        self.addr = addr
        self._metadata: Sequence[tuple[str, str]] = ((API_KEY_HEADER, api_key),)
        self._timeout = timeout
        self._root = root_certificates
        self._client_cert = client_cert
        self._channel: grpc.aio.Channel | None = None
        self._stub: nlb_pb2_grpc.NLBServiceStub | None = None

    @property
    def stub(self) -> nlb_pb2_grpc.NLBServiceStub:
        if self._stub is None:
            if self._root is not None:
                key, cert = self._client_cert or (None, None)
                creds = grpc.ssl_channel_credentials(self._root, key, cert)
                self._channel = grpc.aio.secure_channel(self.addr, creds, CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.insecure_channel(self.addr, CHANNEL_OPTIONS)
            self._stub = nlb_pb2_grpc.NLBServiceStub(self._channel)
        return self._stub

    async def register(self, req: nlb_pb2.RegisterModuleRequest) -> nlb_pb2.RegisterModuleResponse:
        resp: nlb_pb2.RegisterModuleResponse = await self.stub.RegisterModule(
            req, metadata=self._metadata, timeout=self._timeout
        )
        return resp

    async def heartbeat(self, req: nlb_pb2.HeartbeatRequest) -> nlb_pb2.HeartbeatResponse:
        resp: nlb_pb2.HeartbeatResponse = await self.stub.Heartbeat(
            req, metadata=self._metadata, timeout=self._timeout
        )
        return resp

    async def unregister(
        self, module_id: str, instance_id: str, *, graceful: bool, drain_timeout: float = 0
    ) -> nlb_pb2.UnregisterModuleResponse:
        req = nlb_pb2.UnregisterModuleRequest(
            module_id=module_id,
            instance_id=instance_id,
            graceful=graceful,
            drain_timeout_seconds=int(drain_timeout),
        )
        resp: nlb_pb2.UnregisterModuleResponse = await self.stub.UnregisterModule(
            req, metadata=self._metadata, timeout=self._timeout
        )
        return resp

    async def list_modules(self, module_id: str) -> nlb_pb2.ListModulesResponse:
        resp: nlb_pb2.ListModulesResponse = await self.stub.ListModules(
            nlb_pb2.ListModulesRequest(module_id=module_id, include_draining=True),
            metadata=self._metadata,
            timeout=self._timeout,
        )
        return resp

    async def trigger_scaling(
        self, module_id: str, target: int, reason: str
    ) -> nlb_pb2.TriggerScalingResponse:
        resp: nlb_pb2.TriggerScalingResponse = await self.stub.TriggerScaling(
            nlb_pb2.TriggerScalingRequest(
                module_id=module_id, target_instances=target, reason=reason
            ),
            metadata=self._metadata,
            timeout=self._timeout,
        )
        return resp

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
