"""PROXY protocol v1 and v2 (HAProxy spec, "The PROXY protocol", versions 1 & 2), sans-IO.

API (stable; the NLB and every module use it):

- ``parse(buf) -> NeedData | tuple[ProxyHeader, int]``: ``buf`` is the start of a connection.
  Returns ``NEED_DATA`` while ``buf`` is a strict prefix of a possible header, or the parsed
  header plus the number of bytes it occupied (the caller passes ``buf[consumed:]`` on).
  Raises ``ProxyProtocolError`` on anything malformed or over the caps below.
- ``detect(buf) -> Detect``: cheap check used by "optional" mode: ``NEED_DATA`` (too few bytes
  to tell), ``V1``/``V2`` (signature matched) or ``NOT_PROXY`` (cannot be a PROXY header).
- ``build_v2(src, dst, *, command=Command.PROXY, transport=Transport.STREAM, tlvs=None)``,
  ``build_v2_local(tlvs=None)``, ``build_v1(src, dst)`` (``src=dst=None`` → ``PROXY UNKNOWN``).
  Addresses are ``(ip, port)`` tuples; the family (IPv4/IPv6) comes from the source IP.
  ``build_v2`` also accepts ``str`` paths for AF_UNIX.

``ProxyHeader.source``/``destination`` are ``(ip, port)`` for INET/INET6, a path ``str`` for
UNIX, and ``None`` for LOCAL/UNSPEC/``UNKNOWN`` (the receiver then uses the real peer).
TLVs are returned as ``dict[int, bytes]`` (the last occurrence of a type wins). A CRC32C TLV
(type 0x03) is verified: a mismatch raises ``ProxyProtocolError``.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_V1_HEADER_LEN",
    "MAX_V2_HEADER_LEN",
    "NEED_DATA",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "Detect",
    "Family",
    "NeedData",
    "ProxyHeader",
    "ProxyProtocolError",
    "Transport",
    "build_v1",
    "build_v2",
    "build_v2_local",
    "crc32c",
    "detect",
    "parse",
]

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_HEADER_LEN: Final = 107  # spec §2.1: worst case line incl. CRLF
V2_FIXED_LEN: Final = 16  # signature (12) + ver_cmd + fam + len (2)
MAX_V2_HEADER_LEN: Final = 4096  # our cap on a v2 header incl. addresses and TLVs (spec: 65551)
UNIX_PATH_LEN: Final = 108  # spec §2.2: AF_UNIX addresses are 108 bytes each

_V2_ADDR_LEN: Final = {1: 12, 2: 36, 3: 216}  # INET, INET6, UNIX

# Well-known TLV types (spec §2.2.x).
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30

Address = tuple[str, int] | str


class ProxyProtocolError(Exception):
    """The bytes are not a valid PROXY protocol header (or exceed our caps)."""


class NeedData:
    """Sentinel type: more bytes are needed."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class Detect(enum.Enum):
    NEED_DATA = "need_data"
    V1 = "v1"
    V2 = "v2"
    NOT_PROXY = "not_proxy"


class Command(enum.IntEnum):
    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    command: Command
    family: Family
    transport: Transport
    source: Address | None
    destination: Address | None
    tlvs: dict[int, bytes] = field(default_factory=dict)


def detect(buf: bytes | bytearray | memoryview) -> Detect:
    """Tell whether ``buf`` starts with a PROXY header signature, without parsing it."""
    head = bytes(buf[: len(V2_SIGNATURE)])
    if head.startswith(V2_SIGNATURE):
        return Detect.V2
    if head.startswith(V1_PREFIX):
        return Detect.V1
    if V2_SIGNATURE.startswith(head) or V1_PREFIX.startswith(head):
        return Detect.NEED_DATA
    return Detect.NOT_PROXY


def parse(buf: bytes | bytearray | memoryview) -> NeedData | tuple[ProxyHeader, int]:
    """Parse a PROXY v1 or v2 header at the start of ``buf``."""
    kind = detect(buf)
    if kind is Detect.NEED_DATA:
        return NEED_DATA
    if kind is Detect.V2:
        return _parse_v2(bytes(buf[:MAX_V2_HEADER_LEN]))
    if kind is Detect.V1:
        return _parse_v1(bytes(buf[:MAX_V1_HEADER_LEN]))
    raise ProxyProtocolError("not a PROXY protocol header")


# ---------------------------------------------------------------------------- v1


def _parse_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[0:1] == b"0"):
        raise ProxyProtocolError(f"bad port {raw[:8]!r}")
    port = int(raw)
    if port > 65535:
        raise ProxyProtocolError(f"port out of range {port}")
    return port


