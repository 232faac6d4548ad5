"""Login under load: argon2 runs off the event loop in a bounded pool, and the login limiter."""

from __future__ import annotations

import asyncio
import threading

import pytest
from argon2 import PasswordHasher

from marchproxy_api.keys import password_hashing_key

pytestmark = pytest.mark.integration
ADMIN_PASSWORD = "admin-password-for-tests"
#: a safety valve: a hasher blocked on the loop thread would otherwise hang the test forever
GATE_SAFETY_SECONDS = 15.0


class GatedHasher(PasswordHasher):
    """Blocks each verify until the test opens the gate; records where and how many ran."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.threads: set[int] = set()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.threads.add(threading.get_ident())
        try:
            self.gate.wait(GATE_SAFETY_SECONDS)
            return super().verify(hash, password)
        finally:
            with self.lock:
                self.active -= 1


async def test_hashing_runs_off_the_loop_bounded_and_sheds_a_flood(api_factory, pg_url) -> None:
    async with api_factory(pg_url, password_hash_threads=2, password_hash_queue=4) as api:
        gate = threading.Event()
        safety = threading.Timer(GATE_SAFETY_SECONDS, gate.set)
        safety.start()
        hasher = GatedHasher(gate)
        api.app[password_hashing_key].hasher = hasher
        body = {"username": "admin", "password": ADMIN_PASSWORD}
        try:
            logins = [
                asyncio.ensure_future(api.call("POST", "/api/v1/auth/login", body, token=""))
                for _ in range(4)
            ]
            async with asyncio.timeout(10):
                while hasher.active < 2 or api.app[password_hashing_key].inflight < 4:
                    await asyncio.sleep(0.01)
            # two hashes are blocked in their threads: the loop still answers other requests
            status, _ = await api.call("GET", "/healthz", token="")
            assert status == 200
            status, page = await api.call("GET", "/api/v1/modules")
            assert status == 200 and page["total"] == 0
            # the pool is full and the queue too: the next login is shed at once, not queued
            status, shed = await api.call("POST", "/api/v1/auth/login", body, token="")
            assert status == 503 and shed["error"] == "busy"
            assert not gate.is_set(), "the loop was blocked until the safety valve opened"
            gate.set()
            results = await asyncio.gather(*logins)
        finally:
            gate.set()
            safety.cancel()
        assert [status for status, _ in results] == [200] * 4
        assert hasher.max_active == 2
        assert threading.main_thread().ident not in hasher.threads


async def _login(api, username: str, password: str = "wrong-password") -> int:
    body = {"username": username, "password": password}
    status, _ = await api.call("POST", "/api/v1/auth/login", body, token="")
    return status


async def test_one_client_spraying_usernames_is_limited(api_factory, pg_url) -> None:
    async with api_factory(pg_url, login_max_failures=3, login_max_failures_per_client=4) as api:
        assert [await _login(api, f"spray-{i}") for i in range(4)] == [401] * 4
        status, body = await api.call(
            "POST", "/api/v1/auth/login", {"username": "spray-new", "password": "x"}, token=""
        )
        assert status == 429 and body["error"] == "rate_limited"
        # the address is blocked for every username, the right password included, and a
        # success never resets the address bucket
        assert await _login(api, "admin", ADMIN_PASSWORD) == 429


async def test_full_limiter_evicts_the_oldest_entry_only(api_factory, pg_url) -> None:
    async with api_factory(
        pg_url, login_max_failures=2, login_max_failures_per_client=1000, login_max_keys=3
    ) as api:
        assert [await _login(api, "victim") for _ in range(3)] == [401, 401, 429]
        assert await _login(api, "u1") == 401
        assert await _login(api, "u2") == 401  # table full: the oldest entry (victim) goes
        # u1's count survived the eviction: its second failure blocks it
        assert await _login(api, "u1") == 401
        assert await _login(api, "u1") == 429
        # while victim's block went with its entry
        assert await _login(api, "victim") == 401
