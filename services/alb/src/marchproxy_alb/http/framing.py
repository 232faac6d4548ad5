"""HTTP/1.1 message framing for the proxy: pure functions, no I/O (RFC 9110 / RFC 9112).

httptools (llhttp) parses; this module decides what we *send*: the request head towards the
upstream (hop-by-hop headers removed, forwarding headers added), the response head towards the
client, chunk encoding, and the small JSON error responses.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 §7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection)
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: RFC 9110 §9.2.2
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

VIA_TOKEN = b"1.1 marchproxy-alb"

#: request headers the proxy sets itself (Expect is answered by the ALB, RFC 9110 §10.1.1)
_REPLACED = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id", b"expect"})

REASONS: dict[int, bytes] = {
    100: b"Continue",
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


class FramingError(Exception):
    """A message we cannot forward; ``status`` is what to answer the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes
    version: str  # "1.0" | "1.1"
    headers: Headers
    keep_alive: bool
    upgrade: bool
    chunked: bool
    content_length: int | None
    # picked out while the head is checked, so the proxy does not scan the headers again
    host: bytes | None = None
    expect: bytes | None = None
    request_id: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    #: set by scan_simple_response instead of ``headers``: the status line and the end-to-end
    #: field lines as received, each after a CRLF (hop-by-hop ones and X-Request-ID already
    #: cut; an empty reason phrase filled in as ``build_response_head`` would)
    fields: bytes | None = None


@dataclass(slots=True)  # not frozen: built for every request, and frozen init is slow
class ForwardInfo:
    client_ip: str
    proto: str  # "http" | "https"
    request_id: bytes
    #: build_request_head's last field lines for this client connection, and the header
    #: list and host override they were built from
    last_headers: Headers | None = None
    last_override: bytes | None = None
    last_fields: bytes = b""
    last_upgrade: bytes = b""


def connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in Connection (RFC 9110 §7.6.1), lower-cased."""
    out: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            out.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return out


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    drop = HOP_BY_HOP | connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def framing_of(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bool, int | None]:
    """(chunked, content_length) as declared; raises FramingError on conflicts (RFC 9112 §6.3)."""
    codings: list[bytes] | None = None
    length: int | None = None
    for k, v in headers:
        n = len(k)
        if n != 17 and n != 14:
            continue  # neither name: skip the lower() (this runs for every message)
        lk = k.lower()
        if lk == b"transfer-encoding":
            # several lines form one list (RFC 9110 §5.3)
            codings = (codings or []) + [c.strip().lower() for c in v.split(b",")]
        elif lk == b"content-length":
            vs = v.strip()
            if not vs.isdigit() or len(vs) > 18:
                raise FramingError(400, "invalid content-length")
            n = int(vs)
            if length is not None and length != n:
                raise FramingError(400, "conflicting content-length")
            length = n
    chunked = False
    if codings is not None:
        if codings.count(b"chunked") != 1 or codings[-1] != b"chunked" or b"" in codings:
            # RFC 9112 §6.3: chunked missing or not final (or twice, §7) → 400
            raise FramingError(400, "transfer-encoding must end with one chunked")
        if len(codings) > 1:
            # we re-chunk bodies and would drop the other codings: refuse rather than corrupt
            raise FramingError(501, "transfer codings other than chunked are not supported")
        chunked = True
    if chunked and length is not None:
        # request smuggling vector (RFC 9112 §6.1): refuse instead of guessing
        raise FramingError(400, "both transfer-encoding and content-length")
    return chunked, length


# ---- the upstream response head, the common case without httptools' per-header callbacks

#: response fields the scan acts on (lower case, after the CRLF that ends the line before):
#: hop-by-hop ones (RFC 9110 §7.6.1) and those we replace are cut, Content-Length is kept,
#: Transfer-Encoding and Upgrade mean "not simple"
_SPECIAL_RESPONSE_FIELD = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|proxy-authenticate|proxy-authorization|te"
    rb"|trailer|transfer-encoding|upgrade|via|x-request-id|content-length):[ \t]*([^\r]*)"
)


def scan_simple_response(
    data: bytes, *, max_head: int, max_headers: int
) -> tuple[ResponseHead, int] | None:
    """Split ``data`` as one whole common response, without per-header work: an HTTP/1.1
    status 2xx-5xx (not 204/304) line, field lines, one
    Content-Length that the rest of ``data`` matches, no Transfer-Encoding, Upgrade or Via,
    Connection absent or just ``close``/``keep-alive``. Returns the head, whose ``fields`` are
    the field lines as received minus the hop-by-hop ones and X-Request-ID, and where the body
    starts; else None.

    This does not check the syntax of the field lines (CRLF-terminated, no obs-fold, names
    that are tokens, ...): the caller must also have llhttp read ``data`` as exactly one
    message (``UpstreamConnection``; llhttp without field callbacks is cheap). Together they
    agree with the httptools path on what the client receives
    (tests/alb/test_alb_response_scan.py)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head or not data.startswith(b"HTTP/1.1 "):
        return None
    line_end = data.find(b"\r\n")
    status_b = data[9:12]
    if not status_b.isdigit() or data[12:13] not in (b" ", b"\r"):
        return None
    status = int(status_b)
    if not 200 <= status < 600 or status == 204 or status == 304:
        return None
    # the status line, then "\r\nName: value" lines (llhttp refuses bare CR or LF and
    # obs-fold: see the docstring); a line takes 4 bytes or more, so only a long head can
    # have too many. The status line goes to the client as received (the one copy made of it).
    block = data[:end]
    if len(block) >= 4 * max_headers and block.count(b"\r\n") > max_headers:
        return None
    low = block.lower()
    length: int | None = None
    keep_alive = True
    cut: list[bytes] | None = None
    for name, value in _SPECIAL_RESPONSE_FIELD.findall(low):
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
            continue
        if name == b"connection":
            if value == b"close":
                keep_alive = False
            elif value != b"keep-alive":
                return None
        elif name in (b"transfer-encoding", b"upgrade", b"via"):
            return None
        if cut is None:
            cut = []
        cut.append(name)
    if length is None or len(data) - end - 4 != length:
        return None
    fields = block if cut is None else _cut_fields(block, low, cut)
    # (guarded: "HTTP/1.1 200\r\n" puts line_end before 13, and compiled by mypyc a bytes
    # slice that ends before it starts raises SystemError instead of giving b"")
    reason = data[13:line_end] if line_end > 13 else b""
    head = ResponseHead(status, reason, "1.1", [], keep_alive, False, length, fields)
    if not reason:  # rare: the status line we send names a reason
        head.fields = _status_line(head) + fields[line_end:]
    return head, end + 4


