"""Usage accounting that survives client disconnects, slow disks and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marchproxy_ailb.usage_log import add_record, replay
from tests.ailb.conftest import AilbFactory, base_url
from tests.ailb.fakes import FakeAnthropic, FakeOpenAI, HoldingTcpProxy
from tests.conftest import ProcessGroup, free_port, wait_port

MSG = [{"role": "user", "content": "hi"}]
KEY = "sk-usage-secret"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux fcntl(2)


def usage_config(fake: FakeOpenAI, **key: Any) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "m",
                "base_url": fake.url + "/v1",
                "price": {"input": 1.0, "output": 1.0},
            }
        ],
        "keys": [{"key_hash": KEY_HASH, "name": "user-key", **key}],
    }


@pytest.fixture
async def held_redis(redis_prefix: tuple[Any, str]) -> AsyncIterator[tuple[HoldingTcpProxy, Any]]:
    """A Redis client that talks to the machine's Redis through a proxy that can hold bytes."""
    proxy = await HoldingTcpProxy(6379).start()
    client = aioredis.from_url(proxy.url)
    try:
        yield proxy, client
    finally:
        proxy.release()
        await client.aclose()
        await proxy.close()


@pytest.mark.integration
async def test_non_stream_usage_is_kept_when_the_client_leaves(
    ailb: AilbFactory,
    fake_openai: FakeOpenAI,
    redis_prefix: tuple[Any, str],
    held_redis: tuple[HoldingTcpProxy, Any],
) -> None:
    """The upstream answered, then the client went away while the gateway was recording the
    usage: the record, the TPM tokens and the budget release still happen, and the deployment
    is no longer counted in flight."""
    direct, prefix = redis_prefix
    proxy, client = held_redis
    hooks = await ailb.start(
        usage_config(fake_openai, tpm=100_000, budget=100.0), redis=client, ailb_redis_prefix=prefix
    )
    fake_openai.delay(0.3)  # time to start holding Redis once the request is upstream
    async with httpx.AsyncClient() as http:
        request = asyncio.ensure_future(
            http.post(
                base_url(hooks) + "/chat/completions",
                json={"model": "m", "messages": MSG, "max_tokens": 10},
                headers={"Authorization": f"Bearer {KEY}"},
            )
        )
        async with asyncio.timeout(10):
            while not fake_openai.requests:
                await asyncio.sleep(0.01)
            proxy.hold()  # the answer's usage record will now wait in the proxy
            await proxy.got_held.wait()
            request.cancel()  # ... and the client leaves meanwhile
            with contextlib.suppress(asyncio.CancelledError):
                await request
            while hooks.gateway.active:  # the gateway saw the disconnect
                await asyncio.sleep(0.01)
    proxy.release()
    async with asyncio.timeout(10):
        while True:
            totals = await direct.hgetall(prefix + "usage:user-key")
            if totals.get(b"requests") == b"1":
                break
            await asyncio.sleep(0.02)
        while hooks.status()["groups"]["m"][0]["in_flight"]:
            await asyncio.sleep(0.02)
        while await direct.zcard(prefix + "budget:user-key:leases"):
            await asyncio.sleep(0.02)
    assert int(totals[b"prompt_tokens"]) == 10
    assert int(totals[b"completion_tokens"]) == 4
    tok_keys = [k async for k in direct.scan_iter(match=prefix + "rl:user-key:tok:*")]
    assert tok_keys and int(await direct.get(tok_keys[0])) == 14
    assert int(await direct.get(prefix + "budget:user-key:held") or 0) == 0


def _read_fifo(fd: int) -> bytes | None:
    """What the pipe holds now (b"" = nothing yet), or None at EOF (every writer closed)."""
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""
    return data if data else None


