"""Password authentication helpers: md5 and SCRAM-SHA-256 (RFC 5802, RFC 7677), both as the
client (proxy -> server) and as the server (client -> proxy). No channel binding (no TLS here).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .errors import RemoteProtocolError

SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_DEFAULT_ITERATIONS = 4096  # Postgres' scram_iterations default
SCRAM_NONCE_BYTES = 18  # Postgres' SCRAM_RAW_NONCE_LEN
SCRAM_SALT_BYTES = 16  # Postgres' SCRAM_DEFAULT_SALT_LEN
#: Refuse absurd iteration counts from a server (CPU exhaustion); Postgres caps at INT_MAX.
SCRAM_MAX_ITERATIONS = 1_000_000
_GS2_HEADER = "n,,"


def md5_hash(user: str, password: str) -> str:
    """The value Postgres stores for md5 auth: 'md5' + md5(password || user)."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


def md5_response(user: str, secret: str, salt: bytes) -> str:
    """Answer to AuthenticationMD5Password; ``secret`` is a password or an 'md5…' hash."""
    stored = secret if _is_md5_hash(secret) else md5_hash(user, secret)
    return "md5" + hashlib.md5(stored[3:].encode("ascii") + salt).hexdigest()


def _is_md5_hash(secret: str) -> bool:
    return len(secret) == 35 and secret.startswith("md5")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise RemoteProtocolError("invalid base64 in SCRAM message", sqlstate="28000") from exc


def _attrs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise RemoteProtocolError("malformed SCRAM attribute", sqlstate="28000")
        out[part[0]] = part[2:]
    return out


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(
        cls, password: str, *, salt: bytes | None = None, iterations: int = SCRAM_DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        salt = salt if salt is not None else secrets.token_bytes(SCRAM_SALT_BYTES)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(
            iterations,
            salt,
            hashlib.sha256(client_key).digest(),
            _hmac(salted, b"Server Key"),
        )

    @classmethod
    def parse(cls, text: str) -> ScramVerifier | None:
        """Postgres' stored form: SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>."""
        try:
            mech, iter_salt, keys = text.split("$")
            iterations, salt = iter_salt.split(":")
            stored, server = keys.split(":")
            if mech != SCRAM_MECHANISM:
                return None
            return cls(
                int(iterations),
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
            )
        except ValueError:
            return None

    def __str__(self) -> str:
        return (
            f"{SCRAM_MECHANISM}${self.iterations}:{_b64(self.salt)}$"
            f"{_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


class ScramServer:
    """Verify a client: feed client-first, answer server-first, verify client-final."""

    def __init__(self, verifier: ScramVerifier, *, nonce: str | None = None) -> None:
        self._v = verifier
        self._nonce_extra = nonce or _b64(secrets.token_bytes(SCRAM_NONCE_BYTES))
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._gs2 = ""
        #: the client's ClientKey, recovered from a valid proof: with the verifier's ServerKey
        #: it lets a proxy log in to a server holding the same verifier (SCRAM pass-through)
        self.client_key: bytes | None = None

    def server_first(self, client_first: bytes) -> bytes:
        text = _decode(client_first)
        if text.startswith("p="):
            raise RemoteProtocolError("channel binding is not supported", sqlstate="28000")
        if not (text.startswith("n,") or text.startswith("y,")):
            raise RemoteProtocolError("malformed SCRAM client-first message", sqlstate="28000")
        first_comma = text.index(",")
        second = text.find(",", first_comma + 1)
        if second < 0:
            raise RemoteProtocolError("malformed SCRAM client-first message", sqlstate="28000")
        self._gs2 = text[: second + 1]
        self._client_first_bare = text[second + 1 :]
        attrs = _attrs(self._client_first_bare)
        client_nonce = attrs.get("r", "")
        if not client_nonce:
            raise RemoteProtocolError("SCRAM client nonce missing", sqlstate="28000")
        self._nonce = client_nonce + self._nonce_extra
        self._server_first = f"r={self._nonce},s={_b64(self._v.salt)},i={self._v.iterations}"
        return self._server_first.encode("ascii")

    def verify_final(self, client_final: bytes) -> bytes:
        """Check the proof; return server-final. Raises (28P01) when the password is wrong."""
        text = _decode(client_final)
        without_proof, sep, proof_part = text.rpartition(",p=")
        if not sep:
            raise RemoteProtocolError("SCRAM proof missing", sqlstate="28000")
        attrs = _attrs(without_proof)
        if attrs.get("c") != _b64(self._gs2.encode("ascii")) or attrs.get("r") != self._nonce:
            raise RemoteProtocolError("SCRAM channel binding or nonce mismatch", sqlstate="28000")
        proof = _unb64(proof_part)
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        signature = _hmac(self._v.stored_key, auth_message.encode("utf-8"))
        if len(proof) != len(signature):
            raise RemoteProtocolError("password authentication failed", sqlstate="28P01")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._v.stored_key):
            raise RemoteProtocolError("password authentication failed", sqlstate="28P01")
        self.client_key = client_key
        server_sig = _hmac(self._v.server_key, auth_message.encode("utf-8"))
        return f"v={_b64(server_sig)}".encode("ascii")


class ScramClient:
    """Authenticate to a server: client_first() -> client_final(server_first) -> verify."""

    def __init__(
        self,
        password: str,
        *,
        nonce: str | None = None,
        username: str = "",
        keys: tuple[bytes, bytes] | None = None,
    ) -> None:
        """``username`` goes into client-first; Postgres ignores it (the startup packet names
        the user), so the default is empty, as libpq sends. ``keys`` = (ClientKey, ServerKey)
        replace the password (SCRAM pass-through): they are what the salted password would
        give for the server's own salt and iteration count."""
        self._password = password
        self._keys = keys
        self._client_nonce = nonce or _b64(secrets.token_bytes(SCRAM_NONCE_BYTES))
        saslname = username.replace("=", "=3D").replace(",", "=2C")  # RFC 5802 section 5.1
        self._client_first_bare = f"n={saslname},r={self._client_nonce}"
        self._server_sig = b""

    def client_first(self) -> bytes:
        return (_GS2_HEADER + self._client_first_bare).encode("ascii")

    def client_final(self, server_first: bytes) -> bytes:
        text = _decode(server_first)
        attrs = _attrs(text)
        nonce, salt_text, iter_text = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise RemoteProtocolError("SCRAM server nonce mismatch", sqlstate="28000")
        try:
            iterations = int(iter_text)
        except ValueError as exc:
            raise RemoteProtocolError("bad SCRAM iteration count", sqlstate="28000") from exc
        if not 1 <= iterations <= SCRAM_MAX_ITERATIONS:
            raise RemoteProtocolError("SCRAM iteration count out of range", sqlstate="28000")
        salt = _unb64(salt_text)
        if self._keys is not None:
            client_key, server_key = self._keys
        else:
            password = self._password.encode("utf-8")
            salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
            client_key = _hmac(salted, b"Client Key")
            server_key = _hmac(salted, b"Server Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={_b64(_GS2_HEADER.encode('ascii'))},r={nonce}"
        auth_message = ",".join((self._client_first_bare, text, without_proof)).encode("utf-8")
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_sig = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        attrs = _attrs(_decode(server_final))
        if "e" in attrs:
            raise RemoteProtocolError(f"SCRAM error from server: {attrs['e']}", sqlstate="28000")
        if not hmac.compare_digest(_unb64(attrs.get("v", "")), self._server_sig):
            raise RemoteProtocolError("SCRAM server signature mismatch", sqlstate="28000")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("invalid UTF-8 in SCRAM message", sqlstate="28000") from exc
