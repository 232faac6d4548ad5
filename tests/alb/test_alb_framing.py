"""Our framing code (chunk encoding, request/response heads) checked against llhttp, with
Hypothesis feeding the bytes in random splits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_alb.http.framing import (
    _REPLACED,
    HOP_BY_HOP,
    LAST_CHUNK,
    REASONS,
    VIA_TOKEN,
    ForwardInfo,
    FramingError,
    Headers,
    RequestHead,
    ResponseHead,
    _is_token,
    absolute_form,
    build_request_head,
    build_response_head,
    encode_chunk,
    framing_of,
    response_has_body,
    split_target,
)
from tests.alb.alb_support import raw_exchange, route


class Collect:
    def __init__(self) -> None:
        self.body = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.done = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, k: bytes, v: bytes) -> None:
        self.headers.append((k, v))

    def on_body(self, b: bytes) -> None:
        self.body += b

    def on_message_complete(self) -> None:
        self.done += 1


def feed_split(parser: object, data: bytes, cuts: list[int]) -> None:
    pos = 0
    for c in [*sorted({min(max(c, 0), len(data)) for c in cuts}), len(data)]:
        if c > pos:
            parser.feed_data(data[pos:c])  # type: ignore[attr-defined]
            pos = c


header_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(
    lambda s: ("x-" + s).encode()
)
header_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ,;=/", max_size=30).map(
    lambda s: s.strip().encode()
)


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=0, max_size=300), max_size=12),
    headers=st.lists(st.tuples(header_name, header_value), max_size=8),
    cuts=st.lists(st.integers(0, 5000), max_size=12),
)
def test_chunked_request_roundtrip_random_splits(chunks, headers, cuts) -> None:
    head = RequestHead(
        "POST", b"/p?q=1", "1.1", [(b"Host", b"h"), *headers], True, False, True, None
    )
    wire = build_request_head(head, ForwardInfo("10.0.0.1", "http", b"rid"))
    wire += b"".join(encode_chunk(c) for c in chunks) + LAST_CHUNK
    c = Collect()
    feed_split(httptools.HttpRequestParser(c), wire, cuts)
    assert c.done == 1
    assert c.body == b"".join(chunks)
    assert c.url == b"/p?q=1"
    got = [(k.lower(), v) for k, v in c.headers]
    for k, v in headers:
        assert (k, v) in got
    assert (b"x-forwarded-for", b"10.0.0.1") in got
    assert (b"transfer-encoding", b"chunked") in got


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=2000),
    status=st.sampled_from([200, 201, 404, 500, 503]),
    chunked=st.booleans(),
    version=st.sampled_from(["1.0", "1.1"]),
    cuts=st.lists(st.integers(0, 3000), max_size=10),
)
def test_response_head_framing_parses(body, status, chunked, version, cuts) -> None:
    resp = ResponseHead(
        status,
        b"",
        "1.1",
        [(b"Content-Type", b"text/plain")],
        True,
        chunked,
        None if chunked else len(body),
    )
    data, framing = build_response_head(
        resp, method="GET", client_version=version, keep_alive=True, request_id=b"r1"
    )
    if framing == "chunked":
        data += encode_chunk(body) + LAST_CHUNK
    elif framing == "length":
        data = data.replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    else:
        assert framing == "close" and version == "1.0"
        data += body
    c = Collect()
    p = httptools.HttpResponseParser(c)
    feed_split(p, data, cuts)
    assert p.get_status_code() == status
    if framing != "close":
        assert c.done == 1
    assert c.body == body


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"X"]), st.binary(max_size=20)
        ),
        max_size=5,
    )
)
def test_framing_of_only_raises_framing_error(headers) -> None:
    status = 0
    try:
        chunked, length = framing_of(headers)
    except FramingError as exc:
        status = exc.status
    if status:
        assert status in (400, 501)
    else:
        assert length is None or length >= 0
        assert not (chunked and length is not None)


@pytest.mark.parametrize(
    ("values", "want"),
    [
        ([b"chunked"], (True, None)),
        ([b" Chunked "], (True, None)),
        ([b"gzip, chunked"], 501),  # we would drop the gzip coding: refuse, do not corrupt
        ([b"gzip", b"chunked"], 501),  # the same list over two header lines
        ([b"chunked, chunked"], 400),  # RFC 9112 §7: chunked at most once
        ([b"chunked, gzip"], 400),  # RFC 9112 §6.3: chunked not final → 400
        ([b"gzip"], 400),
        ([b""], 400),
        ([b","], 400),
    ],
)
def test_transfer_coding_must_be_exactly_chunked(values: list[bytes], want) -> None:
    headers = [(b"Transfer-Encoding", v) for v in values]
    if isinstance(want, int):
        with pytest.raises(FramingError) as exc:
            framing_of(headers)
        assert exc.value.status == want
    else:
        assert framing_of(headers) == want


async def test_gzip_chunked_request_is_501_through_the_proxy(alb, backends) -> None:
    b = await backends()
    await alb.configure([route("all", b.url)])
    out = await raw_exchange(
        alb.port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 501 "), out[:200]
    assert b.requests == []


async def test_gzip_chunked_response_is_502_not_a_corrupt_body(alb) -> None:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await alb.configure([route("all", f"http://127.0.0.1:{port}", backend={"retries": 0})])
        out = await raw_exchange(
            alb.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
    finally:
        server.close()
        await server.wait_closed()
    assert out.startswith(b"HTTP/1.1 502 "), out[:200]


@given(st.binary(max_size=200))
def test_split_target_total(target) -> None:
    path, _ = split_target(target)
    assert path.startswith("/") or path


def test_hop_by_hop_and_connection_tokens_removed() -> None:
    head = RequestHead(
        "GET",
        b"/",
        "1.1",
        [
            (b"Host", b"h"),
            (b"Connection", b"close, X-Drop"),
            (b"X-Drop", b"1"),
            (b"Keep-Alive", b"5"),
            (b"Upgrade", b"h2c"),
            (b"X-Keep", b"2"),
        ],
        False,
        False,
        False,
        None,
    )
    wire = build_request_head(head, ForwardInfo("::1", "https", b"id"))
    assert b"X-Drop" not in wire and b"Keep-Alive" not in wire and b"h2c" not in wire
    assert b"X-Keep: 2" in wire
    assert b'Forwarded: for="[::1]";proto=https;host=h' in wire


# ---- differential: the one-pass builders against the original straightforward ones ----------


def _ref_connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in Connection (RFC 9110 §7.6.1), lower-cased."""
    out: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            out.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return out


