"""Optional mTLS: the NLB serves gRPC over TLS requiring client certificates; a module registers
with its certificate, and a client without one is refused."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from marchproxy.v1 import nlb_pb2, nlb_pb2_grpc
from marchproxy_common.config import ModuleSettings
from marchproxy_common.module.example import EchoHooks
from marchproxy_common.module.runtime import run_module
from marchproxy_nlb.app import NlbApp
from marchproxy_nlb.config import NlbSettings

KEY = "mtls-key"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=marchproxy-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI is part of Debian base")
async def test_module_registers_over_mtls_and_plain_clients_are_refused(tmp_path: Path) -> None:
    await asyncio.to_thread(make_pki, tmp_path)
    nlb = NlbApp(
        NlbSettings(
            cluster_api_key=KEY,
            nlb_grpc_port=0,
            nlb_admin_port=0,
            grpc_tls_cert=str(tmp_path / "server.pem"),
            grpc_tls_key=str(tmp_path / "server.key"),
            grpc_tls_ca=str(tmp_path / "ca.pem"),
        ),
        with_dataplane=False,
    )
    await nlb.start()
    try:
        settings = ModuleSettings(
            cluster_api_key=KEY,
            nlb_addr=f"localhost:{nlb.grpc.port}",
            heartbeat_interval=0.2,
            grpc_tls_cert=str(tmp_path / "client.pem"),
            grpc_tls_key=str(tmp_path / "client.key"),
            grpc_tls_ca=str(tmp_path / "ca.pem"),
        )
        async with run_module(settings, EchoHooks(settings)) as rt:
            async with asyncio.timeout(20):
                while not rt.registered:
                    await asyncio.sleep(0.05)
            assert nlb.registry.get(rt.instance_id) is not None
        # TLS without a client certificate: the handshake is refused.
        creds = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{nlb.grpc.port}", creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await nlb_pb2_grpc.NLBServiceStub(ch).ListModules(
                    nlb_pb2.ListModulesRequest(),
                    metadata=(("x-cluster-api-key", KEY),),
                    timeout=5,
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext to a TLS port fails too.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{nlb.grpc.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await nlb_pb2_grpc.NLBServiceStub(ch).ListModules(
                    nlb_pb2.ListModulesRequest(), metadata=(("x-cluster-api-key", KEY),), timeout=5
                )
    finally:
        await nlb.stop()
