"""Paths are normalized before routing (RFC 3986 §6.2.2: percent-decoded unreserved characters,
runs of slashes merged as nginx does, §5.2.4: dot segments removed) and forwarded as matched;
an encoded slash or a backslash that would route elsewhere if the backend decoded it is
refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marchproxy_alb.http.framing import ambiguous_separators, normalize_path
from tests.alb.alb_support import raw_exchange, route


def rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, step by step, as the reference."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = "/" + inp[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            end = inp.find("/", start)
            end = len(inp) if end < 0 else end
            out += inp[:end]
            inp = inp[end:]
    return out


segments = st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e", "c%2Fd", "%41", "x.y", "..."])


@given(st.lists(segments, max_size=12), st.booleans())
def test_normalize_path_matches_rfc3986(segs: list[str], trailing: bool) -> None:
    path = "/" + "/".join(segs) + ("/" if trailing else "")
    got = normalize_path(path)
    decoded = path.replace("%2e", ".").replace("%2E", ".").replace("%41", "A")
    while "//" in decoded:  # slashes merge first (nginx), then dot segments go
        decoded = decoded.replace("//", "/")
    assert got == rfc3986_remove_dot_segments(decoded)
    assert "//" not in got
    assert got.startswith("/")
    assert normalize_path(got) == got
    assert all(s not in (".", "..") for s in got.split("/"))


def test_normalize_path_cases() -> None:
    assert normalize_path("/public/../admin") == "/admin"
    assert normalize_path("/public/%2e%2E/admin") == "/admin"
    assert normalize_path("/a/./b/../c/") == "/a/c/"
    assert normalize_path("/a/b/..") == "/a/"
    assert normalize_path("/../../x") == "/x"
    assert normalize_path("/%61%7e%2d/%2f%3a") == "/a~-/%2F%3A"  # reserved stay encoded
    assert normalize_path("/plain/path") == "/plain/path"
    assert normalize_path("//admin") == "/admin"
    assert normalize_path("/a//../admin") == "/admin"  # merged first: ".." leaves "a"
    assert normalize_path("/public///x//") == "/public/x/"
    assert normalize_path("*") == "*"
    assert ambiguous_separators("/a%2Fb") and ambiguous_separators("/a\\b")
    assert not ambiguous_separators("/a/b%20c")


ROUTES = [
    ("public", {"path": "/public"}),
    ("admin", {"path": "/admin"}),
]


@pytest.mark.parametrize(
    ("target", "status", "backend", "forwarded"),
    [
        (b"/public/../admin", 200, "admin", "/admin"),
        (b"/public/%2e%2e/admin", 200, "admin", "/admin"),
        (b"/%61dmin/x?q=1", 200, "admin", "/admin/x?q=1"),
        (b"/public/./x/../y", 200, "public", "/public/y"),
        (b"/public/a%2fb", 200, "public", "/public/a%2Fb"),  # same route either way: kept
        (b"/public%2Fdocs", 400, None, None),  # no route as is, "public" once decoded
        (b"/public%2F..%2Fadmin", 400, None, None),
        (b"/public/%2E%2E%2fadmin", 400, None, None),
        (b"/public\\..\\admin", 400, None, None),
        (b"/../../etc/passwd", 404, None, None),
        (b"//admin", 200, "admin", "/admin"),  # not a miss: the admin route applies
        (b"/public//..//admin/x", 200, "admin", "/admin/x"),
    ],
)
async def test_paths_are_normalized_for_routing_and_forwarding(
    alb, backends, target: bytes, status: int, backend: str | None, forwarded: str | None
) -> None:
    bs = {name: await backends(name) for name, _ in ROUTES}
    await alb.configure(
        [route(name, bs[name].url, match=m) for name, m in ROUTES],
    )
    for b in bs.values():
        b.requests.clear()
    out = await raw_exchange(
        alb.port, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:300]
    seen = {name: [r["raw_path"] for r in b.requests] for name, b in bs.items()}
    if backend is None:
        assert seen == {"public": [], "admin": []}
        return
    assert seen[backend] == [forwarded]
    assert not any(v for k, v in seen.items() if k != backend)
    assert out.split(b"\r\n\r\n", 1)[1] == backend.encode()
