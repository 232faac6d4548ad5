"""Build a grpc.aio server the way every MarchProxy service needs it.

Every server gets: the ``x-cluster-api-key`` interceptor (constant-time compare, UNAUTHENTICATED
otherwise), the standard ``grpc.health.v1`` service and server reflection (both exempt from the
key, so ``grpc_health_probe``, Kubernetes gRPC probes and ``grpcurl list`` work), a bounded
message size, optional TLS/mTLS, and a graceful stop.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

API_KEY_HEADER = "x-cluster-api-key"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Services that answer without the cluster key: probes and discovery must work unauthenticated.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def keys_match(given: str | bytes | None, expected: str) -> bool:
    if not given or not expected:
        return False
    raw = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(raw, expected.encode())


def _deny(kind: str) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid x-cluster-api-key")

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid x-cluster-api-key")
        yield  # pragma: no cover - makes this an async generator

    return streaming if kind.endswith("stream") else unary


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        given = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == API_KEY_HEADER:
                given = value
                break
        if keys_match(given, self._api_key):
            return handler
        return _denying_handler(handler)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny("unary_unary"), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny("unary_stream"), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny("stream_unary"), **kw)
    return grpc.stream_stream_rpc_method_handler(_deny("stream_stream"), **kw)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str
    key: str
    ca: str = ""  # set: clients must present a certificate signed by it (mTLS)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    cert = Path(tls.cert).read_bytes()
    key = Path(tls.key).read_bytes()
    ca = Path(tls.ca).read_bytes() if tls.ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class _LazyReflection(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Server reflection, loaded on its first call: grpc_reflection pulls in protobuf's
    descriptor_pb2 and its own protos (~4 MiB resident), which only ``grpcurl`` and the like
    ever use."""

    def __init__(self, service_names: tuple[str, ...]) -> None:
        self._names = service_names
        self._handler: grpc.RpcMethodHandler | None = None

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != f"/{REFLECTION_SERVICE}/ServerReflectionInfo":
            return None
        if self._handler is None:
            from grpc_reflection.v1alpha import reflection, reflection_pb2

            servicer = reflection.aio.ReflectionServicer(self._names)
            self._handler = grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        return self._handler


class GrpcServer:
    """A grpc.aio server with auth, health and reflection; ``add`` servicers before ``start``."""

    def __init__(
        self,
        *,
        api_key: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        reuse_port: bool = False,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # SO_REUSEPORT only when asked: a hitless restart runs two processes on one port
            ("grpc.so_reuseport", int(reuse_port)),
        ]
        self.server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(api_key), *extra_interceptors], options=options
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port = 0

    def add(
        self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, name: str
    ) -> None:
        """``register`` is the generated ``add_XServicer_to_server``; ``name`` its full name."""
        register(servicer, self.server)
        self._service_names.append(name)

    async def start(self, host: str, port: int, tls: TlsFiles | None = None) -> int:
        names: Iterable[str] = (*self._service_names, health.SERVICE_NAME, REFLECTION_SERVICE)
        self.server.add_generic_rpc_handlers((_LazyReflection(tuple(names)),))
        addr = f"{host}:{port}"
        if tls is not None:
            self.port = self.server.add_secure_port(addr, server_credentials(tls))
        else:
            self.port = self.server.add_insecure_port(addr)
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {addr}")
        await self.server.start()
        for name in (*self._service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def enter_graceful_shutdown(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
