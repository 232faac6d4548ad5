"""RTMP handshake (RTMP spec 1.0 section 5.2), server and client side, sans-IO.

C0/S0 is one version byte (3). C1/S1 and C2/S2 are 1536 bytes each. The *simple* handshake
echoes the peer's C1 as S2. Flash-era clients (and ffmpeg) send a C1 that carries an HMAC-SHA256
digest keyed with "Genuine Adobe Flash Player 001" at a position derived from the packet itself
(scheme 0: offset base 8, scheme 1: offset base 772). When such a digest validates, the server
answers with the matching *digest* handshake: an S1 imprinted with a digest keyed by the FMS key
and an S2 whose last 32 bytes are an HMAC of the rest keyed by HMAC(FMS key, client digest).
Clients that validate the server (ffmpeg does when the S1 version field is >= 3) need that.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable

from marchproxy_common.wire.rtmp.errors import RtmpProtocolError

RTMP_VERSION = 3  # RTMP spec 5.2.2: C0/S0 version
HANDSHAKE_SIZE = 1536  # RTMP spec 5.2.3: C1/S1/C2/S2 length
DIGEST_SIZE = 32  # HMAC-SHA256 length

_KEY_TAIL = bytes(
    [
        0xF0, 0xEE, 0xC2, 0x4A, 0x80, 0x68, 0xBE, 0xE8, 0x2E, 0x00, 0xD0, 0xD1, 0x02, 0x9E, 0x7E,
        0x57, 0x6E, 0xEC, 0x5D, 0x2D, 0x29, 0x80, 0x6F, 0xAB, 0x93, 0xB8, 0xE6, 0x36, 0xCF, 0xEB,
        0x31, 0xAE,
    ]
)  # fmt: skip
GENUINE_FP_KEY = b"Genuine Adobe Flash Player 001" + _KEY_TAIL  # 62 bytes, first 30 for C1
GENUINE_FMS_KEY = b"Genuine Adobe Flash Media Server 001" + _KEY_TAIL  # 68 bytes, first 36 for S1
_FP_KEY_SHORT = GENUINE_FP_KEY[:30]
_FMS_KEY_SHORT = GENUINE_FMS_KEY[:36]
#: the version we put in a digest S1 (what nginx-rtmp announces, FMS 3.5-ish)
SERVER_DIGEST_VERSION = bytes([0x0D, 0x0E, 0x0A, 0x0D])

RandomFn = Callable[[int], bytes]


def digest_offset(packet: bytes, base: int) -> int:
    """Where the digest starts for scheme ``base`` (8 or 772): sum of 4 bytes mod 728 + base + 4."""
    total = packet[base] + packet[base + 1] + packet[base + 2] + packet[base + 3]
    return total % 728 + base + 4


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _digest_at(packet: bytes, pos: int, key: bytes) -> bytes:
    return _hmac(key, packet[:pos] + packet[pos + DIGEST_SIZE :])


def find_client_digest(c1: bytes) -> bytes | None:
    """The client digest of a Flash-style C1 (scheme 0 or 1), or None for a simple C1."""
    if len(c1) != HANDSHAKE_SIZE:
        return None
    for base in (8, 772):
        pos = digest_offset(c1, base)
        digest = c1[pos : pos + DIGEST_SIZE]
        if hmac.compare_digest(_digest_at(c1, pos, _FP_KEY_SHORT), digest):
            return digest
    return None


def imprint_digest(packet: bytearray, key: bytes, base: int = 8) -> bytes:
    """Write the digest of ``packet`` (scheme ``base``) into it and return the digest."""
    pos = digest_offset(bytes(packet), base)
    digest = _digest_at(bytes(packet), pos, key)
    packet[pos : pos + DIGEST_SIZE] = digest
    return digest


def make_digest_s1(random: RandomFn = os.urandom) -> bytes:
    s1 = bytearray(bytes(4) + SERVER_DIGEST_VERSION + random(HANDSHAKE_SIZE - 8))
    imprint_digest(s1, _FMS_KEY_SHORT, 8)
    return bytes(s1)


def make_digest_s2(client_digest: bytes, random: RandomFn = os.urandom) -> bytes:
    body = random(HANDSHAKE_SIZE - DIGEST_SIZE)
    key = _hmac(GENUINE_FMS_KEY, client_digest)
    return body + _hmac(key, body)


def make_digest_c1(random: RandomFn = os.urandom) -> bytes:
    """A Flash-style C1 (scheme 0), as ffmpeg and Flash Player send."""
    c1 = bytearray(bytes(4) + bytes([0x80, 0x00, 0x07, 0x02]) + random(HANDSHAKE_SIZE - 8))
    imprint_digest(c1, _FP_KEY_SHORT, 8)
    return bytes(c1)


def validate_digest_s2(s2: bytes, client_digest: bytes) -> bool:
    """What a validating client checks: S2's tail is HMAC(HMAC(FMS key, C1 digest), S2 head)."""
    key = _hmac(GENUINE_FMS_KEY, client_digest)
    head, tail = s2[: HANDSHAKE_SIZE - DIGEST_SIZE], s2[HANDSHAKE_SIZE - DIGEST_SIZE :]
    return hmac.compare_digest(_hmac(key, head), tail)


