"""framing.scan_simple_request plus llhttp's one-message check, the client's request head read
without httptools' per-field callbacks: wherever both accept, the head agrees with the one the
httptools path builds (DownstreamProtocol.on_headers_complete) and the upstream receives the
same request; anything unusual is left to httptools."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_alb.http.framing import (
    ForwardInfo,
    FramingError,
    RequestHead,
    build_request_head,
    framing_of,
    scan_simple_request,
)
from marchproxy_alb.http.upstream import WholeMessage

LIMITS = {"max_request_line": 8192, "max_header_bytes": 65536, "max_headers": 100}
FWD = ForwardInfo("192.0.2.7", "http", b"rid-1")


class Reference:
    """The httptools path's RequestHead, with its refusals as None (the checks of
    DownstreamProtocol.on_url, on_header and on_headers_complete)."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: RequestHead | None = None
        self.complete = 0
        self.refused = False
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p, lim = self.parser, self.limits
        size = sum(len(k) + len(v) + 4 for k, v in self.headers)
        if (
            len(self.url) > lim["max_request_line"]
            or size > lim["max_header_bytes"]
            or len(self.headers) > lim["max_headers"]
            or self.url[:1] != b"/"
        ):
            self.refused = True
            return
        try:
            chunked, length = framing_of(self.headers)
        except FramingError:
            self.refused = True
            return
        hosts = [v for k, v in self.headers if k.lower() == b"host"]
        rids = [v for k, v in self.headers if k.lower() == b"x-request-id"]
        expect = [v for k, v in self.headers if k.lower() == b"expect"]
        version = p.get_http_version()
        if len(hosts) > 1 or (not hosts and version == "1.1"):
            self.refused = True
            return
        self.head = RequestHead(
            p.get_method().decode("ascii"),
            self.url,
            version,
            self.headers,
            p.should_keep_alive(),
            p.should_upgrade(),
            chunked,
            length,
            hosts[0] if hosts else None,
            expect[-1] if expect else None,
            rids[-1] if rids else None,
        )

    def on_message_complete(self) -> None:
        self.complete += 1


def parse_with_httptools(data: bytes, limits: dict[str, int]) -> RequestHead | None:
    ref = Reference(limits)
    try:
        ref.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return None
    except httptools.HttpParserError:
        return None
    if ref.refused or ref.head is None or ref.complete != 1:
        return None
    return ref.head


def scan(data: bytes, limits: dict[str, int]) -> RequestHead | None:
    """What DownstreamProtocol._simple_request takes from the scan."""
    if not data.endswith(b"\r\n\r\n"):
        return None
    head = scan_simple_request(data, **limits)
    if head is None:
        return None
    checker = WholeMessage(httptools.HttpRequestParser)
    if not checker.one_message(data) or checker.keep_alive != head.keep_alive:
        return None
    return head


def upstream_view(head: RequestHead, host_override: bytes | None) -> tuple[object, ...]:
    """The request the upstream receives: target, Host, the other fields in order."""
    out = build_request_head(head, FWD, host_override=host_override)
    ref = Reference(
        {"max_request_line": 1 << 30, "max_header_bytes": 1 << 30, "max_headers": 1 << 30}
    )
    ref.parser.feed_data(out)
    assert ref.complete == 1, out
    fields = ref.headers
    return (
        ref.parser.get_method(),
        ref.url,
        [v for k, v in fields if k.lower() == b"host"],
        [(k, v) for k, v in fields if k.lower() != b"host"],
    )


def check(data: bytes, limits: dict[str, int] = LIMITS) -> RequestHead | None:
    got = scan(data, limits)
    if got is not None:
        expected = parse_with_httptools(data, limits)
        assert expected is not None, "the scan accepted what the httptools path refuses"
        for attr in (
            "method", "target", "version", "keep_alive", "upgrade", "chunked",
            "content_length", "host", "expect", "request_id",
        ):  # fmt: skip
            assert getattr(got, attr) == getattr(expected, attr), attr
        for override in (None, b"10.0.0.1:8080"):
            assert upstream_view(got, override) == upstream_view(expected, override)
        # all_headers (for routing on fields): Host first, then the kept fields in order
        listed = [(k.lower(), v) for k, v in got.all_headers()]
        hosts = [(k.lower(), v) for k, v in expected.headers if k.lower() == b"host"]
        assert listed[: len(hosts)] == hosts
        others = listed[len(hosts) :]
        assert others == [(k.lower(), v) for k, v in expected.headers if (k.lower(), v) in others]
    return got


WRK = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
BROWSER = (
    b"GET /app/page?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozilla/5.0\r\n"
    b"Accept: text/html,*/*;q=0.8\r\nAccept-Language: en\r\nConnection: keep-alive\r\n"
    b"Cookie: a=b; c=d\r\nX-Request-ID: abc-123\r\nKeep-Alive: 300\r\n\r\n"
)


