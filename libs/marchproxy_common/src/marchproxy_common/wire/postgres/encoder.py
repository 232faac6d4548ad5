"""Pure encoders for the messages the proxy itself produces."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

from .messages import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    CANCEL_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
)

TEXT_OID = 25
INT8_OID = 20


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def cstr(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return raw + b"\x00"


# ---- backend messages (proxy -> client) -------------------------------------------------------


def authentication_ok() -> bytes:
    return message(b"R", struct.pack("!i", AUTH_OK))


def authentication_cleartext() -> bytes:
    return message(b"R", struct.pack("!i", AUTH_CLEARTEXT))


def authentication_md5(salt: bytes) -> bytes:
    return message(b"R", struct.pack("!i", AUTH_MD5) + salt)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    body = b"".join(cstr(m) for m in mechanisms) + b"\x00"
    return message(b"R", struct.pack("!i", AUTH_SASL) + body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return message(b"R", struct.pack("!i", AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return message(b"R", struct.pack("!i", AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(b"K", struct.pack("!ii", process_id, secret_key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def _fields(severity: str, code: str, text: str, extra: Mapping[str, str] | None) -> bytes:
    parts = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(code), b"M" + cstr(text)]
    for key, value in (extra or {}).items():
        parts.append(key.encode("ascii")[:1] + cstr(value))
    return b"".join(parts) + b"\x00"


def error_response(
    code: str, text: str, *, severity: str = "ERROR", extra: Mapping[str, str] | None = None
) -> bytes:
    return message(b"E", _fields(severity, code, text, extra))


def notice_response(
    text: str,
    *,
    code: str = "00000",
    severity: str = "NOTICE",
    extra: Mapping[str, str] | None = None,
) -> bytes:
    return message(b"N", _fields(severity, code, text, extra))


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """Columns as (name, type oid), text format."""
    body = struct.pack("!h", len(columns))
    for name, oid in columns:
        size = 8 if oid == INT8_OID else -1
        body += cstr(name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0)
    return message(b"T", body)


def data_row(values: Sequence[str | bytes | None]) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            body += struct.pack("!i", -1)
        else:
            raw = v.encode("utf-8") if isinstance(v, str) else v
            body += struct.pack("!i", len(raw)) + raw
    return message(b"D", body)


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def empty_query_response() -> bytes:
    return message(b"I")


def parse_complete() -> bytes:
    return message(b"1")


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str]) -> bytes:
    body = struct.pack("!ii", newest_minor, len(unrecognized))
    return message(b"v", body + b"".join(cstr(o) for o in unrecognized))


# ---- frontend messages (proxy -> server) ------------------------------------------------------


def startup_message(parameters: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", protocol)
    for key, value in parameters.items():
        body += cstr(key) + cstr(value)
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!IIii", 16, CANCEL_REQUEST_CODE, process_id, secret_key)


def password_message(password: str | bytes) -> bytes:
    return message(b"p", cstr(password))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + struct.pack("!i", len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def parse(name: bytes, query_text: bytes, param_types: bytes = b"\x00\x00") -> bytes:
    """Parse; ``param_types`` is the raw int16 count + oids tail."""
    return message(b"P", name + b"\x00" + query_text + b"\x00" + param_types)


def bind(statement: bytes, params: Sequence[bytes | None], portal: bytes = b"") -> bytes:
    """Bind with text-format parameters (None is NULL) and text-format results."""
    body = [portal + b"\x00", statement + b"\x00", struct.pack("!hh", 0, len(params))]
    for p in params:
        body.append(struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p)
    body.append(struct.pack("!h", 0))
    return message(b"B", b"".join(body))


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return message(b"E", portal + b"\x00" + struct.pack("!i", max_rows))


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\x00")


def sync() -> bytes:
    return message(b"S")


def terminate() -> bytes:
    return message(b"X")