class HandshakeState(enum.Enum):
    WAIT_C0C1 = "wait_c0c1"
    WAIT_C2 = "wait_c2"
    WAIT_S0S1S2 = "wait_s0s1s2"
    DONE = "done"


class ServerHandshake:
    """Feed client bytes; get bytes to send. After DONE, ``feed`` returns the leftover input
    (the first chunk-stream bytes) through :attr:`leftover`."""

    def __init__(self, *, random: RandomFn = os.urandom) -> None:
        self._random = random
        self._buf = bytearray()
        self.state = HandshakeState.WAIT_C0C1
        self.leftover = b""
        self.client_digest: bytes | None = None

    @property
    def done(self) -> bool:
        return self.state is HandshakeState.DONE

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the bytes to write to the client (maybe empty)."""
        if self.state is HandshakeState.DONE:
            raise RtmpProtocolError("handshake already complete")
        self._buf += data
        out = b""
        if self.state is HandshakeState.WAIT_C0C1:
            if not self._buf:
                return out
            if self._buf[0] != RTMP_VERSION:
                raise RtmpProtocolError(f"unsupported RTMP version {self._buf[0]}")
            if len(self._buf) < 1 + HANDSHAKE_SIZE:
                return out
            c1 = bytes(self._buf[1 : 1 + HANDSHAKE_SIZE])
            del self._buf[: 1 + HANDSHAKE_SIZE]
            self.client_digest = find_client_digest(c1)
            if self.client_digest is not None:
                s1 = make_digest_s1(self._random)
                s2 = make_digest_s2(self.client_digest, self._random)
            else:
                s1 = bytes(8) + self._random(HANDSHAKE_SIZE - 8)
                s2 = c1
            out = bytes([RTMP_VERSION]) + s1 + s2
            self.state = HandshakeState.WAIT_C2
        if self.state is HandshakeState.WAIT_C2 and len(self._buf) >= HANDSHAKE_SIZE:
            # C2 should echo S1; clients differ (digest clients send an HMAC), so we don't check.
            del self._buf[:HANDSHAKE_SIZE]
            self.leftover = bytes(self._buf)
            self._buf.clear()
            self.state = HandshakeState.DONE
        return out


class ClientHandshake:
    """The client side (simple handshake by default, digest C1 if asked)."""

    def __init__(self, *, digest: bool = False, random: RandomFn = os.urandom) -> None:
        self._buf = bytearray()
        self.state = HandshakeState.WAIT_S0S1S2
        self.leftover = b""
        if digest:
            self._c1 = make_digest_c1(random)
        else:
            self._c1 = bytes(8) + random(HANDSHAKE_SIZE - 8)

    @property
    def done(self) -> bool:
        return self.state is HandshakeState.DONE

    def initial(self) -> bytes:
        """C0 + C1, sent as soon as the connection is up."""
        return bytes([RTMP_VERSION]) + self._c1

    def feed(self, data: bytes) -> bytes:
        """Consume server bytes; return C2 once S0+S1+S2 arrived."""
        if self.state is HandshakeState.DONE:
            raise RtmpProtocolError("handshake already complete")
        self._buf += data
        if self._buf and self._buf[0] != RTMP_VERSION:
            raise RtmpProtocolError(f"unsupported RTMP version {self._buf[0]}")
        if len(self._buf) < 1 + 2 * HANDSHAKE_SIZE:
            return b""
        s1 = bytes(self._buf[1 : 1 + HANDSHAKE_SIZE])
        self.leftover = bytes(self._buf[1 + 2 * HANDSHAKE_SIZE :])
        self._buf.clear()
        self.state = HandshakeState.DONE
        return s1  # C2 echoes S1 (simple handshake; digest servers accept it too)
