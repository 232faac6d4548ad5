"""Request-field parsers of the NLB control plane (pure): seed 002's address forms."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marchproxy.v1 import types_pb2
from marchproxy_nlb.grpc.validate import (
    InvalidArgument,
    check_host,
    format_address,
    health_name,
    module_type_name,
    protocol_name,
    split_seed_address,
)

PORTS = st.integers(1, 65535)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
NAMES = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}\Z")


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        ("127.0.0.1", 8080, ("127.0.0.1", 8080)),
        ("127.0.0.1:8080", 0, ("127.0.0.1", 8080)),
        ("127.0.0.1:8080", 8080, ("127.0.0.1", 8080)),
        ("::1", 8080, ("::1", 8080)),  # was split into host ":" and port 1
        ("[::1]", 8080, ("::1", 8080)),
        ("[::1]:8080", 0, ("::1", 8080)),
        ("fe80::1:2", 443, ("fe80::1:2", 443)),
        ("[2001:db8::7]:5432", 0, ("2001:db8::7", 5432)),
        ("mod.internal", 9000, ("mod.internal", 9000)),
        ("mod.internal:9000", 0, ("mod.internal", 9000)),
    ],
)
def test_seed_address_forms(address: str, port: int, expected: tuple[str, int]) -> None:
    assert split_seed_address(address, port) == expected


@pytest.mark.parametrize(
    ("address", "port"),
    [
        ("::1", 0),  # an IPv6 literal without brackets has no port to split off
        ("[::1]", 0),
        ("[::1]8080", 0),
        ("127.0.0.1", 0),
        ("127.0.0.1:", 0),
        ("127.0.0.1:http", 0),
        ("127.0.0.1:99999", 0),
        ("127.0.0.1:8080", 9090),  # two different ports
        ("", 8080),
        ("a:b:c", 8080),  # not an IPv6 address either
        ("127.0.0.1", 70000),
        ("127.0.0.1:١٢٣", 0),  # non-ASCII digits
    ],
)
def test_bad_seed_addresses_are_invalid(address: str, port: int) -> None:
    with pytest.raises(InvalidArgument):
        split_seed_address(address, port)


@given(host=IPV4 | IPV6 | NAMES, port=PORTS)
def test_every_form_of_a_host_and_port_parses_back(host: str, port: int) -> None:
    assert split_seed_address(host, port) == (host, port)
    assert split_seed_address(format_address(host, port), 0) == (host, port)
    if ":" in host:
        assert split_seed_address(f"[{host}]", port) == (host, port)


@given(address=st.text(max_size=60), port=st.integers(0, 70000))
def test_any_address_parses_or_is_invalid(address: str, port: int) -> None:
    try:
        host, got = split_seed_address(address, port)
    except InvalidArgument:
        return
    assert 1 <= got <= 65535
    assert check_host("x", host) == host
    if ":" in host:
        ipaddress.IPv6Address(host)


def test_enum_names_for_known_and_unknown_numbers() -> None:
    """/status and the metric labels name every number, even one the enum lacks (a route rule's
    protocol or a newer module's health is a plain int)."""
    assert protocol_name(types_pb2.PROTOCOL_POSTGRESQL) == "postgresql"
    assert protocol_name(0) == "unspecified"
    assert protocol_name(999) == "unknown"
    assert module_type_name(types_pb2.MODULE_TYPE_DBLB) == "DBLB"
    assert module_type_name(-1) == "UNKNOWN"
    assert health_name(types_pb2.HEALTH_STATUS_DRAINING) == "draining"
    assert health_name(999) == "unknown"
