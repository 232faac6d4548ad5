"""Passwords (argon2), JWT access/refresh tokens (pyjwt), roles and the login rate limit."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

JWT_ALGORITHM = "HS256"
JWT_LEEWAY_SECONDS = 5
_hasher = PasswordHasher()
#: verified against when the user does not exist, so timing does not reveal usernames
_DUMMY_HASH = _hasher.hash("marchproxy-no-such-user")


class Role(IntEnum):
    """Ordered: a higher role may do everything a lower one may."""

    viewer = 1
    operator = 2
    admin = 3


class AuthError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    user_id: int | None = None
    is_cluster: bool = False


CLUSTER_PRINCIPAL = Principal(name="cluster", role=Role.viewer, is_cluster=True)


class HashingBusy(Exception):
    """Too many password hashes are queued; the caller answers 503 with Retry-After."""


class PasswordHashing:
    """argon2 off the event loop: ~100-200 ms of CPU per call must never stall other requests.

    Work runs on a small pool of its own (not the loop's default executor, which DNS lookups
    share), so at most ``threads`` hashes run at once even when callers are cancelled; at most
    ``max_queue`` may be running or waiting, and beyond that :class:`HashingBusy` is raised at
    once instead of letting a login flood queue without bound.
    """

    def __init__(self, threads: int, max_queue: int, hasher: PasswordHasher | None = None):
        self.hasher = hasher or _hasher
        self.threads = threads
        self.max_queue = max(max_queue, threads)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._inflight >= self.max_queue:
            raise HashingBusy
        self._inflight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._inflight -= 1

    async def hash(self, password: str) -> str:
        return str(await self._run(self.hasher.hash, password))

    async def verify(self, password_hash: str | None, password: str) -> bool:
        return bool(await self._run(_verify_with, self.hasher, password_hash, password))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _verify_with(hasher: PasswordHasher, password_hash: str | None, password: str) -> bool:
    try:
        return hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def keys_equal(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def issue_token(
    secret: str, *, user_id: int, username: str, role: str, kind: str, ttl_seconds: float
) -> str:
    now = int(time.time())
    claims = {
        "sub": str(user_id),
        "name": username,
        "role": role,
        "typ": kind,
        "iat": now,
        "exp": now + int(ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def decode_token(secret: str, token: str, kind: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            leeway=JWT_LEEWAY_SECONDS,
            options={"require": ["exp", "sub", "typ", "role"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError:
        raise AuthError("invalid token") from None
    if claims.get("typ") != kind:
        raise AuthError(f"not a {kind} token")
    if claims.get("role") not in Role.__members__:
        raise AuthError("invalid token role")
    return claims


@dataclass
class LoginLimiter:
    """Fixed-window counts of failed logins in two buckets: per (username, client address),
    so one account cannot be guessed at, and per client address over every username, so one
    client cannot spray many usernames. Either bucket over its limit blocks until its window
    ends; a successful login clears only the first, so a known account cannot be used to
    reset the address bucket. At ``max_keys`` entries the least recently failed is evicted."""

    max_failures: int
    window: float
    max_failures_per_client: int = 50
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 100_000
    _fails: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)

    @staticmethod
    def _keys(username: str, client: str) -> tuple[str, str]:
        return f"u|{client}|{username}", f"c|{client}"

    def _left(self, key: str, limit: int) -> float:
        entry = self._fails.get(key)
        if entry is None:
            return 0.0
        start, count = entry
        left = start + self.window - self.clock()
        if left <= 0:
            del self._fails[key]
            return 0.0
        return left if count >= limit else 0.0

    def retry_after(self, username: str, client: str) -> float:
        """Seconds until ``username`` from ``client`` may try again, 0 when allowed now."""
        user_key, client_key = self._keys(username, client)
        return max(
            self._left(user_key, self.max_failures),
            self._left(client_key, self.max_failures_per_client),
        )

    def _count(self, key: str) -> None:
        now = self.clock()
        start, count = self._fails.pop(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        while len(self._fails) >= self.max_keys:
            self._fails.popitem(last=False)
        self._fails[key] = (start, count + 1)

    def failed(self, username: str, client: str) -> None:
        for key in self._keys(username, client):
            self._count(key)

    def succeeded(self, username: str, client: str) -> None:
        self._fails.pop(self._keys(username, client)[0], None)

    def __len__(self) -> int:
        return len(self._fails)
