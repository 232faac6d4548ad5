"""framing.scan_simple_response plus llhttp's one-message check (``_WholeMessage``), the
upstream response read without httptools' per-header callbacks: wherever both accept, the
client receives the same response as through the httptools path (same status, reason, fields,
framing and end of message); anything unusual is left to httptools."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_alb.http.framing import (
    FramingError,
    ResponseHead,
    build_response_head,
    framing_of,
    scan_simple_response,
)
from marchproxy_alb.http.upstream import _WholeMessage

LIMITS = {"max_head": 64 * 1024, "max_headers": 200}


class Reference:
    """What UpstreamConnection builds from httptools' callbacks."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.head: ResponseHead | None = None
        self.complete = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        chunked, length = framing_of(self.headers)
        self.head = ResponseHead(
            p.get_status_code(),
            self.reason,
            p.get_http_version(),
            self.headers,
            p.should_keep_alive(),
            chunked,
            length,
        )

    def on_message_complete(self) -> None:
        self.complete += 1


def parse_with_httptools(data: bytes) -> tuple[ResponseHead, int] | None:
    """(head, body offset) when httptools reads ``data`` as exactly one whole response."""
    ref = Reference()
    try:
        ref.parser.feed_data(data)
    except (httptools.HttpParserError, FramingError):
        return None
    if ref.head is None or ref.complete != 1 or ref.head.content_length is None:
        return None
    return ref.head, len(data) - ref.head.content_length


def scan(data: bytes) -> tuple[ResponseHead, int] | None:
    """What UpstreamConnection.data_received takes from the scan."""
    found = scan_simple_response(data, **LIMITS)
    if found is None:
        return None
    checker = _WholeMessage()
    if not checker.one_message(data) or checker.keep_alive != found[0].keep_alive:
        return None
    return found


def client_view(head: ResponseHead, client_version: str, keep_alive: bool) -> tuple[object, ...]:
    out, framing = build_response_head(
        head, method="GET", client_version=client_version, keep_alive=keep_alive, request_id=b"r"
    )
    ref = Reference()
    ref.parser.feed_data(out)
    assert ref.head is not None
    h = ref.head
    return (h.status, h.reason, h.headers, h.keep_alive, h.content_length, framing)


def check(data: bytes) -> tuple[ResponseHead, int] | None:
    got = scan(data)
    if got is not None:
        expected = parse_with_httptools(data)
        assert expected is not None, "the scan accepted what httptools refuses"
        assert got[1] == expected[1]
        assert got[0].keep_alive == expected[0].keep_alive
        assert got[0].content_length == expected[0].content_length
        for version in ("1.1", "1.0"):
            for keep in (True, False):
                assert client_view(got[0], version, keep) == client_view(expected[0], version, keep)
    return got


NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 06:00:00 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 92\r\nLast-Modified: Mon, 07 Dec 2026 05:"
    b'00:00 GMT\r\nConnection: keep-alive\r\nETag: "6756b7e0-5c"\r\nAccept-Ranges: bytes\r\n\r\n'
) + b"x" * 92


def test_a_common_response_is_scanned() -> None:
    got = check(NGINX)
    assert got is not None
    head, start = got
    assert (head.status, head.reason, head.keep_alive, head.content_length) == (
        200,
        b"OK",
        True,
        92,
    )
    assert NGINX[start:] == b"x" * 92
    assert head.fields is not None
    assert b"Connection" not in head.fields
    assert b"\r\nContent-Length: 92\r\n" in head.fields