def _cut_fields(block: bytes, low: bytes, names: list[bytes]) -> bytes:
    """``block`` without the lines of the (lower-case) field ``names``, given in the order of
    their lines (as findall found them: each is the first such line after the previous cut)."""
    parts: list[bytes] = []
    pos = 0
    for name in names:
        i = low.find(_LINE_KEYS[name], pos)
        j = low.find(b"\r", i + 2)
        parts.append(block[pos:i])
        pos = len(block) if j < 0 else j
    parts.append(block[pos:])
    return b"".join(parts)


_LINE_KEYS = {
    name: b"\r\n" + name + b":"
    for name in (*HOP_BY_HOP, b"x-request-id")  # (the names _cut_fields is given)
}


#: request headers handled specially while copying (dropped, merged or replaced)
_REQ_SPECIAL = HOP_BY_HOP | _REPLACED | {b"x-forwarded-for", b"forwarded", b"via", b"host"}
#: Connection tokens that name headers we drop anyway
_STD_CONNECTION_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade", b"te", b""})


def _extra_connection_tokens(value: bytes, into: set[bytes] | None) -> set[bytes] | None:
    if value.lower() in _STD_CONNECTION_TOKENS:
        return into  # "keep-alive" or "close" alone: the usual case
    for t in value.split(b","):
        t = t.strip().lower()
        if t not in _STD_CONNECTION_TOKENS:
            if into is None:
                into = set()
            into.add(t)
    return into


#: forwarding blocks are cached for inputs up to this size (1024 entries: ~1 MiB at most)
FORWARD_CACHE_MAX_INPUT = 512


@functools.lru_cache(maxsize=1024)
def _forwarding_block(
    client_ip: str,
    proto_s: str,
    host: bytes,
    xff: bytes | None,
    fwd_prior: bytes | None,
    via_prior: bytes | None,
) -> bytes:
    """X-Forwarded-*, Forwarded (RFC 7239) and Via lines, appended to prior values. The same
    client sends the same values request after request: cached."""
    return b"\r\n".join(_forwarding_lines(client_ip, proto_s, host, xff, fwd_prior, via_prior))


