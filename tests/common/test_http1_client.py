"""The control-plane HTTP client (marchproxy_common.http1_client) against real sockets: our own
HTTP server, and raw servers for the framings and failures a server can send."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marchproxy_common.http1 import HttpServer, Request, Response
from marchproxy_common.http1_client import HttpCallError, call

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[str]:
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def answering(raw: bytes, *, hold: float = 0.0) -> RawHandler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        if hold:
            await asyncio.sleep(hold)

    return handler


async def test_get_with_params_and_headers_against_our_server() -> None:
    seen: list[Request] = []

    async def handler(req: Request) -> Response:
        seen.append(req)
        body = json.dumps({"q": req.query_string, "path": req.path}).encode()
        return Response(body, content_type="application/json")

    server = HttpServer(handler)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        answer = await call(
            "GET",
            f"http://127.0.0.1:{port}/api/v1/state/ailb?x=1",
            params={"after": "7", "timeout": "0.5"},
            headers={"X-Cluster-Key": "k"},
            total_s=5,
        )
        assert answer.status == 200
        assert answer.json() == {"q": "x=1&after=7&timeout=0.5", "path": "/api/v1/state/ailb"}
        assert answer.headers["content-type"] == "application/json"
        sent = await call("POST", f"http://127.0.0.1:{port}/ack", json_body={"v": 3}, total_s=5)
        assert sent.status == 200
    finally:
        listener.close()
        await server.shutdown(1.0)
    assert seen[0].headers["x-cluster-key"] == "k"
    assert seen[0].headers["host"] == f"127.0.0.1:{port}"
    assert json.loads(seen[1].body) == {"v": 3}
    assert seen[1].headers["content-type"] == "application/json"


async def test_form_body_is_url_encoded_and_redirects_are_not_followed() -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.readexactly(len(b"a=1&b=x+y%26z")))
        writer.write(
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()

    async with raw_server(handler) as url:
        answer = await call("POST", url + "/hook", form={"a": "1", "b": "x y&z"}, total_s=5)
    assert answer.status == 302
    assert got == [b"a=1&b=x+y%26z"]


@pytest.mark.parametrize(
    "raw",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"a": true}',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n7\r\n: true}\r\n0\r\n\r\n',
        b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"a": true}',  # ends with the close
        b'HTTP/1.0 200 OK\r\n\r\n{"a": true}',
    ],
    ids=["length", "chunked", "close-delimited", "http10"],
)
async def test_every_framing_gives_the_same_body(raw: bytes) -> None:
    async with raw_server(answering(raw)) as url:
        answer = await call("GET", url + "/", total_s=5)
    assert (answer.status, answer.json()) == (200, {"a": True})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "closed before"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc", "closed before"),
        (b"NONSENSE\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n", "head too large"),
        (b"", "closed before"),
    ],
    ids=["truncated-length", "truncated-chunked", "garbage", "huge-head", "nothing"],
)
async def test_bad_answers_raise_http_call_error(raw: bytes, message: str) -> None:
    async with raw_server(answering(raw)) as url:
        with pytest.raises(HttpCallError, match=message):
            await call("GET", url + "/", total_s=5)


async def test_a_body_over_the_limit_is_refused() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    async with raw_server(answering(raw)) as url:
        with pytest.raises(HttpCallError, match="over 1000 bytes"):
            await call("GET", url + "/", total_s=5, max_body=1000)


async def test_not_json_is_an_http_call_error() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{x}"
    async with raw_server(answering(raw)) as url:
        answer = await call("GET", url + "/", total_s=5)
    with pytest.raises(HttpCallError, match="not JSON"):
        answer.json()


async def test_a_server_that_never_answers_times_out() -> None:
    async with raw_server(answering(b"HTTP/1.1 200 OK\r\n", hold=30)) as url:
        with pytest.raises(TimeoutError):
            await call("GET", url + "/", total_s=0.3)


async def test_nothing_listening_is_an_os_error() -> None:
    async with raw_server(answering(b"")) as url:
        pass  # closed again: the port is free now
    with pytest.raises(OSError):
        await call("GET", url + "/", total_s=5)


async def test_header_values_cannot_inject_lines() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        await call("GET", "http://127.0.0.1:1/", headers={"X": "a\r\nEvil: 1"}, total_s=1)
    with pytest.raises(ValueError, match="not an http"):
        await call("GET", "ftp://127.0.0.1/", total_s=1)


ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'6\r\n{"v": \r\n3\r\n12}\r\n0\r\n\r\n'
)


async def _split_exchange(pieces: list[bytes]) -> tuple[int, bytes]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for p in pieces:
            writer.write(p)
            await writer.drain()
            await asyncio.sleep(0.001)

    async with raw_server(handler) as url:
        answer = await call("GET", url + "/", total_s=5)
    return answer.status, answer.body


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(ANSWER) - 1), max_size=10))
def test_any_split_of_the_answer_reads_the_same(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(ANSWER)]
    pieces = [ANSWER[a:b] for a, b in itertools.pairwise(points)]
    assert asyncio.run(_split_exchange(pieces)) == (200, b'{"v": 12}')