@pytest.mark.parametrize(
    "data",
    [
        NGINX[:-1],  # body incomplete
        NGINX + b"x",  # more than one response
        NGINX + NGINX,
        NGINX.replace(b"HTTP/1.1", b"HTTP/1.0"),
        NGINX.replace(b"200 OK", b"204 No Content"),
        NGINX.replace(b"200 OK", b"101 Switching Protocols"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + NGINX,
        NGINX.replace(b"Content-Length: 92", b"Transfer-Encoding: chunked"),
        NGINX.replace(b"Content-Length: 92", b"Content-Length: 92\r\nContent-Length: 92"),
        NGINX.replace(b"Content-Length: 92", b"Content-Length: +92"),
        NGINX.replace(b"Content-Length: 92", b"Content-Length: 91"),
        NGINX.replace(b"Connection: keep-alive", b"Connection: keep-alive, x-secret"),
        NGINX.replace(b"Connection: keep-alive", b"Upgrade: h2c"),
        NGINX.replace(b"Connection: keep-alive", b"Via: 1.1 other"),
        NGINX.replace(b"Server: nginx", b"Server :nginx"),
        NGINX.replace(b"\r\nDate", b"\r\n folded\r\nDate"),
        NGINX.replace(b"\r\nDate", b"\nDate"),
        NGINX.replace(b"\r\nDate", b"\rDate"),
        NGINX.replace(b"nginx/1.22.1", b"nginx\x00"),
    ],
)
def test_anything_unusual_is_left_to_httptools(data: bytes) -> None:
    assert check(data) is None


def test_limits_leave_big_heads_to_httptools() -> None:
    assert scan_simple_response(NGINX, max_head=100, max_headers=200) is None
    assert scan_simple_response(NGINX, max_head=65536, max_headers=7) is None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Connection: keep-alive", b"Connection: Close"),
        (b"Connection: keep-alive", b"Keep-Alive: timeout=5\r\nConnection: close"),
        (b"Connection: keep-alive", b"X-Request-ID: theirs\r\nProxy-Connection: x\r\nTE: y"),
        (b"Accept-Ranges: bytes", b"Trailer: x"),  # the last line cut
        (b"Server: nginx/1.22.1", b"connection: keep-alive"),  # the first line cut
    ],
)
def test_hop_by_hop_fields_are_cut(old: bytes, new: bytes) -> None:
    got = check(NGINX.replace(old, new))
    assert got is not None
    assert got[0].fields is not None
    low = got[0].fields.lower()
    for name in (b"connection", b"keep-alive", b"x-request-id", b"\r\nte:", b"trailer"):
        assert name not in low


_NAMES = st.sampled_from(
    [
        b"Content-Length",
        b"content-length",
        b"Transfer-Encoding",
        b"Connection",
        b"connection",
        b"Keep-Alive",
        b"Upgrade",
        b"Via",
        b"X-Request-Id",
        b"TE",
        b"Server",
        b"X-A",
        b"Set-Cookie",
        b"X Y",
        b"X:Y",
        b"",
        b"\xc3\xa9",
    ]
)
_VALUE_BYTES = st.sampled_from(
    [b"a", b"Z", b"0", b"7", b" ", b"\t", b",", b":", b"\x80", b"\xff", b"\x7f", b"\x01"]
)
_LINE_BREAKS = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n "])
_VALUES = st.one_of(
    st.lists(st.one_of(_VALUE_BYTES, _LINE_BREAKS), max_size=8).map(b"".join),
    st.sampled_from([b"close", b"keep-alive", b"Keep-Alive", b"chunked", b"5", b"05", b"x, y"]),
)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]))
    status = draw(st.sampled_from([b"200", b"404", b"503", b"204", b"304", b"100", b"99", b"2000"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Not\tFound", b" \xe9t\xe9", b" a b "]))
    lines = [version + b" " + status + reason]
    for name, sep, value, tail in draw(
        st.lists(
            st.tuples(
                _NAMES,
                st.sampled_from([b": ", b":", b":\t", b" : "]),
                _VALUES,
                st.sampled_from([b"", b" ", b"\t "]),
            ),
            max_size=6,
        )
    ):
        lines.append(name + sep + value + tail)
    body_len = draw(st.integers(0, 8))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(1, len(lines))), b"Content-Length: %d" % body_len)
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head + b"b" * draw(st.integers(0, 9))


@settings(max_examples=3000)
@given(responses())
def test_where_the_scan_answers_the_client_gets_the_same(data: bytes) -> None:
    check(data)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.sampled_from([b"X-A", b"Server", b"ETag"]), _VALUES), max_size=6),
    st.integers(0, 5),
)
def test_plain_responses_are_scanned(fields: list[tuple[bytes, bytes]], n: int) -> None:
    """The common shape (ordinary fields, one length) is always the scan's to answer."""
    lines = [b"HTTP/1.1 200 OK", *(k + b": " + v for k, v in fields), b"Content-Length: %d" % n]
    data = b"\r\n".join(lines) + b"\r\n\r\n" + b"b" * n
    expected = parse_with_httptools(data)
    got = check(data)
    clean = all(
        v and v == v.strip(b" \t") and not any((c < 0x20 and c != 9) or c == 0x7F for c in v)
        for _, v in fields
    )
    if clean and expected is not None:
        assert got is not None