def _forwarding_lines(
    client_ip: str,
    proto_s: str,
    host: bytes,
    xff: bytes | None,
    fwd_prior: bytes | None,
    via_prior: bytes | None,
) -> list[bytes]:
    lines: list[bytes] = []
    client = client_ip.encode()
    proto = proto_s.encode()
    lines.append(b"X-Forwarded-For: " + (client if xff is None else xff + b", " + client))
    lines.append(b"X-Forwarded-Proto: " + proto)
    if host:
        lines.append(b"X-Forwarded-Host: " + host)
    node = b'"[' + client + b']"' if b":" in client else client
    elem = b"for=" + node + b";proto=" + proto
    if host:
        if _is_token(host):
            elem += b";host=" + host
        else:
            elem += b';host="' + host.replace(b'"', b"") + b'"'
    lines.append(b"Forwarded: " + (elem if fwd_prior is None else fwd_prior + b", " + elem))
    lines.append(b"Via: " + (VIA_TOKEN if via_prior is None else via_prior + b", " + VIA_TOKEN))
    return lines


def _copied_request_lines(
    headers: Headers, host_override: bytes | None, drop: set[bytes]
) -> list[bytes]:
    """build_request_head's copy of the end-to-end headers, without those named in ``drop``."""
    lines = []
    if host_override is not None:
        lines.append(b"Host: " + host_override)
    for k, v in headers:
        lk = k.lower()
        if lk in drop:
            continue
        if lk not in _REQ_SPECIAL or (lk == b"host" and host_override is None):
            lines.append(k + b": " + v)
    return lines


def _forwarded_fields(
    headers: Headers, fwd: ForwardInfo, host_override: bytes | None
) -> tuple[bytes, bytes]:
    """The field lines sent upstream between the request line and X-Request-ID, each ended
    by CRLF, and the request's Upgrade value. One pass over the headers: hop-by-hop headers
    and those named in Connection are dropped, forwarding headers merged, the rest copied in
    order."""
    lines: list[bytes] = []
    append = lines.append
    if host_override is not None:
        append(b"Host: " + host_override)
    host = b""
    xff: bytes | None = None
    fwd_prior: bytes | None = None
    via_prior: bytes | None = None
    upgrade = b""
    extra: set[bytes] | None = None
    special = _REQ_SPECIAL
    for k, v in headers:
        lk = k.lower()
        if lk not in special:
            append(k + b": " + v)
        elif lk == b"host":
            host = v
            if host_override is None:
                append(k + b": " + v)
        elif lk == b"x-forwarded-for":
            xff = v if xff is None else xff + b", " + v
        elif lk == b"forwarded":
            fwd_prior = v if fwd_prior is None else fwd_prior + b", " + v
        elif lk == b"via":
            via_prior = v if via_prior is None else via_prior + b", " + v
        elif lk == b"connection":
            extra = _extra_connection_tokens(v, extra)
        elif lk == b"upgrade" and not upgrade:
            upgrade = v
    if extra:  # rare: Connection names end-to-end headers, drop them too (second pass)
        lines = _copied_request_lines(headers, host_override, extra)
    prior = len(host) + len(xff or b"") + len(fwd_prior or b"") + len(via_prior or b"")
    if prior <= FORWARD_CACHE_MAX_INPUT:
        lines.append(_forwarding_block(fwd.client_ip, fwd.proto, host, xff, fwd_prior, via_prior))
    else:  # big prior values are not worth a cache slot (and would bloat it)
        lines.extend(_forwarding_lines(fwd.client_ip, fwd.proto, host, xff, fwd_prior, via_prior))
    lines.append(b"")  # (the last line's CRLF)
    return b"\r\n".join(lines), upgrade