def _parse_v1_ip(raw: bytes, version: int) -> str:
    try:
        text = raw.decode("ascii")
        addr = ipaddress.ip_address(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProxyProtocolError(f"bad address {raw[:48]!r}") from exc
    if addr.version != version:
        raise ProxyProtocolError(f"address {text} is not IPv{version}")
    return str(addr)


def _parse_v1(buf: bytes) -> NeedData | tuple[ProxyHeader, int]:
    end = buf.find(b"\r\n")
    if end < 0:
        if len(buf) >= MAX_V1_HEADER_LEN:
            raise ProxyProtocolError("v1 header longer than 107 bytes")
        if b"\n" in buf or b"\r" in buf[:-1]:
            raise ProxyProtocolError("v1 header has a bare CR or LF")
        return NEED_DATA
    line = buf[len(V1_PREFIX) : end]
    consumed = end + 2
    parts = line.split(b" ")
    proto = parts[0]
    if proto == b"UNKNOWN":
        # spec: the rest of the line is ignored by the receiver
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None), consumed
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"bad v1 protocol {proto[:16]!r}")
    if len(parts) != 5:
        raise ProxyProtocolError("v1 header needs 4 fields after the protocol")
    ipver = 4 if proto == b"TCP4" else 6
    src_ip = _parse_v1_ip(parts[1], ipver)
    dst_ip = _parse_v1_ip(parts[2], ipver)
    src_port = _parse_port(parts[3])
    dst_port = _parse_port(parts[4])
    family = Family.INET if ipver == 4 else Family.INET6
    header = ProxyHeader(
        1, Command.PROXY, family, Transport.STREAM, (src_ip, src_port), (dst_ip, dst_port)
    )
    return header, consumed


def build_v1(src: tuple[str, int] | None, dst: tuple[str, int] | None) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n``; ``None`` addresses give ``UNKNOWN``."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    s = ipaddress.ip_address(src[0])
    d = ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ProxyProtocolError("source and destination families differ")
    for port in (src[1], dst[1]):
        if not 0 <= port <= 65535:
            raise ProxyProtocolError(f"port out of range {port}")
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


# ---------------------------------------------------------------------------- v2


def _parse_tlvs(raw: bytes) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < 3:
            raise ProxyProtocolError("truncated TLV header")
        ttype = raw[pos]
        tlen = (raw[pos + 1] << 8) | raw[pos + 2]
        pos += 3
        if len(raw) - pos < tlen:
            raise ProxyProtocolError("TLV value runs past the header")
        tlvs[ttype] = raw[pos : pos + tlen]
        pos += tlen
    return tlvs


def _parse_v2(buf: bytes) -> NeedData | tuple[ProxyHeader, int]:
    if len(buf) < V2_FIXED_LEN:
        return NEED_DATA
    ver_cmd, fam_proto, length = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"bad v2 version {ver_cmd >> 4}")
    cmd_raw = ver_cmd & 0x0F
    if cmd_raw not in (0, 1):
        raise ProxyProtocolError(f"bad v2 command {cmd_raw}")
    fam_raw, proto_raw = fam_proto >> 4, fam_proto & 0x0F
    if fam_raw > 3 or proto_raw > 2:
        raise ProxyProtocolError(f"bad v2 family/protocol byte {fam_proto:#x}")
    total = V2_FIXED_LEN + length
    if total > MAX_V2_HEADER_LEN:
        raise ProxyProtocolError(f"v2 header of {total} bytes exceeds {MAX_V2_HEADER_LEN}")
    if len(buf) < total:
        return NEED_DATA
    command, family, transport = Command(cmd_raw), Family(fam_raw), Transport(proto_raw)
    body = buf[V2_FIXED_LEN:total]
    if family is Family.UNSPEC:
        # spec: the receiver ignores the (empty) address block; TLVs may still follow
        try:
            tlvs = _parse_tlvs(body)
        except ProxyProtocolError:
            tlvs = {}
        return ProxyHeader(2, command, family, transport, None, None, tlvs), total
    addr_len = _V2_ADDR_LEN[fam_raw]
    if len(body) < addr_len:
        raise ProxyProtocolError(f"v2 length {length} too short for family {family.name}")
    src: Address
    dst: Address
    if family is Family.INET:
        src = (_ip_text(body[0:4]), (body[8] << 8) | body[9])
        dst = (_ip_text(body[4:8]), (body[10] << 8) | body[11])
    elif family is Family.INET6:
        src = (_ip_text(body[0:16]), (body[32] << 8) | body[33])
        dst = (_ip_text(body[16:32]), (body[34] << 8) | body[35])
    else:
        src = _unix_path(body[0:UNIX_PATH_LEN])
        dst = _unix_path(body[UNIX_PATH_LEN : 2 * UNIX_PATH_LEN])
    tlvs = _parse_tlvs(body[addr_len:])
    if PP2_TYPE_CRC32C in tlvs:
        _check_crc(buf[:total], V2_FIXED_LEN + addr_len)
    if command is Command.LOCAL:
        # spec: LOCAL means "use the real connection endpoints"; keep TLVs only
        return ProxyHeader(2, command, family, transport, None, None, tlvs), total
    return ProxyHeader(2, command, family, transport, src, dst, tlvs), total


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC32c (RFC 3720 §B.4), as the PP2_TYPE_CRC32C TLV uses it."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc_offset(header: bytes, tlv_start: int) -> int:
    pos = tlv_start
    while pos + 3 <= len(header):
        ttype, tlen = header[pos], (header[pos + 1] << 8) | header[pos + 2]
        if ttype == PP2_TYPE_CRC32C:
            return pos + 3
        pos += 3 + tlen
    raise ProxyProtocolError("CRC32C TLV not found")  # pragma: no cover - caller checked


