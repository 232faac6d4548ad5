"""MySQL client/server protocol framing and the handshake packets a proxy needs.

A packet is a 3-byte little-endian payload length plus a 1-byte sequence id; a payload of
exactly 0xFFFFFF bytes means the logical packet continues in the next one (MySQL Internals,
"MySQL Packets").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import RemoteProtocolError

MAX_PAYLOAD = 0xFFFFFF  # a payload of this size is continued in the next packet
#: Cap on one logical packet the proxy will buffer (MySQL's max_allowed_packet max is 1 GiB).
DEFAULT_MAX_PACKET = 64 * 1024 * 1024
#: Cap on handshake packets (a HandshakeResponse with attributes is well under this).
MAX_HANDSHAKE_PACKET = 64 * 1024

# Capability flags (include/mysql_com.h)
CLIENT_LONG_PASSWORD = 1
CLIENT_FOUND_ROWS = 2
CLIENT_LONG_FLAG = 4
CLIENT_CONNECT_WITH_DB = 8
CLIENT_NO_SCHEMA = 16
CLIENT_COMPRESS = 32
CLIENT_ODBC = 64
CLIENT_LOCAL_FILES = 128
CLIENT_IGNORE_SPACE = 256
CLIENT_PROTOCOL_41 = 512
CLIENT_INTERACTIVE = 1024
CLIENT_SSL = 2048
CLIENT_IGNORE_SIGPIPE = 4096
CLIENT_TRANSACTIONS = 8192
CLIENT_RESERVED = 16384
CLIENT_SECURE_CONNECTION = 32768
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24

SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_AUTOCOMMIT = 0x0002

COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_PING = 0x0E
COM_CHANGE_USER = 0x11
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_RESET_CONNECTION = 0x1F

OK_HEADER = 0x00
EOF_HEADER = 0xFE
ERR_HEADER = 0xFF
LOCAL_INFILE_HEADER = 0xFB


@dataclass(frozen=True, slots=True)
class Packet:
    seq: int
    payload: bytes


class PacketDecoder:
    """Frames packets and joins 0xFFFFFF continuations into one logical :class:`Packet`."""

    def __init__(self, *, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._first_seq = 0

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        buf = self._buf
        out: list[Packet] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            seq = buf[pos + 3]
            if self._partial_len + length > self.max_packet:
                raise RemoteProtocolError(
                    f"packet larger than {self.max_packet} bytes", code=1153, sqlstate="08S01"
                )
            end = pos + 4 + length
            if end > n:
                break
            payload = bytes(buf[pos + 4 : end])
            pos = end
            if length == MAX_PAYLOAD:
                if not self._partial:
                    self._first_seq = seq
                self._partial.append(payload)
                self._partial_len += length
                continue
            if self._partial:
                self._partial.append(payload)
                payload = b"".join(self._partial)
                self._partial = []
                self._partial_len = 0
                seq = self._first_seq  # a logical packet carries its first frame's sequence id
            out.append(Packet(seq, payload))
        del buf[:pos]
        return out

    def feed_eof(self) -> None:
        if self._buf or self._partial:
            raise RemoteProtocolError("connection closed in the middle of a packet")


def encode_packet(seq: int, payload: bytes) -> bytes:
    """Frame a payload, splitting it into 0xFFFFFF chunks (plus an empty one if exact)."""
    out = []
    pos = 0
    while True:
        chunk = payload[pos : pos + MAX_PAYLOAD]
        out.append(struct.pack("<I", len(chunk))[:3] + bytes((seq & 0xFF,)) + chunk)
        seq += 1
        pos += len(chunk)
        if len(chunk) < MAX_PAYLOAD:
            return b"".join(out)


# ---- length-encoded values ------------------------------------------------------------------


def read_lenenc_int(buf: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise RemoteProtocolError("truncated length-encoded integer")
    first = buf[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or pos + 1 + size > len(buf):
        raise RemoteProtocolError("bad length-encoded integer")
    return int.from_bytes(buf[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


def lenenc_int(value: int) -> bytes:
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + value.to_bytes(8, "little")


def read_nul_str(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise RemoteProtocolError("missing NUL terminator")
    return buf[pos:end], end + 1


# ---- handshake -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    """HandshakeV10 (server greeting)."""

    server_version: str
    connection_id: int
    salt: bytes  # 20 bytes of scramble
    capabilities: int
    charset: int
    status: int
    auth_plugin: str


def parse_handshake(payload: bytes) -> Handshake:
    if not payload:
        raise RemoteProtocolError("empty greeting")
    if payload[0] == ERR_HEADER:
        code, state, msg = parse_err(payload)
        raise RemoteProtocolError(msg, code=code, sqlstate=state)
    if payload[0] != 10:
        raise RemoteProtocolError(f"unsupported handshake protocol {payload[0]}")
    version, pos = read_nul_str(payload, 1)
    if pos + 4 + 8 + 1 + 2 > len(payload):
        raise RemoteProtocolError("truncated greeting")
    (conn_id,) = struct.unpack_from("<I", payload, pos)
    salt1 = payload[pos + 4 : pos + 12]
    pos += 13
    (cap_low,) = struct.unpack_from("<H", payload, pos)
    pos += 2
    caps = cap_low
    charset, status, plugin, salt2 = 0, 0, "mysql_native_password", b""
    if pos + 16 <= len(payload):
        charset = payload[pos]
        (status, cap_high) = struct.unpack_from("<HH", payload, pos + 1)
        caps |= cap_high << 16
        auth_len = payload[pos + 5]
        pos += 16  # charset, status, cap high, auth len, 10 reserved (MariaDB: ext caps)
        if caps & CLIENT_SECURE_CONNECTION:
            take = max(13, auth_len - 8)
            salt2 = payload[pos : pos + take].rstrip(b"\x00")
            pos += take
        if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
            raw, _ = read_nul_str(payload + b"\x00", pos)
            plugin = raw.decode("ascii", "replace")
    return Handshake(
        version.decode("utf-8", "replace"), conn_id, salt1 + salt2, caps, charset, status, plugin
    )


def encode_handshake(h: Handshake) -> bytes:
    salt = h.salt[:20].ljust(20, b"\x00")
    return (
        b"\x0a"
        + h.server_version.encode("utf-8")
        + b"\x00"
        + struct.pack("<I", h.connection_id)
        + salt[:8]
        + b"\x00"
        + struct.pack("<HBHH", h.capabilities & 0xFFFF, h.charset, h.status, h.capabilities >> 16)
        + bytes((21,))
        + b"\x00" * 10
        + salt[8:]
        + b"\x00"
        + h.auth_plugin.encode("ascii")
        + b"\x00"
    )


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    capabilities: int
    max_packet: int
    charset: int
    user: str
    auth_response: bytes
    database: str
    auth_plugin: str
    attributes: bytes = b""  # raw connect attributes (lenenc block), forwarded as is


def parse_handshake_response(payload: bytes) -> HandshakeResponse:
    if len(payload) < 32:
        raise RemoteProtocolError("truncated handshake response")
    caps, max_packet, charset = struct.unpack_from("<IIB", payload, 0)
    if not caps & CLIENT_PROTOCOL_41:
        raise RemoteProtocolError("pre-4.1 clients are not supported")
    if caps & CLIENT_SSL and len(payload) == 32:
        raise RemoteProtocolError("TLS is not supported by this proxy")
    pos = 32
    user, pos = read_nul_str(payload, pos)
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        n, pos = read_lenenc_int(payload, pos)
        auth = payload[pos : pos + n]
        pos += n
    elif caps & CLIENT_SECURE_CONNECTION:
        if pos >= len(payload):
            raise RemoteProtocolError("truncated auth response")
        n = payload[pos]
        auth = payload[pos + 1 : pos + 1 + n]
        pos += 1 + n
    else:
        auth, pos = read_nul_str(payload, pos)
    if pos > len(payload):
        raise RemoteProtocolError("truncated auth response")
    db = b""
    if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
        db, pos = read_nul_str(payload, pos)
    plugin = b""
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        plugin, pos = read_nul_str(payload, pos)
    attrs = payload[pos:] if caps & CLIENT_CONNECT_ATTRS else b""
    return HandshakeResponse(
        caps,
        max_packet,
        charset,
        user.decode("utf-8", "replace"),
        auth,
        db.decode("utf-8", "replace"),
        plugin.decode("ascii", "replace") or "mysql_native_password",
        attrs,
    )


def encode_handshake_response(r: HandshakeResponse) -> bytes:
    caps = r.capabilities
    out = struct.pack("<IIB", caps, r.max_packet, r.charset) + b"\x00" * 23
    out += r.user.encode("utf-8") + b"\x00"
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        out += lenenc_int(len(r.auth_response)) + r.auth_response
    else:
        out += bytes((len(r.auth_response),)) + r.auth_response
    if caps & CLIENT_CONNECT_WITH_DB:
        out += r.database.encode("utf-8") + b"\x00"
    if caps & CLIENT_PLUGIN_AUTH:
        out += r.auth_plugin.encode("ascii") + b"\x00"
    if caps & CLIENT_CONNECT_ATTRS:
        out += r.attributes or b"\x00"
    return out


def encode_auth_switch(plugin: str, salt: bytes) -> bytes:
    return b"\xfe" + plugin.encode("ascii") + b"\x00" + salt + b"\x00"


def parse_auth_switch(payload: bytes) -> tuple[str, bytes]:
    if not payload or payload[0] != EOF_HEADER:
        raise RemoteProtocolError("not an auth switch request")
    plugin, pos = read_nul_str(payload, 1)
    data = payload[pos:]
    if data.endswith(b"\x00"):
        data = data[:-1]
    return plugin.decode("ascii", "replace"), data


def encode_ok(
    *, affected_rows: int = 0, last_insert_id: int = 0, status: int = SERVER_STATUS_AUTOCOMMIT
) -> bytes:
    return (
        b"\x00"
        + lenenc_int(affected_rows)
        + lenenc_int(last_insert_id)
        + struct.pack("<HH", status, 0)
    )


def encode_err(code: int, sqlstate: str, message: str) -> bytes:
    return (
        b"\xff"
        + struct.pack("<H", code)
        + b"#"
        + sqlstate.encode("ascii")[:5].ljust(5, b"0")
        + message.encode("utf-8")
    )


def parse_err(payload: bytes) -> tuple[int, str, str]:
    if len(payload) < 3 or payload[0] != ERR_HEADER:
        raise RemoteProtocolError("not an ERR packet")
    (code,) = struct.unpack_from("<H", payload, 1)
    if len(payload) >= 9 and payload[3:4] == b"#":
        return code, payload[4:9].decode("ascii", "replace"), payload[9:].decode("utf-8", "replace")
    return code, "HY000", payload[3:].decode("utf-8", "replace")


def ok_status(payload: bytes) -> int:
    """Status flags of an OK packet (or a DEPRECATE_EOF terminator)."""
    _, pos = read_lenenc_int(payload, 1)
    _, pos = read_lenenc_int(payload, pos)
    if pos + 2 > len(payload):
        return 0
    (status,) = struct.unpack_from("<H", payload, pos)
    return int(status)


def eof_status(payload: bytes) -> int:
    if len(payload) >= 5:
        (status,) = struct.unpack_from("<H", payload, 3)
        return int(status)
    return 0
