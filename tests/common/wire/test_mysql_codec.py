"""Sans-IO MySQL codec: framing with continuations at any split, handshakes, response tracking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_common.wire.mysql import (
    Handshake,
    HandshakeResponse,
    Packet,
    PacketDecoder,
    RemoteProtocolError,
    ResponseTracker,
    encode_packet,
)
from marchproxy_common.wire.mysql import packets as p
from marchproxy_common.wire.mysql.auth import native_scramble, native_verify
from marchproxy_common.wire.mysql.response import Phase

SETTINGS = settings(max_examples=150, deadline=None)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for q in points:
        chunks.append(data[prev:q])
        prev = q
    chunks.append(data[prev:])
    return chunks


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_packets_at_any_split(packets: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_packet(seq, payload) for seq, payload in packets)
    decoder = PacketDecoder()
    got: list[Packet] = []
    for chunk in _split(data, cuts):
        got.extend(decoder.feed(chunk))
    assert got == [Packet(seq, payload) for seq, payload in packets]
    decoder.feed_eof()


def test_continuation_packets_are_joined() -> None:
    payload = b"x" * p.MAX_PAYLOAD + b"tail"
    data = encode_packet(0, payload)
    assert data[3] == 0 and data[p.MAX_PAYLOAD + 4 + 3] == 1  # two frames, seq 0 and 1
    decoder = PacketDecoder(max_packet=p.MAX_PAYLOAD + 10)
    (pkt,) = decoder.feed(data)
    assert pkt.payload == payload
    exact = encode_packet(0, b"y" * p.MAX_PAYLOAD)  # exact multiple: an empty frame follows
    assert len(exact) == p.MAX_PAYLOAD + 8
    assert decoder.feed(exact) == [Packet(0, b"y" * p.MAX_PAYLOAD)]


def test_oversized_packet_is_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        PacketDecoder(max_packet=100).feed(b"\xff\x00\x00\x00")


@SETTINGS
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=6))
def test_random_input_only_raises_our_error(data: bytes, cuts: list[int]) -> None:
    decoder = PacketDecoder(max_packet=1000)
    try:
        for chunk in _split(data, cuts):
            for pkt in decoder.feed(chunk):
                for parse in (p.parse_handshake, p.parse_handshake_response, p.parse_err):
                    try:
                        parse(pkt.payload)
                    except RemoteProtocolError:
                        pass
        decoder.feed_eof()
    except RemoteProtocolError:
        pass


@SETTINGS
@given(st.binary(max_size=200))
def test_handshake_parsers_only_raise_our_error(payload: bytes) -> None:
    for parse in (p.parse_handshake, p.parse_handshake_response, p.parse_auth_switch):
        try:
            parse(payload)
        except RemoteProtocolError:
            pass


@SETTINGS
@given(
    st.text(alphabet="abcdefgh.-0123456789", min_size=1, max_size=20),
    st.binary(min_size=20, max_size=20).map(lambda b: bytes(x or 1 for x in b)),
    st.integers(0, 0xFFFFFFFF),
)
def test_handshake_round_trip(version: str, salt: bytes, caps: int) -> None:
    caps |= p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
    hs = Handshake(version, 7, salt, caps, 45, 2, "mysql_native_password")
    assert p.parse_handshake(p.encode_handshake(hs)) == hs


@SETTINGS
@given(
    st.text(alphabet="abcxyz_", min_size=1, max_size=16),
    st.binary(max_size=40),
    st.text(alphabet="abcxyz_", max_size=16),
    st.booleans(),
)
def test_handshake_response_round_trip(user: str, token: bytes, db: str, lenenc: bool) -> None:
    caps = p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
    caps |= p.CLIENT_CONNECT_WITH_DB
    if lenenc:
        caps |= p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    r = HandshakeResponse(caps, 1 << 24, 33, user, token, db, "mysql_native_password")
    assert p.parse_handshake_response(p.encode_handshake_response(r)) == r


def test_native_scramble() -> None:
    salt = b"12345678901234567890"
    token = native_scramble("secret", salt)
    assert len(token) == 20 and native_verify("secret", salt, token)
    assert not native_verify("other", salt, token)
    assert native_scramble("", salt) == b""


def _column() -> bytes:
    return b"\x03def\x00\x00\x00\x01a\x00\x0c?\x00\x04\x00\x00\x00\x03\x81\x00\x00\x00\x00"


EOF_CLASSIC = b"\xfe\x00\x00\x02\x00"
EOF_MORE = b"\xfe\x00\x00\x0a\x00"  # status with SERVER_MORE_RESULTS_EXISTS


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_response_tracker_result_sets(deprecate_eof: bool) -> None:
    t = ResponseTracker(deprecate_eof=deprecate_eof)
    ok_end = b"\xfe\x00\x00\x02\x00\x00\x00"
    more_end = b"\xfe\x00\x00\x0a\x00\x00\x00"
    end = ok_end if deprecate_eof else EOF_CLASSIC
    more = more_end if deprecate_eof else EOF_MORE
    t.start(p.COM_QUERY)
    seq = [b"\x02", _column(), _column()]
    if not deprecate_eof:
        seq.append(EOF_CLASSIC)
    seq += [b"\x011\x012", b"\x013\x014", more, b"\x00\x01\x00\x02\x00\x00\x00"]
    assert [t.feed(x) for x in seq] == [False] * (len(seq) - 1) + [True]
    assert t.idle
    t.start(p.COM_QUERY)
    assert t.feed(b"\x01") is False
    assert t.feed(_column()) is False
    if not deprecate_eof:
        t.feed(EOF_CLASSIC)
    assert t.feed(end) is True
    t.start(p.COM_PING)
    assert t.feed(b"\x00\x00\x00\x02\x00\x00\x00") is True
    t.start(p.COM_QUERY)
    assert t.feed(b"\xff\x15\x04#28000denied") is True


def test_response_tracker_prepare_and_no_response_commands() -> None:
    t = ResponseTracker(deprecate_eof=False)
    t.start(p.COM_STMT_PREPARE)
    # OK: stmt id 1, 1 column, 2 params
    assert t.feed(b"\x00\x01\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00") is False
    assert [t.feed(x) for x in (_column(), _column(), EOF_CLASSIC, _column())] == [False] * 4
    assert t.feed(EOF_CLASSIC) is True
    t.start(p.COM_STMT_CLOSE)
    assert t.phase is Phase.IDLE
    with pytest.raises(RemoteProtocolError):
        t.feed(b"\x00")


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=30), max_size=20), st.sampled_from([3, 0x16, 0x17]))
def test_response_tracker_random_packets_only_raise_our_error(
    packets: list[bytes], command: int
) -> None:
    t = ResponseTracker(deprecate_eof=bool(len(packets) % 2))
    t.start(command)
    try:
        for pkt in packets:
            if t.feed(pkt):
                t.start(command)
    except RemoteProtocolError:
        pass
