"""Route rules (pure): Host values, IPv6 literals, rule normalisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marchproxy_nlb.traffic.routing import ConnInfo, host_without_port, make_rule

NAMES = st.from_regex(r"\A[a-z][a-z0-9-]{0,15}(\.[a-z][a-z0-9-]{0,15}){0,3}\Z")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a.example", "a.example"),
        ("a.example:8080", "a.example"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),  # the old split at the last colon left "[:"
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("::1", "::1"),  # not a valid Host, but no port to take off either
        ("a.example:", "a.example:"),
        ("[::1", "[::1"),
    ],
)
def test_host_without_port(value: str, expected: str) -> None:
    assert host_without_port(value) == expected


@given(
    host=NAMES | st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    port=st.integers(0, 65535) | st.none(),
)
def test_host_with_or_without_a_port_gives_the_host(host: str, port: int | None) -> None:
    value = host if port is None else f"{host}:{port}"
    assert host_without_port(value) == host.strip("[]")


@given(st.text(max_size=40))
def test_host_without_port_never_fails(value: str) -> None:
    out = host_without_port(value)
    assert len(out) <= len(value)


def test_a_bracketed_ipv6_rule_matches_the_unbracketed_host() -> None:
    rule = make_rule(name="v6", module="m", host="[2001:DB8::7]")
    assert rule.matches(ConnInfo(protocol=3, host="2001:db8::7"))