def test_common_requests_are_scanned() -> None:
    got = check(WRK)
    assert got is not None
    assert (got.target, got.host, got.fields) == (b"/index.html", b"127.0.0.1:8080", b"")
    got = check(BROWSER)
    assert got is not None
    assert got.request_id == b"abc-123"
    assert got.fields is not None
    for cut in (b"Host", b"Connection", b"X-Request-ID", b"Keep-Alive"):
        assert cut not in got.fields
    assert b"\r\nCookie: a=b; c=d" in got.fields


@pytest.mark.parametrize(
    "data",
    [
        WRK.replace(b"GET", b"POST"),
        WRK.replace(b"GET", b"HEAD"),
        WRK.replace(b"/index.html", b"http://a/index.html"),
        WRK.replace(b"/index.html", b"*"),
        WRK.replace(b"HTTP/1.1", b"HTTP/2.0"),
        WRK.replace(b"Host: 127.0.0.1:8080\r\n", b""),  # 1.1 without Host
        WRK.replace(b"\r\n\r\n", b"\r\nHost: b\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\nVia: 1.1 x\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive, x-secret\r\n\r\n"),
        WRK.replace(b"\r\n\r\n", b"\r\n folded\r\n\r\n"),
        WRK.replace(b"\r\nHost", b"\nHost"),
        WRK + WRK,  # pipelined
        WRK + b"\r\n",  # an empty line after the head
        WRK[:-2],  # incomplete
    ],
)
def test_anything_unusual_is_left_to_httptools(data: bytes) -> None:
    assert check(data) is None


def test_limits_leave_big_requests_to_httptools() -> None:
    assert check(WRK, {**LIMITS, "max_request_line": 5}) is None
    assert check(BROWSER, {**LIMITS, "max_header_bytes": 200}) is None
    assert check(BROWSER, {**LIMITS, "max_headers": 3}) is None


_NAMES = st.sampled_from(
    [
        b"Host", b"host", b"X-Request-ID", b"x-request-id", b"Connection", b"Keep-Alive",
        b"TE", b"Trailer", b"Proxy-Connection", b"Proxy-Authorization", b"X-Forwarded-Proto",
        b"X-Forwarded-Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade",
        b"X-Forwarded-For", b"Forwarded", b"Via", b"User-Agent", b"Accept", b"X-A",
        b"X Y", b"", b"\xc3\xa9",
    ]
)  # fmt: skip
_VALUE_BYTES = st.sampled_from(
    [b"a", b"Z", b"0", b"7", b" ", b"\t", b",", b":", b"\x80", b"\x7f", b"\x01"]
)
_LINE_BREAKS = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n "])
_VALUES = st.one_of(
    st.lists(st.one_of(_VALUE_BYTES, _LINE_BREAKS), max_size=8).map(b"".join),
    st.sampled_from([b"close", b"keep-alive", b" Keep-Alive ", b"chunked", b"0", b"example.com"]),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"HEAD", b"get"]))
    target = draw(st.sampled_from([b"/", b"/a?b=c", b"/a b", b"http://h/x", b"*", b"/%41", b""]))
    version = draw(st.sampled_from([b" HTTP/1.1", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2", b""]))
    lines = [method + b" " + target + version]
    if draw(st.booleans()):
        lines.append(b"Host: " + draw(st.sampled_from([b"a.example", b"a:1", b" b ", b""])))
    for name, sep, value in draw(
        st.lists(
            st.tuples(_NAMES, st.sampled_from([b": ", b":", b":\t", b" : "]), _VALUES),
            max_size=6,
        )
    ):
        lines.append(name + sep + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + draw(st.sampled_from([b"", b"", b"\r\n"]))


@settings(max_examples=3000)
@given(requests())
def test_where_the_scan_answers_the_upstream_gets_the_same(data: bytes) -> None:
    check(data)


@settings(max_examples=300)
@given(requests(), st.integers(1, 40), st.integers(1, 200), st.integers(1, 8))
def test_small_limits(data: bytes, line: int, size: int, count: int) -> None:
    check(data, {"max_request_line": line, "max_header_bytes": size, "max_headers": count})


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    check(data + b"\r\n\r\n")


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.sampled_from([b"User-Agent", b"Accept", b"X-A"]), _VALUES), max_size=6)
)
def test_plain_gets_are_scanned(fields: list[tuple[bytes, bytes]]) -> None:
    """The common shape (a Host and ordinary fields) is always the scan's to answer."""
    lines = [b"GET /x HTTP/1.1", b"Host: h", *(k + b": " + v for k, v in fields)]
    data = b"\r\n".join(lines) + b"\r\n\r\n"
    expected = parse_with_httptools(data, LIMITS)
    got = check(data)
    clean = all(
        v and v == v.strip(b" \t") and not any((c < 0x20 and c != 9) or c == 0x7F for c in v)
        for _, v in fields
    )
    if clean and expected is not None:
        assert got is not None
