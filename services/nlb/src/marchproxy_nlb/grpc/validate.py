"""Validation of NLBService requests: every bad field becomes INVALID_ARGUMENT with a message."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping

from marchproxy.v1 import types_pb2

MAX_ID_LEN = 128
MAX_HOST_LEN = 253
MAX_VERSION_LEN = 64
MAX_LABELS = 64
MAX_LABEL_KEY_LEN = 63
MAX_LABEL_VALUE_LEN = 256
MAX_PROTOCOLS = 17
MAX_WEIGHT = 10_000
MAX_CAPACITY = 10_000_000
MAX_COUNT = 2**62  # counters a module reports (requests, bytes, connections)
MAX_CPU_PERCENT = 100.0 * 4096  # percent of one core, summed over up to 4096 cores
MAX_RATE = 1e12  # requests per second a module may report

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_PROTOCOL_BY_NAME = {
    name.removeprefix("PROTOCOL_").lower(): value
    for name, value in types_pb2.Protocol.items()
    if value != types_pb2.PROTOCOL_UNSPECIFIED
}
_PROTOCOL_BY_NAME.update(
    {"postgres": types_pb2.PROTOCOL_POSTGRESQL, "ws": types_pb2.PROTOCOL_WEBSOCKET}
)


class InvalidArgument(ValueError):
    """A request field is malformed; the message names the field."""


def check_id(field: str, value: str, *, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required")
        return value
    if len(value) > MAX_ID_LEN:
        raise InvalidArgument(f"{field} is longer than {MAX_ID_LEN} characters")
    if not _ID_RE.match(value):
        raise InvalidArgument(f"{field} may contain only letters, digits and . _ : - ({value!r})")
    return value


def check_host(field: str, host: str) -> str:
    if not host:
        raise InvalidArgument(f"{field}.host is required")
    if len(host) > MAX_HOST_LEN or any(c.isspace() for c in host):
        raise InvalidArgument(f"{field}.host is not a valid host name or address")
    if ":" in host:  # only an IPv6 literal may contain a colon ("host:port" is not a host)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(
                f"{field}.host {host[:80]!r} is neither a host name nor an IP address"
            ) from None
    return host


def split_seed_address(address: str, port: int) -> tuple[str, int]:
    """Seed 002's RegisterModule ``address`` (+ ``port``) as ``(host, port)``.

    With a port, ``address`` is the host alone: ``"10.0.0.5"``, ``"::1"`` or ``"[::1]"``.
    Without one (``port == 0``) it carries the port: ``"10.0.0.5:8080"``, ``"[::1]:8080"``
    (RFC 3986 section 3.2.2 brackets; a bare IPv6 literal has no port to split off).
    """
    if port:
        if address.startswith("[") and address.endswith("]"):
            address = address[1:-1]
        elif address.count(":") == 1:  # "ip:port" and port: fine if they agree
            host, port_text = _split_port(address)
            if port_text != str(port):
                raise InvalidArgument(f"address carries port {port_text!r} but port is {port}")
            address = host
        return check_host("address", address), check_port("port", port)
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidArgument("address must be [IPv6]:port when port is not set")
        port_text = rest[1:]
    elif address.count(":") == 1:
        host, port_text = _split_port(address)
    else:
        raise InvalidArgument("address must be host:port or [IPv6]:port when port is not set")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise InvalidArgument(f"address {address[:80]!r} has no valid port")
    return check_host("address", host), check_port("address", int(port_text))


def _split_port(address: str) -> tuple[str, str]:
    host, _, port_text = address.partition(":")
    return host, port_text


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(field: str, port: int, *, allow_zero: bool = False) -> int:
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise InvalidArgument(f"{field}.port must be between 1 and 65535, not {port}")
    return port


def check_protocols(
    values: Iterable[types_pb2.Protocol.ValueType], names: str = ""
) -> frozenset[types_pb2.Protocol.ValueType]:
    protocols: set[types_pb2.Protocol.ValueType] = set()
    for v in values:
        if v not in types_pb2.Protocol.values() or v == types_pb2.PROTOCOL_UNSPECIFIED:
            raise InvalidArgument(f"protocols contains an unknown protocol value {v}")
        protocols.add(v)
    for name in filter(None, (n.strip().lower() for n in names.split(","))):
        if name not in _PROTOCOL_BY_NAME:
            raise InvalidArgument(f"protocol {name!r} is not a known protocol")
        protocols.add(_PROTOCOL_BY_NAME[name])
    if not protocols:
        raise InvalidArgument("at least one protocol is required (protocols or protocol)")
    if len(protocols) > MAX_PROTOCOLS:
        raise InvalidArgument("too many protocols")
    return frozenset(protocols)


def check_module_type(
    value: types_pb2.ModuleType.ValueType, *, required: bool
) -> types_pb2.ModuleType.ValueType:
    if value not in types_pb2.ModuleType.values():
        raise InvalidArgument(f"module_type {value} is not a known module type")
    if required and value == types_pb2.MODULE_TYPE_UNSPECIFIED:
        raise InvalidArgument("module_type is required")
    return value


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels are allowed")
    for k, v in labels.items():
        if not k or len(k) > MAX_LABEL_KEY_LEN:
            raise InvalidArgument(f"label key {k[:80]!r} must be 1-{MAX_LABEL_KEY_LEN} characters")
        if len(v) > MAX_LABEL_VALUE_LEN:
            raise InvalidArgument(f"label {k!r} value is longer than {MAX_LABEL_VALUE_LEN}")
    return dict(labels)


def check_text(field: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters")
    return value


def check_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low} and {high}, not {value}")
    return value


def check_count(field: str, value: int) -> int:
    """A reported counter or gauge: a whole number, never negative."""
    if not 0 <= value <= MAX_COUNT:
        raise InvalidArgument(f"{field} must be between 0 and {MAX_COUNT}, not {value}")
    return value


def check_number(field: str, value: float, low: float, high: float) -> float:
    """A reported measurement: finite (NaN and infinities are refused) and within bounds."""
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(f"{field} must be a finite number between {low:g} and {high:g}")
    return value


def check_health(
    field: str, value: types_pb2.HealthStatus.ValueType, *, allow_unspecified: bool
) -> types_pb2.HealthStatus.ValueType:
    if value not in types_pb2.HealthStatus.values():
        raise InvalidArgument(f"{field} {value} is not a known health status")
    if value == types_pb2.HEALTH_STATUS_UNSPECIFIED and not allow_unspecified:
        raise InvalidArgument(f"{field} is required")
    return value


def protocol_name(value: int) -> str:
    """``"http"`` for ``PROTOCOL_HTTP``; ``"unknown"`` for a number the enum does not define.
    Takes any ``int`` (a route rule's protocol is one), as do the two functions below."""
    try:
        name = types_pb2.Protocol.Name(types_pb2.Protocol.ValueType(value))
    except ValueError:
        return "unknown"
    return name.removeprefix("PROTOCOL_").lower()


def module_type_name(value: int) -> str:
    try:
        name = types_pb2.ModuleType.Name(types_pb2.ModuleType.ValueType(value))
    except ValueError:
        return "UNKNOWN"
    return name.removeprefix("MODULE_TYPE_")


def health_name(value: int) -> str:
    try:
        name = types_pb2.HealthStatus.Name(types_pb2.HealthStatus.ValueType(value))
    except ValueError:
        return "unknown"
    return name.removeprefix("HEALTH_STATUS_").lower()