def build_request_head(
    req: RequestHead,
    fwd: ForwardInfo,
    *,
    host_override: bytes | None = None,
) -> bytes:
    """The request head to send upstream (always HTTP/1.1, keep-alive unless upgrading).

    The field lines depend only on the request's header list, the host override and the
    connection's ``fwd`` (client address, scheme): when a request carries the same header
    list as the one before it on the connection (clients tend to send the same fields
    request after request), ``fwd`` still holds them and they are not built again."""
    headers = req.headers
    if headers == fwd.last_headers and host_override == fwd.last_override:
        fields, upgrade = fwd.last_fields, fwd.last_upgrade
    else:
        fields, upgrade = _forwarded_fields(headers, fwd, host_override)
        fwd.last_headers, fwd.last_override = headers, host_override
        fwd.last_fields, fwd.last_upgrade = fields, upgrade
    parts = [req.method.encode(), b" ", req.target, b" HTTP/1.1\r\n", fields]
    parts += (b"X-Request-ID: ", fwd.request_id)
    if req.upgrade:
        parts += (b"\r\nConnection: Upgrade\r\nUpgrade: ", upgrade)
    if req.chunked:
        parts.append(b"\r\nTransfer-Encoding: chunked")
    # Content-Length is end-to-end and was copied with the other headers
    parts.append(b"\r\n\r\n")
    return b"".join(parts)


def _is_token(value: bytes) -> bool:
    return all(c in _TOKEN_CHARS for c in value)


_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:"
)


def response_has_body(status: int, method: str) -> bool:
    """RFC 9112 §6.3 rules 1-2."""
    return not (method == "HEAD" or status in (204, 304) or 100 <= status < 200)


def build_response_head(
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
    if resp.fields is not None:
        return _build_scanned_response_head(
            resp, method, client_version, keep_alive, request_id, extra
        )
    if resp.status == 101:
        return _switching_protocols_head(resp), "tunnel"
    lines, via_prior = _copied_response_lines(resp)
    lines.append(b"Via: " + (via_prior + b", " + VIA_TOKEN if via_prior else VIA_TOKEN))
    lines.append(b"X-Request-ID: " + request_id)
    for k, v in extra:
        lines.append(k + b": " + v)
    if not response_has_body(resp.status, method):
        framing = "none"
    elif resp.content_length is not None and not resp.chunked:
        framing = "length"
    elif client_version == "1.1":
        framing = "chunked"
        lines.append(b"Transfer-Encoding: chunked")
    else:
        framing = "close"
        keep_alive = False
    if not keep_alive:
        lines.append(b"Connection: close")
    elif client_version == "1.0":
        lines.append(b"Connection: keep-alive")
    lines.append(b"\r\n")
    return b"\r\n".join(lines), framing


#: response headers handled specially while copying
_RESP_SPECIAL = HOP_BY_HOP | {b"via", b"x-request-id"}


def _copied_response_lines(resp: ResponseHead) -> tuple[list[bytes], bytes | None]:
    """The status line and the end-to-end fields of ``resp``, and the Via it carried."""
    status_line = _status_line(resp)
    lines: list[bytes] = [status_line]
    append = lines.append
    via_prior: bytes | None = None
    extra_tokens: set[bytes] | None = None
    special = _RESP_SPECIAL
    for k, v in resp.headers:
        lk = k.lower()
        if lk not in special:
            append(k + b": " + v)
        elif lk == b"via":
            via_prior = v if via_prior is None else via_prior + b", " + v
        elif lk == b"connection":
            extra_tokens = _extra_connection_tokens(v, extra_tokens)
    if extra_tokens:  # rare: Connection names end-to-end headers, drop them too (second pass)
        lines = [status_line]
        append = lines.append
        for k, v in resp.headers:
            lk = k.lower()
            if lk not in special and lk not in extra_tokens:
                append(k + b": " + v)
    return lines, via_prior


def _switching_protocols_head(resp: ResponseHead) -> bytes:
    headers = [(k, v) for k, v in resp.headers if k.lower() not in (b"connection", b"upgrade")]
    up = next((v for k, v in resp.headers if k.lower() == b"upgrade"), b"")
    headers += [(b"Connection", b"Upgrade"), (b"Upgrade", up)]
    headers.append((b"Via", VIA_TOKEN))
    return _serialize(b"HTTP/1.1 101 " + (resp.reason or b"Switching Protocols"), headers)


def _status_line(resp: ResponseHead) -> bytes:
    return b"HTTP/1.1 %d %s" % (resp.status, resp.reason or REASONS.get(resp.status, b"Unknown"))


def _build_scanned_response_head(
    resp: ResponseHead,
    method: str,
    client_version: str,
    keep_alive: bool,
    request_id: bytes,
    extra: Sequence[tuple[bytes, bytes]],
) -> tuple[bytes, str]:
    """build_response_head for a head from scan_simple_response: a Content-Length response
    whose status line and kept field lines are copied as one piece (no Via to merge: the scan
    declines it)."""
    assert resp.fields is not None
    parts = [resp.fields, b"\r\nVia: ", VIA_TOKEN, b"\r\nX-Request-ID: ", request_id]
    for k, v in extra:
        parts.append(b"\r\n" + k + b": " + v)
    framing = "length" if response_has_body(resp.status, method) else "none"
    if not keep_alive:
        parts.append(b"\r\nConnection: close")
    elif client_version == "1.0":
        parts.append(b"\r\nConnection: keep-alive")
    parts.append(b"\r\n\r\n")
    return b"".join(parts), framing


def _serialize(start_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts = [start_line]
    for k, v in headers:
        parts.append(k + b": " + v)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)


def encode_chunk(data: bytes) -> bytes:
    """One chunk (RFC 9112 §7.1); empty data is not a chunk (that would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    keep_alive: bool = False,
    extra: Sequence[tuple[bytes, bytes]] = (),
    request_id: bytes | None = None,
) -> bytes:
    """A small JSON error in the project's error shape (seed 002)."""
    body = json.dumps({"error": code, "message": message, "details": {}}).encode()
    headers: Headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Via", VIA_TOKEN),
    ]
    if request_id:
        headers.append((b"X-Request-ID", request_id))
    headers.extend(extra)
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    line = b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Error"))
    return _serialize(line, headers) + body


def absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """(authority, origin-form target) for an absolute-form request target (RFC 9112 §3.2.2),
    else None."""
    low = target[:8].lower()
    if not (low.startswith(b"http://") or low.startswith(b"https://")):
        return None
    rest = target.split(b"://", 1)[1]
    end = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if b"@" in authority:
        authority = authority.rsplit(b"@", 1)[1]  # userinfo is deprecated and never forwarded
    if not tail.startswith(b"/"):
        tail = b"/" + tail
    return authority, tail


def split_target(target: bytes) -> tuple[str, str]:
    """(path, query) from a request target in origin or absolute form."""
    if target[:1] == b"/":  # origin form: what reaches the proxy (absolute form is rewritten)
        path_b, _, query_b = target.partition(b"?")
        return path_b.decode("latin-1"), query_b.decode("latin-1")
    t = target.decode("latin-1")
    if t.startswith(("http://", "https://")):
        rest = t.split("://", 1)[1]
        slash = rest.find("/")
        t = rest[slash:] if slash >= 0 else "/"
    path, _, query = t.partition("?")
    return path or "/", query


#: RFC 3986 §2.3
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
_SLASHES = re.compile(r"/{2,}")


def _pct_normal(m: re.Match[str]) -> str:
    ch = chr(int(m.group()[1:], 16))
    return ch if ch in _UNRESERVED else m.group().upper()


def normalize_path(path: str) -> str:
    """The path routing matches on and the upstream receives (RFC 3986 §6.2.2): percent-encoded
    unreserved characters decoded (so ``%2e`` is a dot), other escapes upper-cased, runs of
    slashes merged into one (nginx's ``merge_slashes``, on by default there: ``//admin`` must
    not slip past a ``/admin`` route to a backend that merges them itself), then dot segments
    removed (§5.2.4). ``/public/../admin`` and ``/a//../admin`` are ``/admin``. Encoded slashes
    stay encoded: see :func:`ambiguous_separators`. Paths not starting with ``/`` (``*``) are
    kept."""
    if "%" in path:
        path = _PCT_ENCODED.sub(_pct_normal, path)
    if not path.startswith("/"):
        return path
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." not in path:
        return path
    segs = path.split("/")
    out: list[str] = []
    for seg in segs[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segs[-1] in (".", ".."):
        out.append("")  # "/a/b/.." is "/a/", not "/a"
    return "/" + "/".join(out)


def ambiguous_separators(path: str) -> bool:
    """Whether a normalized path holds ``%2F``, ``%5C`` or ``\\``: separators some backends
    decode (or treat as ``/``) after we have routed."""
    return "%2F" in path or "%5C" in path or "\\" in path


def decoded_separators(path: str) -> str:
    """The path as a backend that decodes ``%2F``/``%5C`` and treats ``\\`` as ``/`` sees it."""
    return normalize_path(path.replace("%2F", "/").replace("%5C", "/").replace("\\", "/"))
