"""PROXY protocol v1/v2: known vectors, round trips, random splits, random garbage."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_common.wire import proxy_protocol as pp
from marchproxy_common.wire.proxy_protocol import (
    NEED_DATA,
    Command,
    Detect,
    Family,
    ProxyHeader,
    ProxyProtocolError,
    Transport,
    build_v1,
    build_v2,
    build_v2_local,
    detect,
    parse,
)

HYP = settings(max_examples=200, deadline=None)


def _parse_ok(buf: bytes) -> tuple[ProxyHeader, int]:
    res = parse(buf)
    assert res is not NEED_DATA
    assert isinstance(res, tuple)
    return res


def test_v1_tcp4_vector() -> None:
    raw = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    hdr, used = _parse_ok(raw)
    assert raw[used:] == b"GET / HTTP/1.1\r\n"
    assert hdr.version == 1
    assert hdr.family is Family.INET
    assert hdr.source == ("192.168.0.1", 56324)
    assert hdr.destination == ("192.168.0.11", 443)


def test_v1_tcp6_and_unknown() -> None:
    hdr, _ = _parse_ok(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
    assert hdr.source == ("2001:db8::1", 1)
    assert hdr.destination == ("::1", 65535)
    hdr, used = _parse_ok(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nX")
    assert hdr.source is None
    assert used == len(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY " + b"A" * 120,
    ],
)
def test_v1_rejects(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(raw)


def test_v1_max_length_is_107() -> None:
    line = b"PROXY TCP6 " + b"f" * 90
    assert len(line) < 107
    assert parse(line) is NEED_DATA
    with pytest.raises(ProxyProtocolError):
        parse(line + b"f" * 20)


def test_v2_haproxy_vector_ipv4() -> None:
    # bytes as haproxy's send-proxy-v2 writes them for 127.0.0.1:40000 -> 127.0.0.1:8080
    raw = (
        pp.V2_SIGNATURE
        + bytes([0x21, 0x11, 0x00, 0x0C])
        + bytes([127, 0, 0, 1, 127, 0, 0, 1])
        + (40000).to_bytes(2, "big")
        + (8080).to_bytes(2, "big")
    )
    hdr, used = _parse_ok(raw + b"tail")
    assert used == len(raw)
    assert hdr == ProxyHeader(
        2,
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        ("127.0.0.1", 40000),
        ("127.0.0.1", 8080),
        {},
    )
    assert build_v2(("127.0.0.1", 40000), ("127.0.0.1", 8080)) == raw


def test_v2_local_and_unix_and_tlvs() -> None:
    hdr, _ = _parse_ok(build_v2_local({pp.PP2_TYPE_UNIQUE_ID: b"abc"}))
    assert hdr.command is Command.LOCAL
    assert hdr.source is None
    assert hdr.tlvs == {pp.PP2_TYPE_UNIQUE_ID: b"abc"}
    raw = build_v2("/tmp/a.sock", "/tmp/b.sock", tlvs={pp.PP2_TYPE_ALPN: b"h2", 0xE0: b""})
    hdr, used = _parse_ok(raw)
    assert used == len(raw)
    assert hdr.family is Family.UNIX
    assert hdr.source == "/tmp/a.sock"
    assert hdr.tlvs == {pp.PP2_TYPE_ALPN: b"h2", 0xE0: b""}


def test_v2_mixed_families_map_to_ipv6() -> None:
    hdr, _ = _parse_ok(build_v2(("10.0.0.1", 1), ("::1", 2)))
    assert hdr.family is Family.INET6
    assert hdr.source == ("::ffff:a00:1", 1)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:12] + bytes([0x11]) + b[13:],  # version 1 in v2 framing
        lambda b: b[:12] + bytes([0x22]) + b[13:],  # command 2
        lambda b: b[:13] + bytes([0x41]) + b[14:],  # family 4
        lambda b: b[:13] + bytes([0x13]) + b[14:],  # transport 3
        lambda b: b[:14] + (4).to_bytes(2, "big") + b[16:20],  # too short for INET
        lambda b: b[:14] + (14).to_bytes(2, "big") + b[16:] + b"\x01\x00",  # truncated TLV
        lambda b: b[:14] + (20).to_bytes(2, "big") + b[16:] + b"\x01\x00\x09abcde",  # TLV overrun
        lambda b: b[:14] + (5000).to_bytes(2, "big") + b[16:],  # over our cap
    ],
)
def test_v2_rejects(mutate: object) -> None:
    base = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2))
    raw = mutate(base)  # type: ignore[operator]
    with pytest.raises(ProxyProtocolError):
        parse(raw + b"\x00" * 64)


def test_detect() -> None:
    assert detect(b"") is Detect.NEED_DATA
    assert detect(b"PRO") is Detect.NEED_DATA
    assert detect(b"\r\n\r\n") is Detect.NEED_DATA
    assert detect(b"PROXY ") is Detect.V1
    assert detect(pp.V2_SIGNATURE) is Detect.V2
    assert detect(b"GET / HTTP/1.1") is Detect.NOT_PROXY
    assert detect(b"PRI * HTTP/2.0") is Detect.NOT_PROXY
    assert detect(b"\x16\x03\x01") is Detect.NOT_PROXY
    with pytest.raises(ProxyProtocolError):
        parse(b"GET / HTTP/1.1\r\n")


# ------------------------------------------------------------------ property tests

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
port = st.integers(0, 65535)
tlvs = st.dictionaries(
    st.integers(0, 255).filter(lambda t: t != pp.PP2_TYPE_CRC32C),
    st.binary(max_size=200),
    max_size=5,
)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    ips = draw(st.sampled_from([ipv4, ipv6]))
    src = (draw(ips), draw(port))
    dst = (draw(ips), draw(port))
    tr = draw(st.sampled_from([Transport.STREAM, Transport.DGRAM]))
    tl = draw(tlvs)
    fam = Family.INET if ":" not in src[0] else Family.INET6
    raw = build_v2(src, dst, transport=tr, tlvs=tl)
    return raw, ProxyHeader(2, Command.PROXY, fam, tr, src, dst, tl)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    ips = draw(st.sampled_from([ipv4, ipv6]))
    src = (draw(ips), draw(port))
    dst = (draw(ips), draw(port))
    fam = Family.INET if ":" not in src[0] else Family.INET6
    return build_v1(src, dst), ProxyHeader(1, Command.PROXY, fam, Transport.STREAM, src, dst)


any_header = st.one_of(v1_headers(), v2_headers())


@HYP
@given(any_header, st.binary(max_size=64))
def test_round_trip(case: tuple[bytes, ProxyHeader], tail: bytes) -> None:
    raw, expected = case
    assert len(raw) <= (pp.MAX_V1_HEADER_LEN if expected.version == 1 else pp.MAX_V2_HEADER_LEN)
    hdr, used = _parse_ok(raw + tail)
    assert hdr == expected
    assert used == len(raw)


@HYP
@given(any_header, st.data())
def test_every_prefix_needs_data(case: tuple[bytes, ProxyHeader], data: st.DataObject) -> None:
    raw, _ = case
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse(raw[:cut]) is NEED_DATA


@settings(max_examples=50, deadline=None)
@given(any_header)
def test_byte_by_byte(case: tuple[bytes, ProxyHeader]) -> None:
    raw, expected = case
    buf = b""
    for i in range(len(raw)):
        buf += raw[i : i + 1]
        res = parse(buf)
        if i < len(raw) - 1:
            assert res is NEED_DATA
    assert res == (expected, len(raw))


@HYP
@given(st.binary(max_size=300))
def test_garbage_only_raises_our_error(raw: bytes) -> None:
    try:
        parse(raw)
    except ProxyProtocolError:
        pass


@HYP
@given(st.sampled_from([pp.V2_SIGNATURE, b"PROXY "]), st.binary(max_size=300))
def test_garbage_after_signature_only_raises_our_error(sig: bytes, rest: bytes) -> None:
    try:
        res = parse(sig + rest)
    except ProxyProtocolError:
        return
    if res is not NEED_DATA:
        assert isinstance(res, tuple)
        assert 0 < res[1] <= len(sig + rest)


def test_crc32c_vector_and_header_check() -> None:
    assert pp.crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    raw = build_v2(("10.1.2.3", 5000), ("10.0.0.1", 443), tlvs={0x05: b"id-1"}, with_crc32c=True)
    hdr, used = _parse_ok(raw + b"data")
    assert used == len(raw)
    assert hdr.source == ("10.1.2.3", 5000)
    assert hdr.tlvs[0x05] == b"id-1"
    assert len(hdr.tlvs[pp.PP2_TYPE_CRC32C]) == 4
    corrupted = raw[:20] + bytes([raw[20] ^ 1]) + raw[21:]  # flip a bit in the source port
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse(corrupted)


@settings(max_examples=50, deadline=None)
@given(v2_headers())
def test_crc_round_trip(case: tuple[bytes, ProxyHeader]) -> None:
    _, expected = case
    assert isinstance(expected.source, tuple)
    assert isinstance(expected.destination, tuple)
    raw = build_v2(
        expected.source,
        expected.destination,
        transport=expected.transport,
        tlvs=expected.tlvs,
        with_crc32c=True,
    )
    hdr, _ = _parse_ok(raw)
    assert {k: v for k, v in hdr.tlvs.items() if k != pp.PP2_TYPE_CRC32C} == expected.tlvs
