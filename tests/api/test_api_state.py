"""Desired state: config_version bumps, Redis key + PUBLISH, retry while Redis is down,
long poll 200/304, ACK/NACK status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from marchproxy_common.state import StateClient

pytestmark = pytest.mark.integration
REDIS_URL = "redis://127.0.0.1:6379/0"
CLUSTER_KEY = "test-cluster-key"


async def _redis_snapshot(r: Redis, prefix: str, comp: str) -> dict | None:
    raw = await r.get(f"{prefix}:state:{comp}")
    return json.loads(raw) if raw else None


async def test_write_publishes_snapshot_and_message(api) -> None:
    prefix = api.settings.state_prefix
    r = Redis.from_url(REDIS_URL)
    pubsub = r.pubsub()
    try:
        await pubsub.subscribe(f"{prefix}:state")
        status, mod = await api.call(
            "POST", "/api/v1/modules", {"name": "alb-pub", "type": "ALB", "version": "1.0.0"}
        )
        assert status == 201
        status, _ = await api.call(
            "POST",
            f"/api/v1/modules/{mod['id']}/routes",
            {
                "name": "r1",
                "match_rules": {"host": "pub.example.com", "path": "/"},
                "backend_config": {"target": "http://127.0.0.1:9"},
                "rate_limit": 50,
            },
        )
        assert status == 201
        async with asyncio.timeout(20):
            while True:
                snap = await _redis_snapshot(r, prefix, "alb")
                if snap and any(x["name"] == "r1" for x in snap["routes"]):
                    break
                await asyncio.sleep(0.02)
        messages: list[str] = []
        async with asyncio.timeout(20):
            while f"alb {snap['version']}" not in messages:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg:
                    messages.append(msg["data"].decode())
        snap = await _redis_snapshot(r, prefix, "alb")
        assert snap is not None and snap["component"] == "alb"
        assert any(m["name"] == "alb-pub" for m in snap["modules"])
        route = next(x for x in snap["routes"] if x["name"] == "r1")
        assert route["module"] == "alb-pub"
        assert route["rate_limit"] == {"requests_per_second": 50.0, "burst": 100}
        assert route["match_rules"]["host"] == "pub.example.com"
        assert route["backend_config"]["target"] == "http://127.0.0.1:9"
        assert snap["deployments"][0]["module"] == "alb-pub"
        nlb = await _redis_snapshot(r, prefix, "nlb")
        assert nlb is not None and "listeners" in nlb and "scaling_policies" in nlb
        alb_versions = [int(m.split()[1]) for m in messages if m.startswith("alb ")]
        assert alb_versions == sorted(alb_versions)
        # the dblb snapshot did not change, so it kept its older version
        dblb = await _redis_snapshot(r, prefix, "dblb")
        assert dblb is not None and dblb["version"] < snap["version"]
    finally:
        await pubsub.aclose()
        await r.aclose()


async def test_long_poll_200_304_and_ack(api) -> None:
    hdr = {"X-Cluster-Api-Key": CLUSTER_KEY}
    status, snap = await api.call(
        "GET", "/api/v1/state/alb?after=0&timeout=0", token="", headers=hdr
    )
    assert status == 200 and snap["component"] == "alb"
    v = snap["version"]
    status, _ = await api.call(
        "GET", f"/api/v1/state/alb?after={v}&timeout=0.2", token="", headers=hdr
    )
    assert status == 304

    async def later_write() -> None:
        await asyncio.sleep(0.3)
        await api.call("POST", "/api/v1/modules", {"name": "alb-lp", "type": "ALB"})

    task = asyncio.ensure_future(later_write())
    status, newer = await api.call(
        "GET", f"/api/v1/state/alb?after={v}&timeout=20", token="", headers=hdr
    )
    await task
    assert status == 200 and newer["version"] > v
    assert any(m["name"] == "alb-lp" for m in newer["modules"])

    status, _ = await api.call(
        "GET", "/api/v1/state/alb", token="", headers={"X-Cluster-Api-Key": "no"}
    )
    assert status == 401
    status, _ = await api.call("GET", "/api/v1/state/bogus", token="", headers=hdr)
    assert status == 404

    ack = {"instance_id": "alb-1", "applied_version": newer["version"]}
    status, body = await api.call("POST", "/api/v1/state/alb/ack", ack, token="", headers=hdr)
    assert status == 200, body
    nack = {
        "instance_id": "alb-2",
        "applied_version": v,
        "rejected_version": newer["version"],
        "reason": "route r9: bad target",
    }
    status, body = await api.call("POST", "/api/v1/state/alb/ack", nack, token="", headers=hdr)
    assert status == 200
    status, st = await api.call("GET", "/api/v1/state/status")
    alb = next(c for c in st["components"] if c["component"] == "alb")
    inst = {i["instance_id"]: i for i in alb["instances"]}
    assert inst["alb-1"]["applied_version"] == newer["version"]
    assert inst["alb-2"]["rejected_version"] == newer["version"]
    assert inst["alb-2"]["reason"] == "route r9: bad target"
    _, hist = await api.call("GET", "/api/v1/modules/registration-history?module=alb")
    events = [(e["event"], e["instance_id"]) for e in hist["items"]]
    assert ("instance_seen", "alb-1") in events and ("config_rejected", "alb-2") in events


async def test_redis_down_write_commits_and_publish_retries(pg_url, api_factory, cut_proxy) -> None:
    proxy = await cut_proxy(6379)
    r = Redis.from_url(REDIS_URL)
    async with api_factory(pg_url, redis_url=f"redis://127.0.0.1:{proxy.port}/0") as api:
        prefix = api.settings.state_prefix
        try:
            await proxy.cut()
            status, _ = await api.call(
                "POST", "/api/v1/modules", {"name": "rtmp-down", "type": "RTMP"}
            )
            assert status == 201
            await asyncio.sleep(0.3)
            snap = await _redis_snapshot(r, prefix, "rtmp")
            assert snap is None or all(m["name"] != "rtmp-down" for m in snap["modules"])
            status, health = await api.call("GET", "/api/v1/system/health")
            assert health["publish_pending"] >= 1
            await proxy.start()
            async with asyncio.timeout(20):
                while True:
                    snap = await _redis_snapshot(r, prefix, "rtmp")
                    if snap and any(m["name"] == "rtmp-down" for m in snap["modules"]):
                        break
                    await asyncio.sleep(0.05)
        finally:
            keys = [k async for k in r.scan_iter(f"{prefix}:*")]
            if keys:
                await r.delete(*keys)
            await r.aclose()


async def test_database_down_answers_503_and_recovers(pg_url, api_factory, cut_proxy) -> None:
    proxy = await cut_proxy(5432)
    url_via_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    async with api_factory(url_via_proxy) as api:
        await proxy.cut()
        status, body = await api.call("GET", "/api/v1/modules")
        assert status == 503, body
        assert body["error"] == "database_unavailable" and "Traceback" not in json.dumps(body)
        status, _ = await api.call("GET", "/readyz")
        assert status == 503
        status, _ = await api.call("GET", "/healthz")
        assert status == 200
        status, body = await api.call(
            "POST", "/api/v1/modules", {"name": "x-db-down", "type": "ALB"}
        )
        assert status == 503
        await proxy.start()
        async with asyncio.timeout(20):
            while (await api.call("GET", "/api/v1/modules"))[0] != 200:
                await asyncio.sleep(0.1)


async def test_concurrent_writes_end_consistent(api) -> None:
    prefix = api.settings.state_prefix
    results = await asyncio.gather(
        *[
            api.call("POST", "/api/v1/modules", {"name": f"cc-{i}", "type": "ALB"})
            for i in range(20)
        ]
    )
    assert all(status == 201 for status, _ in results)
    _, st = await api.call("GET", "/api/v1/state/status")
    alb = next(c for c in st["components"] if c["component"] == "alb")
    r = Redis.from_url(REDIS_URL)
    try:
        async with asyncio.timeout(20):
            while True:
                snap = await _redis_snapshot(r, prefix, "alb")
                if snap and snap["version"] == alb["version"]:
                    break
                await asyncio.sleep(0.05)
        names = {m["name"] for m in snap["modules"]}
        assert {f"cc-{i}" for i in range(20)} <= names
    finally:
        await r.aclose()


async def test_long_poll_sees_writes_made_by_another_replica(pg_url, api_factory) -> None:
    async with api_factory(pg_url) as a, api_factory(pg_url, redis_url="") as b:
        hdr = {"X-Cluster-Api-Key": CLUSTER_KEY}
        status, snap = await b.call(
            "GET", "/api/v1/state/ailb?after=0&timeout=0", token="", headers=hdr
        )
        assert status == 200
        v = snap["version"]

        async def later_write() -> None:
            await asyncio.sleep(0.3)
            status, _ = await a.call(
                "POST", "/api/v1/modules", {"name": "ailb-rep", "type": "AILB"}
            )
            assert status == 201

        task = asyncio.ensure_future(later_write())
        status, newer = await b.call(
            "GET", f"/api/v1/state/ailb?after={v}&timeout=20", token="", headers=hdr
        )
        await task
        assert status == 200 and newer["version"] > v
        assert any(m["name"] == "ailb-rep" for m in newer["modules"])


async def _wait_redis_version(r: Redis, prefix: str, comp: str, version: int) -> dict:
    async with asyncio.timeout(20):
        while True:
            try:
                snap = await _redis_snapshot(r, prefix, comp)
            except (RedisError, OSError):
                snap = None
            if snap is not None and snap["version"] >= version:
                return snap
            await asyncio.sleep(0.05)


async def test_snapshots_republished_after_redis_loses_them(
    pg_url, api_factory, private_redis
) -> None:
    """Redis flushed, then restarted empty (no persistence): the API publishes every snapshot
    again by itself, and a data plane that starts afterwards gets its state from Redis."""
    async with api_factory(pg_url, redis_url=private_redis.url, state_check_interval=0.2) as api:
        prefix = api.settings.state_prefix
        status, _ = await api.call("POST", "/api/v1/modules", {"name": "flush-alb", "type": "ALB"})
        assert status == 201
        _, st = await api.call("GET", "/api/v1/state/status")
        versions = {c["component"]: c["version"] for c in st["components"]}
        r = Redis.from_url(private_redis.url)
        try:
            for comp, version in versions.items():
                await _wait_redis_version(r, prefix, comp, version)
            await r.flushall()
            for comp, version in versions.items():
                snap = await _wait_redis_version(r, prefix, comp, version)
                assert snap["version"] == version
                assert snap["component"] == comp
                if comp in ("alb", "nlb"):
                    assert "flush-alb" in [m["name"] for m in snap["modules"]]
        finally:
            await r.aclose()

        private_redis.stop()
        private_redis.start()  # same port, empty
        later = StateClient(
            "alb", _accept, redis_url=private_redis.url, prefix=prefix, poll_timeout=1
        )
        await later.start()
        try:
            async with asyncio.timeout(20):
                await later.wait_for_version(versions["alb"])
            assert later.applied_version == versions["alb"] and later.source == "redis"
        finally:
            await later.stop()
        _, text = await api.call("GET", "/metrics", token="")
        assert 'marchproxy_api_state_republishes_total{reason="missing"}' in text


async def _accept(snapshot: Mapping[str, Any]) -> list[str]:
    return []
