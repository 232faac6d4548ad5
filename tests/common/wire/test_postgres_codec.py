"""Sans-IO Postgres codec: framing at every split, round trips, caps, and only our error type."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_common.wire.postgres import (
    BackendDecoder,
    CancelRequest,
    DecoderState,
    FrontendDecoder,
    GSSENCRequest,
    Message,
    RemoteProtocolError,
    SSLRequest,
    StartupMessage,
)
from marchproxy_common.wire.postgres import encoder as enc
from marchproxy_common.wire.postgres.auth import (
    ScramClient,
    ScramServer,
    ScramVerifier,
    md5_hash,
    md5_response,
)
from marchproxy_common.wire.postgres.decoder import (
    FRONTEND_MESSAGE_TYPES,
    parse_bind,
    parse_data_row,
    parse_describe_or_close,
    parse_fields,
    parse_parameter_status,
    parse_parse,
    parse_startup_parameters,
)
from marchproxy_common.wire.postgres.messages import MAX_STARTUP_PACKET

SETTINGS = settings(max_examples=200, deadline=None)

names = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
)
values = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=30,
)
frontend_types = st.sampled_from(sorted(FRONTEND_MESSAGE_TYPES - {ord("X")}))
frontend_messages = st.builds(
    lambda t, body: Message(t, body, len(body)), frontend_types, st.binary(max_size=200)
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in points:
        chunks.append(data[prev:p])
        prev = p
    chunks.append(data[prev:])
    return chunks


def _feed_all(decoder: FrontendDecoder, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for c in chunks:
        events.extend(decoder.feed(c))
    return events


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    """A valid client byte stream and the events it must produce."""
    out = b""
    events: list[object] = []
    if draw(st.booleans()):
        out += enc.ssl_request()
        events.append(SSLRequest())
    params = draw(st.dictionaries(names, values, max_size=4))
    params["user"] = draw(names)
    out += enc.startup_message(params)
    events.append(StartupMessage(196608, params))
    for m in draw(st.lists(frontend_messages, max_size=8)):
        out += m.raw
        events.append(m)
    return out, events


@SETTINGS
@given(client_streams(), st.lists(st.integers(min_value=0), max_size=8))
def test_frontend_stream_same_events_at_any_split(
    stream: tuple[bytes, list[object]], cuts: list[int]
) -> None:
    data, expected = stream
    assert _feed_all(FrontendDecoder(), [data]) == expected
    assert _feed_all(FrontendDecoder(), _split(data, cuts)) == expected


@SETTINGS
@given(
    st.sampled_from([enc.ssl_request(), struct.pack("!II", 8, 80877104)]),
    client_streams(),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_strict_negotiation_rejects_data_in_the_same_read_as_the_request(
    request: bytes, stream: tuple[bytes, list[object]], cuts: list[int]
) -> None:
    """CVE-2021-23214: bytes that came with an SSL/GSSENC request were sent in clear."""
    rest, expected = stream
    if expected[:1] == [SSLRequest()]:
        rest, expected = rest[8:], expected[1:]
    data = request + rest
    chunks = _split(data, cuts)
    first_end = 0
    for chunk in chunks:  # the chunk that completes the request
        first_end += len(chunk)
        if first_end >= len(request):
            break
    decoder = FrontendDecoder(strict_negotiation=True)
    if first_end > len(request):
        with pytest.raises(RemoteProtocolError, match="received unencrypted data after") as exc:
            _feed_all(decoder, chunks)
        assert exc.value.sqlstate == "08P01"
    else:
        events = _feed_all(decoder, chunks)
        assert events[1:] == expected
        assert isinstance(events[0], SSLRequest | GSSENCRequest)


@settings(max_examples=60, deadline=None)
@given(client_streams())
def test_frontend_stream_byte_by_byte(stream: tuple[bytes, list[object]]) -> None:
    data, expected = stream
    decoder = FrontendDecoder()
    assert _feed_all(decoder, [data[i : i + 1] for i in range(len(data))]) == expected
    decoder.feed_eof()


@SETTINGS
@given(client_streams(), st.integers(min_value=1))
def test_truncated_stream_is_detected_at_eof(stream: tuple[bytes, list[object]], cut: int) -> None:
    data, _ = stream
    cut = cut % len(data)
    decoder = FrontendDecoder()
    try:
        decoder.feed(data[:cut])
    except RemoteProtocolError:
        return
    try:
        decoder.feed_eof()
    except RemoteProtocolError:
        return
    # a cut exactly between two packets is a clean end
    rest = FrontendDecoder()
    rest.feed(data[:cut])


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=6))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes, cuts: list[int]) -> None:
    for decoder_input in (data, enc.startup_message({"user": "u"}) + data):
        decoder = FrontendDecoder()
        sqlstate = "08P01"
        try:
            _feed_all(decoder, _split(decoder_input, cuts))
            decoder.feed_eof()
        except RemoteProtocolError as exc:
            sqlstate = exc.sqlstate
        assert sqlstate in ("08P01", "0A000")


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=6))
def test_backend_random_bytes_only_raise_remote_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    decoder = BackendDecoder(max_message_len=1000)
    try:
        for c in _split(data, cuts):
            decoder.feed(c)
        decoder.feed_eof()
    except RemoteProtocolError:
        pass


backend_messages = st.sampled_from(
    [
        enc.authentication_ok(),
        enc.authentication_md5(b"abcd"),
        enc.authentication_sasl(["SCRAM-SHA-256"]),
        enc.parameter_status("client_encoding", "UTF8"),
        enc.backend_key_data(1234, -5678),
        enc.ready_for_query(b"T"),
        enc.error_response("42601", "syntax error"),
        enc.notice_response("hello"),
        enc.row_description([("a", 25), ("b", 20)]),
        enc.data_row(["x", None, b"\x00\xff"]),
        enc.command_complete("SELECT 1"),
        enc.parse_complete(),
        enc.empty_query_response(),
    ]
)


@SETTINGS
@given(st.lists(backend_messages, max_size=10), st.lists(st.integers(min_value=0), max_size=8))
def test_backend_framing_at_any_split(msgs: list[bytes], cuts: list[int]) -> None:
    data = b"".join(msgs)
    decoder = BackendDecoder()
    got: list[Message] = []
    for c in _split(data, cuts):
        got.extend(decoder.feed(c, full=True))
    assert [m.raw for m in got] == msgs
    decoder.feed_eof()


def test_skip_bodies_keeps_length() -> None:
    decoder = BackendDecoder(skip_bodies=frozenset({ord("D")}))
    row = enc.data_row(["abc"])
    (m,) = decoder.feed(row)
    assert m.body == b""
    assert m.length == len(row) - 5
    (m,) = decoder.feed(row, full=True)
    assert m.raw == row


def test_startup_packets() -> None:
    d = FrontendDecoder()
    assert d.feed(enc.ssl_request()) == [SSLRequest()]
    assert d.feed(struct.pack("!II", 8, 80877104)) == [GSSENCRequest()]
    assert d.state is DecoderState.STARTUP
    assert d.feed(enc.cancel_request(7, -9)) == [CancelRequest(7, -9)]
    assert d.state is DecoderState.CLOSED
    with pytest.raises(RemoteProtocolError):
        d.feed(b"x")


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!I", MAX_STARTUP_PACKET + 1),  # over Postgres' MAX_STARTUP_PACKET_LENGTH
        # the same, whole in one read (the decoder's one-packet fast path)
        struct.pack("!II", MAX_STARTUP_PACKET + 1, 196608) + bytes(MAX_STARTUP_PACKET - 7),
        struct.pack("!I", 4),  # shorter than length + code
        struct.pack("!II", 8, 131072),  # protocol 2.0
        struct.pack("!II", 12, 80877103) + b"abcd",  # SSLRequest with a payload
        enc.startup_message({"database": "x"}),  # no user
    ],
)
def test_bad_startup_packets(packet: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        FrontendDecoder().feed(packet)


def test_buffered_counts_what_waits_for_the_rest() -> None:
    d = FrontendDecoder()
    startup = enc.startup_message({"user": "u"})
    assert d.feed(startup[:5]) == [] and d.buffered == 5
    assert len(d.feed(startup[5:])) == 1 and d.buffered == 0
    query = enc.query("select 1")
    assert d.feed(query[:-1]) == [] and d.buffered == len(query) - 1
    assert len(d.feed(query[-1:])) == 1 and d.buffered == 0


def test_message_caps() -> None:
    d = FrontendDecoder(max_message_len=100)
    d.feed(enc.startup_message({"user": "u"}))
    d.feed(enc.query("x" * 50))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        d.feed(b"Q" + struct.pack("!I", 10_000))  # rejected before the body arrives
    with pytest.raises(RemoteProtocolError, match="invalid message type"):
        FrontendDecoder().feed(enc.startup_message({"user": "u"}) + b"Z\x00\x00\x00\x04")


def test_terminate_then_data_is_an_error() -> None:
    d = FrontendDecoder()
    with pytest.raises(RemoteProtocolError):
        d.feed(enc.startup_message({"user": "u"}) + enc.terminate() + enc.sync())


@SETTINGS
@given(st.dictionaries(names, values, max_size=6))
def test_startup_parameters_round_trip(params: dict[str, str]) -> None:
    packet = enc.startup_message(params)
    assert parse_startup_parameters(packet[8:]) == params


@SETTINGS
@given(st.dictionaries(names, values, max_size=6))
def test_feed_startup_gives_what_feed_gives_for_one_whole_startup(params: dict[str, str]) -> None:
    packet = enc.startup_message({"user": "u", **params})
    fast, general = FrontendDecoder(), FrontendDecoder()
    assert fast.feed_startup(packet) == general.feed(packet)[0]
    assert fast.state is general.state is DecoderState.MESSAGES
    assert fast.feed(enc.sync()) == general.feed(enc.sync())


def test_feed_startup_leaves_anything_else_to_feed() -> None:
    startup = enc.startup_message({"user": "u"})
    assert FrontendDecoder().feed_startup(enc.ssl_request()) is None
    assert FrontendDecoder().feed_startup(startup[:-1]) is None
    assert FrontendDecoder().feed_startup(startup + enc.sync()) is None
    assert FrontendDecoder().feed_startup(struct.pack("!ii", 8, 2 << 16)) is None  # protocol 2
    buffered = FrontendDecoder()
    assert buffered.feed(startup[:3]) == []
    assert buffered.feed_startup(startup[3:]) is None
    after = FrontendDecoder()
    after.feed(startup)
    assert after.feed_startup(startup) is None
    with pytest.raises(RemoteProtocolError):
        FrontendDecoder().feed_startup(enc.startup_message({"database": "d"}))


@SETTINGS
@given(st.binary(max_size=20).filter(lambda b: b"\x00" not in b), st.binary(max_size=50))
def test_parse_bind_describe_round_trip(name: bytes, tail: bytes) -> None:
    query = tail.replace(b"\x00", b"")
    parse = enc.parse(name, query, struct.pack("!hii", 2, 23, 25))
    got_name, got_query, rest = parse_parse(parse[5:])
    assert (got_name, got_query) == (name, query)
    assert enc.parse(got_name, got_query, rest) == parse
    bind_body = b"portal\x00" + name + b"\x00" + b"\x00\x00\x00\x00\x00\x00"
    portal, stmt, offset = parse_bind(bind_body)
    assert (portal, stmt, bind_body[offset:]) == (b"portal", name, b"\x00" * 6)
    assert parse_describe_or_close(b"S" + name + b"\x00") == (ord("S"), name)


def test_error_fields_and_parameter_status() -> None:
    err = enc.error_response("08P01", "bad", extra={"D": "detail"})
    fields = parse_fields(err[5:])
    assert fields["C"] == "08P01" and fields["M"] == "bad" and fields["D"] == "detail"
    assert parse_parameter_status(enc.parameter_status("a", "b")[5:]) == ("a", "b")


# RFC 7677 section 3: SCRAM-SHA-256 exchange for user "user", password "pencil"
RFC7677_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC7677_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC7677_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC7677_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_client_matches_rfc7677_test_vector() -> None:
    client = ScramClient("pencil", nonce=RFC7677_CLIENT_NONCE, username="user")
    assert client.client_first() == RFC7677_CLIENT_FIRST
    assert client.client_final(RFC7677_SERVER_FIRST) == RFC7677_CLIENT_FINAL
    client.verify_server_final(RFC7677_SERVER_FINAL)
    with pytest.raises(RemoteProtocolError, match="signature mismatch"):
        client.verify_server_final(b"v=" + b"A" * 43 + b"=")


def test_scram_server_matches_rfc7677_test_vector() -> None:
    import base64

    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = ScramVerifier.from_password("pencil", salt=salt, iterations=4096)
    server = ScramServer(verifier, nonce=RFC7677_SERVER_NONCE)
    assert server.server_first(RFC7677_CLIENT_FIRST) == RFC7677_SERVER_FIRST
    assert server.verify_final(RFC7677_CLIENT_FINAL) == RFC7677_SERVER_FINAL


def test_scram_client_default_sends_an_empty_username_like_libpq() -> None:
    assert ScramClient("x", nonce="abc").client_first() == b"n,,n=,r=abc"
    assert ScramClient("x", nonce="abc", username="a=b,c").client_first() == b"n,,n=a=3Db=2Cc,r=abc"


def test_md5_known_value() -> None:
    # md5(md5("secret" + "alice").hex + salt) computed independently with hashlib
    import hashlib

    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"salt").hexdigest()
    assert md5_response("alice", "secret", b"salt") == expected
    assert md5_response("alice", md5_hash("alice", "secret"), b"salt") == expected


@settings(max_examples=10, deadline=None)
@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_scram_handshake(password: str, wrong: str) -> None:
    verifier = ScramVerifier.from_password(password, iterations=64)
    assert ScramVerifier.parse(str(verifier)) == verifier
    client, server = ScramClient(password), ScramServer(verifier)
    server_first = server.server_first(client.client_first())
    final = server.verify_final(client.client_final(server_first))
    client.verify_server_final(final)
    if wrong != password:
        bad, server2 = ScramClient(wrong), ScramServer(verifier)
        first = server2.server_first(bad.client_first())
        with pytest.raises(RemoteProtocolError) as info:
            server2.verify_final(bad.client_final(first))
        assert info.value.sqlstate == "28P01"


@settings(max_examples=10, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_scram_pass_through_with_the_client_key_a_server_recovered(password: str) -> None:
    """A proxy that verified a client (ServerKey from the verifier, ClientKey from the proof)
    can log in to a server holding the same verifier without knowing the password."""
    verifier = ScramVerifier.from_password(password, iterations=64)
    client, proxy = ScramClient(password), ScramServer(verifier)
    proxy.verify_final(client.client_final(proxy.server_first(client.client_first())))
    assert proxy.client_key is not None
    keys = (proxy.client_key, verifier.server_key)
    upstream = ScramServer(verifier)
    relay = ScramClient("", keys=keys)
    final = upstream.verify_final(relay.client_final(upstream.server_first(relay.client_first())))
    relay.verify_server_final(final)
    # the same bytes as a client that knows the password (same nonces)
    a, b = ScramClient(password, nonce="n0nce"), ScramClient("", nonce="n0nce", keys=keys)
    first = ScramServer(verifier, nonce="srv").server_first(a.client_first())
    assert a.client_final(first) == b.client_final(first)


values_or_null = st.one_of(st.none(), st.binary(max_size=40))


@SETTINGS
@given(st.lists(values_or_null, max_size=12))
def test_data_row_round_trip(values: list[bytes | None]) -> None:
    raw = enc.data_row(values)
    (msg,) = BackendDecoder().feed(raw)
    assert parse_data_row(msg.body) == values


@SETTINGS
@given(st.binary(max_size=80))
def test_data_row_garbage_only_raises_our_error(body: bytes) -> None:
    try:
        values = parse_data_row(body)
    except RemoteProtocolError:
        return
    assert enc.data_row(values)[5:] == body  # whatever parses is a valid DataRow


@SETTINGS
@given(names, names, st.lists(values_or_null, max_size=6))
def test_bind_and_execute_encode_what_the_decoder_reads(
    portal: str, statement: str, params: list[bytes | None]
) -> None:
    raw = enc.bind(statement.encode(), params, portal=portal.encode()) + enc.execute(b"", 5)
    bind_msg, execute_msg = FrontendDecoder().feed(enc.startup_message({"user": "u"}) + raw)[1:]
    assert isinstance(bind_msg, Message) and isinstance(execute_msg, Message)
    got_portal, got_statement, offset = parse_bind(bind_msg.body)
    assert (got_portal, got_statement) == (portal.encode(), statement.encode())
    rest = bind_msg.body[offset:]
    assert rest[:4] == struct.pack("!hh", 0, len(params))
    assert execute_msg.body == b"\x00" + struct.pack("!i", 5)


@SETTINGS
@given(st.binary(max_size=120), st.binary(max_size=120))
def test_scram_garbage_only_raises_our_error(first: bytes, final: bytes) -> None:
    server = ScramServer(ScramVerifier.from_password("pw", iterations=16))
    try:
        server.server_first(first)
        server.verify_final(final)
    except RemoteProtocolError:
        pass
    client = ScramClient("pw")
    client.client_first()
    try:
        client.client_final(first)
        client.verify_server_final(final)
    except RemoteProtocolError:
        pass


@SETTINGS
@given(
    st.lists(backend_messages, min_size=1, max_size=10),
    st.lists(st.integers(min_value=0), max_size=8),
    st.booleans(),
)
def test_feed_framed_returns_exactly_the_complete_messages(
    msgs: list[bytes], cuts: list[int], full: bool
) -> None:
    """Raw bytes handed back never include a partial message, whatever the read sizes."""
    data = b"".join(msgs)
    decoder = BackendDecoder(skip_bodies=frozenset({ord("D")}))
    forwarded = b""
    count = 0
    for chunk in _split(data, cuts):
        got, raw = decoder.feed_framed(chunk, full=full)
        assert raw == b"".join(msgs[count : count + len(got)])
        count += len(got)
        forwarded += raw
    assert forwarded == data