def _check_crc(header: bytes, tlv_start: int) -> None:
    """Spec §2.2.3: the CRC covers the whole header with the CRC value itself zeroed."""
    off = _crc_offset(header, tlv_start)
    if header[off - 2 : off] != b"\x00\x04":
        raise ProxyProtocolError("CRC32C TLV must be 4 bytes")
    expected = int.from_bytes(header[off : off + 4], "big")
    if crc32c(header[:off] + b"\x00\x00\x00\x00" + header[off + 4 :]) != expected:
        raise ProxyProtocolError("CRC32C mismatch")


_V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"
IP_CACHE_SIZE: Final = 4096  # client addresses repeat; parsing one costs a few microseconds


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _ip_packed(text: str) -> bytes:
    try:
        return ipaddress.ip_address(text).packed
    except ValueError as exc:
        raise ProxyProtocolError(str(exc)) from exc


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _encode_tlvs(tlvs: dict[int, bytes] | None) -> bytes:
    if not tlvs:
        return b""
    out = bytearray()
    for ttype, value in tlvs.items():
        if not 0 <= ttype <= 0xFF or len(value) > 0xFFFF:
            raise ProxyProtocolError(f"bad TLV type {ttype} or length {len(value)}")
        out += struct.pack("!BH", ttype, len(value)) + value
    return bytes(out)


def _v2(command: Command, family: Family, transport: Transport, body: bytes) -> bytes:
    if V2_FIXED_LEN + len(body) > MAX_V2_HEADER_LEN:
        raise ProxyProtocolError(f"v2 header would exceed {MAX_V2_HEADER_LEN} bytes")
    fixed = struct.pack("!BBH", 0x20 | command, (family << 4) | transport, len(body))
    return V2_SIGNATURE + fixed + body


def build_v2(
    src: Address,
    dst: Address,
    *,
    command: Command = Command.PROXY,
    transport: Transport = Transport.STREAM,
    tlvs: dict[int, bytes] | None = None,
    with_crc32c: bool = False,
) -> bytes:
    """Build a v2 header; ``(ip, port)`` addresses pick INET/INET6, ``str`` paths pick UNIX.

    ``with_crc32c`` appends a PP2_TYPE_CRC32C TLV that receivers can verify.
    """
    if with_crc32c:
        tlvs = {**(tlvs or {}), PP2_TYPE_CRC32C: b"\x00\x00\x00\x00"}
        raw = build_v2(src, dst, command=command, transport=transport, tlvs=tlvs)
        off = _crc_offset(raw, V2_FIXED_LEN + _V2_ADDR_LEN[raw[13] >> 4])
        return raw[:off] + crc32c(raw).to_bytes(4, "big") + raw[off + 4 :]
    if isinstance(src, str) or isinstance(dst, str):
        if not (isinstance(src, str) and isinstance(dst, str)):
            raise ProxyProtocolError("cannot mix UNIX and IP addresses")
        s_raw, d_raw = src.encode(), dst.encode()
        if len(s_raw) > UNIX_PATH_LEN or len(d_raw) > UNIX_PATH_LEN:
            raise ProxyProtocolError("UNIX path longer than 108 bytes")
        body = s_raw.ljust(UNIX_PATH_LEN, b"\x00") + d_raw.ljust(UNIX_PATH_LEN, b"\x00")
        return _v2(command, Family.UNIX, transport, body + _encode_tlvs(tlvs))
    s = _ip_packed(src[0])
    d = _ip_packed(dst[0])
    if len(s) != len(d):
        # e.g. an IPv4 client on a dual-stack listener: map it into IPv6
        s = _V4_MAPPED + s if len(s) == 4 else s
        d = _V4_MAPPED + d if len(d) == 4 else d
    if not (0 <= src[1] <= 0xFFFF and 0 <= dst[1] <= 0xFFFF):
        raise ProxyProtocolError("port out of range")
    family = Family.INET if len(s) == 4 else Family.INET6
    body = s + d + struct.pack("!HH", src[1], dst[1])
    return _v2(command, family, transport, body + _encode_tlvs(tlvs))


def build_v2_local(tlvs: dict[int, bytes] | None = None) -> bytes:
    """A LOCAL header (health checks): the receiver uses the real endpoints."""
    return _v2(Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, _encode_tlvs(tlvs))