def _ref_strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    drop = HOP_BY_HOP | _ref_connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def _ref_build_request_head(
    req: RequestHead,
    fwd: ForwardInfo,
    *,
    host_override: bytes | None = None,
) -> bytes:
    """The request head to send upstream (always HTTP/1.1, keep-alive unless upgrading)."""
    headers = _ref_strip_hop_by_hop(req.headers)
    host = req.header(b"host") or b""
    out: Headers = []
    xff: bytes | None = None
    fwd_prior: bytes | None = None
    via_prior: bytes | None = None
    for k, v in headers:
        lk = k.lower()
        if lk == b"x-forwarded-for":
            xff = v if xff is None else xff + b", " + v
        elif lk == b"forwarded":
            fwd_prior = v if fwd_prior is None else fwd_prior + b", " + v
        elif lk == b"via":
            via_prior = v if via_prior is None else via_prior + b", " + v
        elif lk in _REPLACED or (lk == b"host" and host_override is not None):
            continue
        else:
            out.append((k, v))
    if host_override is not None:
        out.insert(0, (b"Host", host_override))
    client = fwd.client_ip.encode()
    out.append((b"X-Forwarded-For", client if xff is None else xff + b", " + client))
    out.append((b"X-Forwarded-Proto", fwd.proto.encode()))
    if host:
        out.append((b"X-Forwarded-Host", host))
    node = b'"[' + client + b']"' if b":" in client else client
    elem = b"for=" + node + b";proto=" + fwd.proto.encode()
    if host and _is_token(host):
        elem += b";host=" + host
    elif host:
        elem += b';host="' + host.replace(b'"', b"") + b'"'
    out.append((b"Forwarded", elem if fwd_prior is None else fwd_prior + b", " + elem))
    out.append((b"Via", VIA_TOKEN if via_prior is None else via_prior + b", " + VIA_TOKEN))
    out.append((b"X-Request-ID", fwd.request_id))
    if req.upgrade:
        up = req.header(b"upgrade") or b""
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", up))
    if req.chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    elif req.content_length is not None:
        pass  # Content-Length is end-to-end and already in ``out``
    return _ref__serialize(req.method.encode() + b" " + req.target + b" HTTP/1.1", out)


