"""Route rules and listener specs (pure): Host values, IPv6 literals, NLB_LISTENERS."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marchproxy_nlb.traffic.listener import ListenerSpecError, make_listener, parse_listeners_env
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


# -- NLB_LISTENERS ---------------------------------------------------------------------------------


def test_listeners_env_with_options() -> None:
    specs = parse_listeners_env(
        "7000=http,tls;5353/udp=udp;5201=tcp?proxy_protocol=none;6000=tcp?proxy_protocol=V1"
    )
    assert [(s.port, s.transport, s.proxy_protocol) for s in specs] == [
        (7000, "tcp", "v2"),
        (5353, "udp", "v2"),
        (5201, "tcp", "none"),
        (6000, "tcp", "v1"),
    ]
    assert specs[2].protocols == frozenset({"tcp"})


@pytest.mark.parametrize(
    "text",
    [
        "5201=tcp?proxy_protocol=v3",
        "5201=tcp?proxy_protocol",
        "5201=tcp?send_proxy=none",
        "5201=tcp?proxy_protocol=none&proxy_protocol=v1",
        "5201=?proxy_protocol=none",
        "x=tcp",
        "5201",
    ],
)
def test_bad_listener_entries_are_refused(text: str) -> None:
    with pytest.raises(ListenerSpecError):
        parse_listeners_env(text)


@given(
    port=st.integers(0, 65535),
    protos=st.lists(st.sampled_from(["http", "tls", "tcp", "postgresql", "mysql"]), min_size=1),
    mode=st.sampled_from(["v2", "v1", "none", None]),
)
def test_listener_entries_round_trip(port: int, protos: list[str], mode: str | None) -> None:
    text = f"{port}={','.join(protos)}" + (f"?proxy_protocol={mode}" if mode else "")
    [spec] = parse_listeners_env(text)
    assert (spec.port, spec.protocols) == (port, frozenset(protos))
    assert spec.proxy_protocol == (mode or "v2")


@given(st.text(max_size=60))
def test_any_listener_text_parses_or_is_refused(text: str) -> None:
    try:
        specs = parse_listeners_env(text)
    except ListenerSpecError:
        return
    for s in specs:
        assert make_listener(s.name, s.port, sorted(s.protocols), s.default_protocol,
                             s.transport, proxy_protocol=s.proxy_protocol) == s  # fmt: skip