@pytest.mark.integration
async def test_stalled_usage_log_does_not_stall_requests_and_flushes_on_shutdown(
    tmp_path: Path, procs: ProcessGroup, fake_openai: FakeOpenAI, redis_prefix: tuple[Any, str]
) -> None:
    """The usage log is a pipe nobody reads (a disk that stopped answering): requests are
    still answered, and on SIGTERM every queued record is written before the process exits."""
    log = tmp_path / "usage.fifo"
    os.mkfifo(log)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)  # ~16 records fill it
        cfg = tmp_path / "ailb.yaml"
        cfg.write_text(
            yaml.safe_dump({"modules": [{"name": "ailb", "config": usage_config(fake_openai)}]})
        )
        port = free_port()
        proc = procs.python(
            "ailb",
            "marchproxy_ailb",
            {
                "CONFIG_FILE": str(cfg),
                "DATA_PORT": str(port),
                "GRPC_PORT": "0",
                "ADMIN_PORT": "0",
                "REGISTER_WITH_NLB": "false",
                "API_URL": "",
                "REDIS_URL": "redis://127.0.0.1:6379/0",
                "AILB_REDIS_PREFIX": redis_prefix[1],
                "AILB_USAGE_LOG": str(log),
                "DRAIN_TIMEOUT": "2",
            },
        )
        await asyncio.to_thread(wait_port, port)
        n = 60
        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(n):
                r = await http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                assert r.status_code == 200, i
        proc.signal(signal.SIGTERM)  # most records are still queued behind the full pipe
        data = b""
        async with asyncio.timeout(30):
            while (chunk := _read_fifo(reader)) is not None:
                data += chunk
                if not chunk:
                    await asyncio.sleep(0.02)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        os.close(reader)
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert len(records) == n
    assert [r["key_id"] for r in records] == ["user-key"] * n
    assert sum(r["prompt_tokens"] for r in records) == 10 * n