def _ref_build_response_head(
    resp: ResponseHead,
    *,
    method: str,
    client_version: str,
    keep_alive: bool,
    request_id: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> tuple[bytes, str]:
    """The response head for the client and its body framing: "length", "chunked", "close",
    "none" or "tunnel". The caller closes the client connection for "close"."""
    if resp.status == 101:
        headers = [(k, v) for k, v in resp.headers if k.lower() not in (b"connection", b"upgrade")]
        up = next((v for k, v in resp.headers if k.lower() == b"upgrade"), b"")
        headers += [(b"Connection", b"Upgrade"), (b"Upgrade", up)]
        headers.append((b"Via", VIA_TOKEN))
        return _ref__serialize(
            b"HTTP/1.1 101 " + (resp.reason or b"Switching Protocols"), headers
        ), ("tunnel")
    headers = _ref_strip_hop_by_hop(resp.headers)
    headers = [(k, v) for k, v in headers if k.lower() not in (b"via", b"x-request-id")]
    via_prior = b", ".join(v for k, v in resp.headers if k.lower() == b"via")
    headers.append((b"Via", via_prior + b", " + VIA_TOKEN if via_prior else VIA_TOKEN))
    headers.append((b"X-Request-ID", request_id))
    headers.extend(extra)
    if not response_has_body(resp.status, method):
        framing = "none"
    elif resp.content_length is not None and not resp.chunked:
        framing = "length"
    elif client_version == "1.1":
        framing = "chunked"
        headers.append((b"Transfer-Encoding", b"chunked"))
    else:
        framing = "close"
        keep_alive = False
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    elif client_version == "1.0":
        headers.append((b"Connection", b"keep-alive"))
    line = b"HTTP/1.1 %d %s" % (resp.status, resp.reason or REASONS.get(resp.status, b"Unknown"))
    return _ref__serialize(line, headers), framing


def _ref__serialize(start_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts = [start_line]
    for k, v in headers:
        parts.append(k + b": " + v)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


hdr_names = st.sampled_from(
    [
        b"Host",
        b"Accept",
        b"X-A",
        b"Via",
        b"X-Forwarded-For",
        b"Forwarded",
        b"Keep-Alive",
        b"TE",
        b"Trailer",
        b"Upgrade",
        b"X-Request-ID",
        b"Content-Type",
        b"X-B",
        b"Server",
    ]
)
hdr_values = st.sampled_from([b"1", b"a b", b"h.example:80", b"x, y", b"v"])
conn_values = st.sampled_from([b"keep-alive", b"close", b"X-A", b"keep-alive, X-B", b"Upgrade"])


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(hdr_names, hdr_values), max_size=8),
    conn=st.one_of(st.none(), conn_values),
    override=st.one_of(st.none(), st.just(b"t:1")),
    chunked=st.booleans(),
    upgrade=st.booleans(),
)
def test_one_pass_request_head_matches_reference(headers, conn, override, chunked, upgrade):
    hosts = [h for h in headers if h[0] == b"Host"]
    headers = [h for h in headers if h[0] != b"Host"] + hosts[:1]  # one Host at most
    if conn is not None:
        headers.append((b"Connection", conn))
    head = RequestHead("GET", b"/p", "1.1", headers, True, upgrade, chunked, None)
    fwd = ForwardInfo("10.1.2.3", "https", b"rid")
    assert build_request_head(head, fwd, host_override=override) == _ref_build_request_head(
        head, fwd, host_override=override
    )


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.lists(st.tuples(hdr_names, hdr_values), max_size=4),
            st.one_of(st.none(), st.just(b"t:1")),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_request_heads_on_one_connection_match_reference(requests):
    """One ForwardInfo for a connection's requests (it keeps the last field lines): each head
    is what a fresh build gives, whatever the requests before it sent."""
    fwd = ForwardInfo("10.1.2.3", "http", b"rid")
    for i, (headers, override, chunked, upgrade) in enumerate(requests):
        hosts = [h for h in headers if h[0] == b"Host"]
        headers = [h for h in headers if h[0] != b"Host"] + hosts[:1]
        head = RequestHead("GET", b"/%d" % i, "1.1", list(headers), True, upgrade, chunked, None)
        fwd.request_id = b"r%d" % i
        fresh = ForwardInfo("10.1.2.3", "http", fwd.request_id)
        assert build_request_head(head, fwd, host_override=override) == _ref_build_request_head(
            head, fresh, host_override=override
        )
        # the same fields again: from the kept lines
        again = RequestHead("GET", b"/again", "1.1", list(headers), True, upgrade, chunked, None)
        assert build_request_head(again, fwd, host_override=override) == _ref_build_request_head(
            again, fresh, host_override=override
        )


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(hdr_names, hdr_values), max_size=8),
    conn=st.one_of(st.none(), conn_values),
    status=st.sampled_from([200, 204, 304, 404, 500]),
    chunked=st.booleans(),
    version=st.sampled_from(["1.0", "1.1"]),
    keep=st.booleans(),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_one_pass_response_head_matches_reference(
    headers, conn, status, chunked, version, keep, method
):
    if conn is not None:
        headers.append((b"Connection", conn))
    resp = ResponseHead(status, b"", "1.1", headers, True, chunked, None if chunked else 3)
    kw = {
        "method": method,
        "client_version": version,
        "keep_alive": keep,
        "request_id": b"r",
        "extra": [(b"X-RateLimit-Limit", b"5")],
    }
    assert build_response_head(resp, **kw) == _ref_build_response_head(resp, **kw)


def test_absolute_form() -> None:
    assert absolute_form(b"/x") is None
    assert absolute_form(b"http://h:8/a?b") == (b"h:8", b"/a?b")
    assert absolute_form(b"HTTPS://u:p@h?q") == (b"h", b"/?q")
    assert absolute_form(b"http://h") == (b"h", b"/")
