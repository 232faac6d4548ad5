"""MySQL password scrambles: mysql_native_password and caching_sha2_password (fast path)."""

from __future__ import annotations

import hashlib
import hmac

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
SCRAMBLE_LEN = 20


def native_scramble(password: str, salt: bytes) -> bytes:
    """SHA1(pw) XOR SHA1(salt + SHA1(SHA1(pw))); empty password -> empty token."""
    if not password:
        return b""
    h1 = hashlib.sha1(password.encode("utf-8")).digest()
    h2 = hashlib.sha1(h1).digest()
    h3 = hashlib.sha1(salt[:SCRAMBLE_LEN] + h2).digest()
    return bytes(a ^ b for a, b in zip(h1, h3, strict=True))


def native_verify(password: str, salt: bytes, token: bytes) -> bool:
    return hmac.compare_digest(native_scramble(password, salt), token)


def caching_sha2_scramble(password: str, salt: bytes) -> bytes:
    """XOR(SHA256(pw), SHA256(SHA256(SHA256(pw)) + salt))."""
    if not password:
        return b""
    p1 = hashlib.sha256(password.encode("utf-8")).digest()
    p2 = hashlib.sha256(p1).digest()
    p3 = hashlib.sha256(p2 + salt[:SCRAMBLE_LEN]).digest()
    return bytes(a ^ b for a, b in zip(p1, p3, strict=True))


def scramble_for(plugin: str, password: str, salt: bytes) -> bytes | None:
    if plugin == NATIVE:
        return native_scramble(password, salt)
    if plugin == CACHING_SHA2:
        return caching_sha2_scramble(password, salt)
    return None