async def test_usage_log_rotates_with_a_checkpoint(
    ailb: AilbFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A rotated log keeps its totals: the new file starts with a checkpoint, old files past
    the backup count are deleted, and a restart from the current file alone is exact."""
    log = tmp_path / "usage.jsonl"
    opts = {
        "ailb_usage_log": str(log),
        "ailb_usage_log_max_bytes": 1024,
        "ailb_usage_log_backups": 2,
    }
    first = await ailb.start(usage_config(fake_openai), **opts)
    async with openai.AsyncOpenAI(base_url=base_url(first), api_key=KEY, max_retries=0) as c:
        for i in range(30):  # ~250 bytes a record: several rotations
            await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"{i}"}]
            )
    expected = await first.usage.totals("user-key")
    assert expected["requests"] == 30
    await ailb.stop(first)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2"]
    head = json.loads(log.read_text().splitlines()[0])
    assert "checkpoint" in head
    second = await ailb.start(usage_config(fake_openai), **opts)
    assert await second.usage.totals("user-key") == expected
    assert expected["cost_nusd"] == 30 * 14_000  # 10 + 4 tokens at 1 USD per million


@pytest.mark.integration
async def test_usage_log_restores_totals_redis_lost(
    ailb: AilbFactory, fake_openai: FakeOpenAI, tmp_path: Path, redis_prefix: tuple[Any, str]
) -> None:
    """Redis lost its data (flush, failover to an empty replica): at start the totals of keys
    Redis has none for come back from the usage log; keys Redis still has are left alone."""
    client, prefix = redis_prefix
    log = str(tmp_path / "usage.jsonl")
    first = await ailb.start(
        usage_config(fake_openai), redis=client, ailb_redis_prefix=prefix, ailb_usage_log=log
    )
    async with openai.AsyncOpenAI(base_url=base_url(first), api_key=KEY, max_retries=0) as c:
        for _ in range(3):
            await c.chat.completions.create(model="m", messages=MSG)
    expected = await first.usage.totals("user-key")
    await ailb.stop(first)
    await client.delete(prefix + "usage:user-key")  # Redis forgot
    second = await ailb.start(
        usage_config(fake_openai), redis=client, ailb_redis_prefix=prefix, ailb_usage_log=log
    )
    assert await second.usage.totals("user-key") == expected
    await ailb.stop(second)
    third = await ailb.start(
        usage_config(fake_openai), redis=client, ailb_redis_prefix=prefix, ailb_usage_log=log
    )
    assert await third.usage.totals("user-key") == expected  # not counted twice


FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_nusd")
_record = st.fixed_dictionaries(
    {
        "key_id": st.sampled_from(["a", "b", "c"]),
        "prompt_tokens": st.integers(0, 10**6),
        "completion_tokens": st.integers(0, 10**6),
        "cost_nusd": st.integers(0, 10**12),
    }
)


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(_record, max_size=30),
    checkpoint_at=st.integers(0, 30),
    torn=st.integers(0, 60),
)
def test_replay_checkpoint_and_torn_tail(
    tmp_path: Path, records: list[dict[str, Any]], checkpoint_at: int, torn: int
) -> None:
    """A log is a checkpoint (the totals so far) somewhere, records around it and maybe a
    line cut short by a crash: replaying it gives the totals of every complete record."""
    expected: dict[str, dict[str, int]] = {}
    lines = []
    for i, rec in enumerate(records):
        if i == checkpoint_at:
            lines = [json.dumps({"checkpoint": expected})]  # rotation: older lines are gone
        add_record(expected, FIELDS, rec)
        lines.append(json.dumps(rec))
        expected = json.loads(json.dumps(expected))  # the checkpoint above is a snapshot
    tail = json.dumps({"key_id": "a", "prompt_tokens": 7})[: torn % 30]
    path = tmp_path / f"replay-{uuid.uuid4().hex}.jsonl"
    path.write_text("".join(line + "\n" for line in lines) + tail)
    assert replay(str(path), FIELDS) == expected


def anthropic_priced(fake: FakeAnthropic, **price: float) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "claude",
                "provider": "anthropic",
                "base_url": fake.url,
                "api_key": "k",
                "model": "claude-x",
                "price": {"input": 2.0, "cached_input": 0.2, "output": 4.0, **price},
            }
        ],
        "keys": [{"key_hash": KEY_HASH, "name": "user-key"}],
    }


@pytest.mark.parametrize(
    ("price", "per_call"),
    [
        # 10 plain x 2 + 4 read x 0.2 + 6 written x 2.5 (1.25 x input) + 4 out x 4 = 51.8
        ({}, 51_800),
        # an explicit cache-write price (Anthropic's 1-hour cache: 2 x input)
        ({"cache_write_input": 4.0}, 60_800),
    ],
    ids=["default-1.25x", "explicit"],
)
async def test_anthropic_cache_writes_are_priced_and_counted(
    ailb: AilbFactory, fake_anthropic: FakeAnthropic, price: dict[str, float], per_call: int
) -> None:
    fake_anthropic.cached_tokens = 4
    fake_anthropic.cache_write_tokens = 6
    hooks = await ailb.start(anthropic_priced(fake_anthropic, **price))
    async with openai.AsyncOpenAI(base_url=base_url(hooks), api_key=KEY, max_retries=0) as c:
        r = await c.chat.completions.create(model="claude", messages=MSG)
        assert r.usage is not None
        assert r.usage.prompt_tokens == 20  # plain + cache reads + cache writes
        assert r.usage.prompt_tokens_details is not None
        assert r.usage.prompt_tokens_details.cached_tokens == 4
        assert (r.usage.model_extra or {})["cache_creation_input_tokens"] == 6
        stream = await c.chat.completions.create(
            model="claude", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        usage = [ch.usage async for ch in stream if ch.usage is not None]
        assert usage and (usage[-1].model_extra or {})["cache_creation_input_tokens"] == 6
    async with httpx.AsyncClient() as http:
        info = (
            await http.get(
                base_url(hooks) + "/key/info", headers={"Authorization": f"Bearer {KEY}"}
            )
        ).json()
    assert info["usage"]["cache_write_tokens"] == 12
    assert info["usage"]["cached_tokens"] == 8
    assert info["usage"]["prompt_tokens"] == 40
    assert info["usage"]["cost_nusd"] == 2 * per_call
