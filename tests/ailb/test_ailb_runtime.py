"""The AILB through the shared module runtime: static config file, admin /metrics and /status,
and as a real process (python -m marchproxy_ailb --config FILE) that exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from marchproxy_ailb.config import AilbSettings
from marchproxy_ailb.module import AilbHooks
from marchproxy_common.module.runtime import run_module
from tests.ailb.conftest import AilbFactory, three_provider_config
from tests.ailb.fakes import FakeAnthropic, FakeOllama, FakeOpenAI, make_pki
from tests.conftest import ROOT, ProcessGroup, free_port, wait_port


def write_config(
    path: Path, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_ollama: FakeOllama
) -> Path:
    snapshot = {
        "component": "ailb",
        "version": 3,
        "modules": [
            {
                "id": 1,
                "name": "ailb",
                "type": "AILB",
                "enabled": True,
                "config": three_provider_config(fake_openai, fake_anthropic, fake_ollama),
            }
        ],
    }
    path.write_text(yaml.safe_dump(snapshot))
    return path


async def test_through_module_runtime(
    tmp_path: Path, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_ollama: FakeOllama
) -> None:
    cfg = write_config(tmp_path / "ailb.yaml", fake_openai, fake_anthropic, fake_ollama)
    settings = AilbSettings(
        config_file=str(cfg),
        register_with_nlb=False,
        redis_url="",
        api_url="",
        proxy_protocol="off",
    )
    hooks = AilbHooks(settings)
    async with run_module(settings, hooks) as rt:
        url = f"http://127.0.0.1:{rt.data_address.port}/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
            r = await client.chat.completions.create(
                model="claude-fake", messages=[{"role": "user", "content": "rt"}]
            )
            assert r.choices[0].message.content == "Hello from anthropic: rt"
        admin = f"http://127.0.0.1:{rt.admin_address.port}"
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(admin + "/metrics")).text
            assert (
                'ailb_requests_total{model="claude-fake",provider="anthropic",status="200"}'
                in metrics
            )
            assert "ailb_tokens_total" in metrics
            status = (await http.get(admin + "/status")).json()
            assert "claude-fake" in status["groups"]
        load = hooks.load()
        assert load.requests_total == 1
        assert load.latency_p50_ms > 0
        assert rt.config_version == 3
    await hooks.close()


async def test_invalid_config_is_rejected_whole(fake_openai: FakeOpenAI) -> None:
    hooks = AilbHooks(AilbSettings(register_with_nlb=False, redis_url=""))
    try:
        good = {
            "modules": [
                {
                    "name": "ailb",
                    "config": {
                        "model_list": [{"model_name": "a", "base_url": fake_openai.url + "/v1"}]
                    },
                }
            ]
        }
        assert await hooks.apply_config(good) == []
        bad = {
            "modules": [
                {
                    "name": "ailb",
                    "config": {
                        "model_list": [{"model_name": "b", "base_url": "ftp://x"}],
                        "router_settings": {"fallbacks": {"b": ["missing"]}},
                    },
                }
            ]
        }
        errors = await hooks.apply_config(bad)
        assert errors
        assert list(hooks.gateway.routed.router.groups) == ["a"]
    finally:
        await hooks.close()


@pytest.mark.integration
async def test_as_a_process(
    tmp_path: Path,
    procs: ProcessGroup,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_ollama: FakeOllama,
) -> None:
    cfg = write_config(tmp_path / "ailb.yaml", fake_openai, fake_anthropic, fake_ollama)
    data_port, admin_port = free_port(), free_port()
    proc = procs.python(
        "ailb",
        "marchproxy_ailb",
        {
            "CONFIG_FILE": str(cfg),
            "DATA_PORT": str(data_port),
            "ADMIN_PORT": str(admin_port),
            "GRPC_PORT": "0",
            "REGISTER_WITH_NLB": "false",
            "REDIS_URL": "",
            "API_URL": "",
            "DRAIN_TIMEOUT": "2",
        },
    )
    await asyncio.to_thread(wait_port, data_port)
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{data_port}/v1", api_key="x", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="llama-fake", messages=[{"role": "user", "content": "proc"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from ollama: proc"
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0


async def test_proxy_protocol_header_from_nlb(ailb: AilbFactory, fake_openai: FakeOpenAI) -> None:
    """The NLB sends a PROXY header first; the data port strips it before HTTP."""
    hooks = await ailb.start(
        {"model_list": [{"model_name": "m", "base_url": fake_openai.url + "/v1"}]},
        proxy_protocol="optional",
    )
    assert hooks.address is not None
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "pp"}]}).encode()
    request = (
        b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8080\r\n"
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", hooks.address.port)
        writer.write(request)
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"Hello from openai: pp" in raw


def image_ca_env(ca: Path, cert_dir: Path) -> dict[str, str]:
    """The image's CA set-up (services/ailb/Dockerfile): no bundle file, a hashed CA directory
    (here one holding only ``ca``, linked by subject hash as update-ca-certificates does)."""
    text = (ROOT / "services" / "ailb" / "Dockerfile").read_text(encoding="utf-8")
    runtime = text.split("\nFROM ")[-1]
    image = dict(re.findall(r"^\s*(SSL_CERT_(?:FILE|DIR))=(\S+)", runtime, re.M))
    assert set(image) == {"SSL_CERT_FILE", "SSL_CERT_DIR"}, image
    subject_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(ca)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    cert_dir.mkdir()
    (cert_dir / f"{subject_hash}.0").symlink_to(ca)
    return {"SSL_CERT_FILE": image["SSL_CERT_FILE"], "SSL_CERT_DIR": str(cert_dir)}


@pytest.mark.integration
@pytest.mark.parametrize("trust", ["bundle", "image"])
async def test_https_upstreams_are_verified(
    tmp_path: Path, procs: ProcessGroup, trust: str
) -> None:
    """Two https upstreams signed by a CA the AILB trusts answer through one shared TLS
    context; one signed by an unknown CA is refused (502), not trusted blindly. The CA is
    trusted either as a bundle (SSL_CERT_FILE) or the way the image trusts CAs: no bundle, a
    hashed CA directory that OpenSSL reads on demand."""
    ca, server_ctx = make_pki(tmp_path / "trusted")
    if trust == "bundle":
        ca_env = {"SSL_CERT_FILE": str(ca)}
    else:
        ca_env = image_ca_env(ca, tmp_path / "certs")
    _, rogue_ctx = make_pki(tmp_path / "rogue", name="rogue")
    fakes = [FakeOpenAI(), FakeOpenAI(), FakeOpenAI()]
    for fake, ctx in zip(fakes, (server_ctx, server_ctx, rogue_ctx), strict=True):
        await fake.start(ssl_context=ctx)
    try:
        config = {
            "model_list": [
                {"model_name": name, "base_url": fake.url + "/v1"}
                for name, fake in zip(("a", "b", "rogue"), fakes, strict=True)
            ]
        }
        cfg = tmp_path / "ailb.yaml"
        cfg.write_text(yaml.safe_dump({"modules": [{"name": "ailb", "config": config}]}))
        port = free_port()
        procs.python(
            "ailb",
            "marchproxy_ailb",
            {
                "CONFIG_FILE": str(cfg),
                "DATA_PORT": str(port),
                "GRPC_PORT": "0",
                "ADMIN_PORT": "0",
                "REGISTER_WITH_NLB": "false",
                "REDIS_URL": "",
                "API_URL": "",
                **ca_env,
            },
        )
        await asyncio.to_thread(wait_port, port)
        url = f"http://127.0.0.1:{port}/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
            for model in ("a", "b", "a"):
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "tls"}]
                )
                assert r.choices[0].message.content == "Hello from openai: tls"
            with pytest.raises(openai.APIStatusError) as exc:
                await client.chat.completions.create(
                    model="rogue", messages=[{"role": "user", "content": "tls"}]
                )
            assert exc.value.status_code == 502
        assert [len(f.requests) for f in fakes] == [2, 1, 0]
    finally:
        for fake in fakes:
            await fake.close()
