"""Sans-IO RTMP: handshake, chunks, AMF0/AMF3, commands: round trips, splits, hostile input."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marchproxy_common.wire.rtmp import amf0, handshake, messages
from marchproxy_common.wire.rtmp.chunks import (
    EXTENDED_TIMESTAMP,
    MSG_ABORT,
    MSG_AUDIO,
    MSG_SET_CHUNK_SIZE,
    MSG_SET_PEER_BANDWIDTH,
    MSG_VIDEO,
    MSG_WINDOW_ACK_SIZE,
    ChunkStreamDecoder,
    ChunkWriter,
    MessageReceived,
    basic_header,
    encode_message,
)
from marchproxy_common.wire.rtmp.errors import RtmpProtocolError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


# ---------------------------------------------------------------- handshake


def test_simple_handshake_echoes_c1() -> None:
    client = handshake.ClientHandshake()
    server = handshake.ServerHandshake()
    c0c1 = client.initial()
    s012 = server.feed(c0c1)
    assert len(s012) == 1 + 2 * handshake.HANDSHAKE_SIZE
    assert s012[1 + handshake.HANDSHAKE_SIZE :] == c0c1[1:]
    c2 = client.feed(s012 + b"after")
    assert client.state is handshake.HandshakeState.DONE
    assert client.leftover == b"after"
    assert server.feed(c2 + b"\x03chunk") == b""
    assert server.state is handshake.HandshakeState.DONE
    assert server.leftover == b"\x03chunk"


def test_digest_handshake_is_validated_like_ffmpeg() -> None:
    c1 = handshake.make_digest_c1()
    digest = handshake.find_client_digest(c1)
    assert digest is not None
    server = handshake.ServerHandshake()
    out = server.feed(b"\x03" + c1)
    s1 = out[1 : 1 + handshake.HANDSHAKE_SIZE]
    s2 = out[1 + handshake.HANDSHAKE_SIZE :]
    assert s1[4] >= 3  # version field: ffmpeg validates the server digest when >= 3
    # the S1 digest is keyed by the FMS key (scheme 0)
    pos = handshake.digest_offset(s1, 8)
    assert handshake._digest_at(s1, pos, handshake.GENUINE_FMS_KEY[:36]) == s1[pos : pos + 32]
    assert handshake.validate_digest_s2(s2, digest)


def scheme_1_c1() -> tuple[bytes, bytes]:
    """A Flash-style C1 with its digest at the scheme 1 position (offset base 772)."""
    c1 = bytearray(bytes(4) + bytes([0x80, 0x00, 0x07, 0x02]) + os.urandom(1528))
    digest = handshake.imprint_digest(c1, handshake.GENUINE_FP_KEY[:30], 772)
    return bytes(c1), digest


def test_scheme_1_digest_c1_gets_a_digest_handshake() -> None:
    c1, digest = scheme_1_c1()
    pos = handshake.digest_offset(c1, 772)
    assert pos >= 776 and c1[pos : pos + 32] == digest
    assert handshake.find_client_digest(c1) == digest
    server = handshake.ServerHandshake()
    out = server.feed(b"\x03" + c1)
    assert server.client_digest == digest
    assert handshake.validate_digest_s2(out[1 + handshake.HANDSHAKE_SIZE :], digest)
    # a C1 whose scheme 1 digest is off by one bit is a simple C1
    broken = bytearray(c1)
    broken[pos] ^= 1
    assert handshake.find_client_digest(bytes(broken)) is None


def test_simple_c1_has_no_digest() -> None:
    assert handshake.find_client_digest(bytes(8) + os.urandom(1528)) is None


def test_handshake_rejects_bad_version() -> None:
    with pytest.raises(RtmpProtocolError):
        handshake.ServerHandshake().feed(b"\x06" + bytes(1536))


@SETTINGS
@given(cuts=st.lists(st.integers(min_value=0), max_size=8), digest=st.booleans())
def test_handshake_any_split(cuts: list[int], digest: bool) -> None:
    client = handshake.ClientHandshake(digest=digest)
    server = handshake.ServerHandshake()
    out = b"".join(server.feed(p) for p in split(client.initial(), cuts) if p)
    c2 = b"".join(client.feed(p) for p in split(out, cuts) if p)
    assert client.state is handshake.HandshakeState.DONE
    for p in split(c2, cuts):
        if p:
            server.feed(p)
    assert server.state is handshake.HandshakeState.DONE
    assert (server.client_digest is not None) == digest


# ---------------------------------------------------------------- chunks

message_st = st.builds(
    MessageReceived,
    csid=st.sampled_from([3, 4, 6, 63, 64, 319, 320, 1000, 65599]),
    type_id=st.sampled_from([MSG_AUDIO, MSG_VIDEO, 18, 20]),
    stream_id=st.sampled_from([0, 1, 7]),
    timestamp=st.one_of(
        st.integers(0, 100_000), st.integers(EXTENDED_TIMESTAMP - 3, EXTENDED_TIMESTAMP + 3)
    ),
    payload=st.binary(max_size=700),
)


def encode_all(msgs: list[MessageReceived], chunk_size: int) -> bytes:
    writer = ChunkWriter()
    out = [writer.set_chunk_size(chunk_size)] if chunk_size != 128 else []
    for m in msgs:
        out.append(writer.write(m.csid, m.type_id, m.stream_id, m.timestamp, m.payload))
    return b"".join(out)


def media_only(events: list[MessageReceived]) -> list[MessageReceived]:
    return [e for e in events if e.type_id != MSG_SET_CHUNK_SIZE]


@SETTINGS
@given(
    msgs=st.lists(message_st, max_size=12),
    chunk_size=st.sampled_from([1, 2, 77, 128, 4096]),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_chunk_round_trip_random_splits(
    msgs: list[MessageReceived], chunk_size: int, cuts: list[int]
) -> None:
    data = encode_all(msgs, chunk_size)
    whole = media_only(ChunkStreamDecoder().feed(data))
    assert whole == msgs
    dec = ChunkStreamDecoder()
    events: list[MessageReceived] = []
    for part in split(data, cuts):
        events += dec.feed(part)
    assert media_only(events) == msgs
    assert dec.chunk_size == chunk_size


@settings(max_examples=40, deadline=None)
@given(msgs=st.lists(message_st, max_size=5))
def test_chunk_byte_by_byte(msgs: list[MessageReceived]) -> None:
    data = encode_all(msgs, 128)
    dec = ChunkStreamDecoder()
    events: list[MessageReceived] = []
    for i in range(len(data)):
        events += dec.feed(data[i : i + 1])
    assert media_only(events) == msgs


def test_interleaved_chunk_streams() -> None:
    a = encode_message(4, MSG_AUDIO, 1, 10, b"A" * 300, 128)
    v = encode_message(6, MSG_VIDEO, 1, 20, b"V" * 300, 128)
    # interleave chunk by chunk: first chunks are 12+128, continuations 1+128, last 1+44
    a_parts = [a[:140], a[140:269], a[269:]]
    v_parts = [v[:140], v[140:269], v[269:]]
    data = b"".join(x + y for x, y in zip(a_parts, v_parts, strict=True))
    events = ChunkStreamDecoder().feed(data)
    assert [(e.csid, e.payload) for e in events] == [(4, b"A" * 300), (6, b"V" * 300)]


def test_fmt3_new_message_reuses_delta_and_extended_continuation() -> None:
    w = ChunkWriter()
    data = w.write(6, MSG_VIDEO, 1, 1000, b"x") + w.write(6, MSG_VIDEO, 1, 1040, b"y")
    data += basic_header(3, 6) + b"z"  # fmt 3: same header, timestamp + last delta (40)
    events = ChunkStreamDecoder().feed(data)
    assert [e.timestamp for e in events] == [1000, 1040, 1080]
    big = EXTENDED_TIMESTAMP + 5
    data = encode_message(5, MSG_VIDEO, 1, big, b"q" * 300, 128)
    assert ChunkStreamDecoder().feed(data)[0].timestamp == big


def test_abort_discards_partial_message() -> None:
    first = encode_message(6, MSG_VIDEO, 1, 0, b"V" * 200, 128)[:140]
    abort = encode_message(2, MSG_ABORT, 0, 0, messages.encode_u32(6), 128)
    again = encode_message(6, MSG_VIDEO, 1, 5, b"W" * 10, 128)
    events = ChunkStreamDecoder().feed(first + abort + again)
    assert [e.payload for e in events if e.type_id == MSG_VIDEO] == [b"W" * 10]


def test_window_ack_size_makes_ack_due() -> None:
    dec = ChunkStreamDecoder()
    dec.feed(encode_message(2, MSG_WINDOW_ACK_SIZE, 0, 0, messages.encode_u32(100), 128))
    assert dec.window_ack_size == 100
    assert dec.ack_due() is None
    dec.feed(encode_message(6, MSG_VIDEO, 1, 0, b"v" * 120, 128))
    assert dec.ack_due() == dec.bytes_received
    assert dec.ack_due() is None


def test_set_peer_bandwidth_is_applied_and_emitted() -> None:
    dec = ChunkStreamDecoder()
    payload = messages.encode_peer_bandwidth(2_500_000, 1)
    assert payload == (2_500_000).to_bytes(4, "big") + b"\x01"  # size, then limit type (soft)
    events = dec.feed(encode_message(2, MSG_SET_PEER_BANDWIDTH, 0, 0, payload, 128))
    assert dec.peer_bandwidth == 2_500_000
    assert [(e.type_id, e.payload) for e in events] == [(MSG_SET_PEER_BANDWIDTH, payload)]
    with pytest.raises(RtmpProtocolError, match="Set Peer Bandwidth"):
        ChunkStreamDecoder().feed(encode_message(2, MSG_SET_PEER_BANDWIDTH, 0, 0, payload[:4], 128))


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x46]) + b"\x00" * 8,  # fmt 1 with no previous header
        bytes([0xC6]),  # fmt 3 with no previous header
        encode_message(2, MSG_SET_CHUNK_SIZE, 0, 0, b"\x00\x00\x00\x00", 128),  # size 0
        bytes([0x06]) + b"\x00\x00\x00" + b"\xff\xff\xff" + b"\x09" + b"\x00" * 4,  # 16 MiB
    ],
)
def test_chunk_hostile_input(data: bytes) -> None:
    with pytest.raises(RtmpProtocolError):
        ChunkStreamDecoder(max_message_size=1 << 20).feed(data)


def test_unfinished_messages_are_capped_across_chunk_streams() -> None:
    dec = ChunkStreamDecoder(max_pending_bytes=1000)
    a = encode_message(4, MSG_VIDEO, 1, 0, b"a" * 900, 128)
    b = encode_message(5, MSG_VIDEO, 1, 0, b"b" * 900, 128)
    dec.feed(a[: 12 + 128 + 5 * 129])  # 768 bytes of csid 4 pending
    data = b[: 12 + 128 + 129]  # 256 more on csid 5: over the cap
    with pytest.raises(RtmpProtocolError, match="unfinished"):
        dec.feed(data)


@SETTINGS
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_chunk_random_input_only_raises_protocol_error(data: bytes, cuts: list[int]) -> None:
    dec = ChunkStreamDecoder(max_message_size=4096, max_chunk_streams=8)
    try:
        for part in split(data, cuts):
            dec.feed(part)
    except RtmpProtocolError:
        pass


@SETTINGS
@given(msgs=st.lists(message_st, min_size=1, max_size=4), cut=st.integers(min_value=0))
def test_chunk_truncated_input_emits_a_prefix(msgs: list[MessageReceived], cut: int) -> None:
    data = encode_all(msgs, 128)
    events = media_only(ChunkStreamDecoder().feed(data[: cut % len(data)]))
    assert events == msgs[: len(events)]


# ---------------------------------------------------------------- AMF

amf_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
amf0_value = st.recursive(
    amf_scalar,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(min_size=1, max_size=10), children, max_size=5),
        st.dictionaries(st.text(min_size=1, max_size=10), children, max_size=5).map(amf0.EcmaArray),
    ),
    max_leaves=20,
)


@SETTINGS
@given(values=st.lists(amf0_value, max_size=5))
def test_amf0_round_trip(values: list[amf0.AmfValue]) -> None:
    decoded = amf0.decode(amf0.encode(*values))
    assert decoded == values
    for a, b in zip(decoded, values, strict=True):
        assert type(a) is type(b) or isinstance(b, int)


@SETTINGS
@given(values=st.lists(amf0_value, max_size=5))
def test_amf3_round_trip(values: list[amf0.AmfValue]) -> None:
    decoded = amf0.decode_amf3(amf0.encode_amf3(*values))
    expect = amf0.decode(amf0.encode(*values))
    # AMF3 has no ECMA-array marker of its own: compare as plain dicts
    assert _plain(decoded) == _plain(expect)


def _plain(v: object) -> object:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def test_amf0_special_markers() -> None:
    date = amf0.AmfDate(1.5e12, 0)
    typed = amf0.TypedObject("flex.Foo", {"a": 1.0})
    xml = amf0.XmlDocument("<a/>")
    long = "x" * 70_000
    out = amf0.decode(amf0.encode(amf0.UNDEFINED, date, typed, xml, long))
    assert out == [amf0.UNDEFINED, date, typed, xml, long]
    # reference 0x07 to the first object
    data = amf0.encode({"k": 1.0}) + b"\x07\x00\x00"
    first, second = amf0.decode(data)
    assert first is second


def test_amf0_avmplus_switch_to_amf3() -> None:
    inner = amf0.encode_amf3({"app": "live", "n": 5.0})
    assert amf0.decode(b"\x11" + inner) == [{"app": "live", "n": 5.0}]
    # AMF3 integer, string reference, sealed traits reference
    assert amf0.decode_amf3(b"\x04\x7f") == [127.0]
    assert amf0.decode_amf3(b"\x06\x07abc\x06\x00") == ["abc", "abc"]


@pytest.mark.parametrize(
    "data",
    [
        b"\x02\x00\x05ab",  # truncated string
        b"\x07\x00\x01",  # reference out of range
        b"\x0a\xff\xff\xff\xff",  # huge strict array
        b"\x03" * 100,  # too deep
        b"\x0e",  # recordset: unsupported
        b"\x02\x00\x02\xff\xfe",  # invalid utf-8
        b"\x03\x00\x00\x02",  # empty key that is not an object end
        b"\x11\x0a\x07",  # AMF3 externalizable
        b"\x11\x06\x02",  # AMF3 string reference out of range
    ],
)
def test_amf_hostile_input(data: bytes) -> None:
    with pytest.raises(RtmpProtocolError):
        amf0.decode(data)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_amf_random_input_only_raises_protocol_error(data: bytes) -> None:
    for fn in (amf0.decode, amf0.decode_amf3):
        try:
            fn(data)
        except RtmpProtocolError:
            pass


@SETTINGS
@given(values=st.lists(amf0_value, min_size=1, max_size=3), cut=st.integers(min_value=1))
def test_amf_truncated(values: list[amf0.AmfValue], cut: int) -> None:
    data = amf0.encode(*values)
    try:
        amf0.decode(data[: cut % len(data)])
    except RtmpProtocolError:
        pass


# ---------------------------------------------------------------- commands


def test_command_round_trip_amf0_and_amf3_envelope() -> None:
    obj = {"app": "live", "tcUrl": "rtmp://h/live", "objectEncoding": 3.0}
    payload = messages.encode_command("connect", 1, obj)
    cmd = messages.parse_command(20, payload)
    assert cmd == messages.Command("connect", 1.0, obj, [])
    assert messages.parse_command(17, b"\x00" + payload) == cmd
    amf3_obj = b"\x00" + amf0.encode("connect", 1.0) + b"\x11" + amf0.encode_amf3(obj)
    assert messages.parse_command(17, amf3_obj) == cmd
    pub = messages.parse_command(20, messages.encode_command("publish", 5, None, "key", "live"))
    assert (pub.name, pub.args) == ("publish", ["key", "live"])


def test_command_errors() -> None:
    with pytest.raises(RtmpProtocolError):
        messages.parse_command(20, amf0.encode("connect"))
    with pytest.raises(RtmpProtocolError):
        messages.parse_command(20, amf0.encode("connect", "x"))
    with pytest.raises(RtmpProtocolError):
        messages.parse_command(20, amf0.encode("x" * 65535, "y" * 65535))


@pytest.mark.parametrize(
    "ev",
    [
        messages.UserControlEvent(messages.UserControl.STREAM_BEGIN, 1),
        messages.UserControlEvent(messages.UserControl.STREAM_EOF, 3),
        messages.UserControlEvent(messages.UserControl.SET_BUFFER_LENGTH, 1, 3000),
        messages.UserControlEvent(messages.UserControl.PING_REQUEST, 0, 123456),
        messages.UserControlEvent(messages.UserControl.PING_RESPONSE, 0, 7),
    ],
)
def test_user_control_round_trip(ev: messages.UserControlEvent) -> None:
    assert messages.parse_user_control(messages.encode_user_control(ev)) == ev


def test_media_tag_classification() -> None:
    assert messages.is_video_keyframe(b"\x17\x01")
    assert not messages.is_video_keyframe(b"\x27\x01")
    assert messages.is_video_sequence_header(b"\x17\x00")
    assert not messages.is_video_sequence_header(b"\x17\x01")
    assert messages.is_audio_sequence_header(b"\xaf\x00")
    assert not messages.is_audio_sequence_header(b"\xaf\x01")
    assert math.isclose(amf0.decode(amf0.encode(1))[0], 1.0)  # type: ignore[arg-type]


def _flv_tag(type_id: int, ts: int, data: bytes) -> bytes:
    head = bytes([type_id]) + len(data).to_bytes(3, "big") + (ts & 0xFFFFFF).to_bytes(3, "big")
    head += bytes([ts >> 24]) + b"\x00\x00\x00"
    return head + data + (11 + len(data)).to_bytes(4, "big")


def test_aggregate_split_rebases_timestamps() -> None:
    agg = _flv_tag(9, 5000, b"\x17\x01v") + _flv_tag(8, 5020, b"\xaf\x01a")
    assert messages.split_aggregate(agg, 100) == [(9, 100, b"\x17\x01v"), (8, 120, b"\xaf\x01a")]
    with pytest.raises(RtmpProtocolError):
        messages.split_aggregate(agg[:-5], 0)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_aggregate_random_input_only_raises_protocol_error(data: bytes) -> None:
    try:
        messages.split_aggregate(data, 0)
    except RtmpProtocolError:
        pass
