"""RTMP server behaviour with our own asyncio client and a synthetic publisher (real sockets)."""

from __future__ import annotations

import asyncio
import os
import socket
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marchproxy_common.wire.rtmp.chunks import (
    MSG_COMMAND_AMF0,
    MSG_COMMAND_AMF3,
    MSG_SET_PEER_BANDWIDTH,
    ChunkStreamDecoder,
    ChunkWriter,
    MessageReceived,
)
from marchproxy_common.wire.rtmp.handshake import (
    GENUINE_FP_KEY,
    HANDSHAKE_SIZE,
    ClientHandshake,
    find_client_digest,
    imprint_digest,
    validate_digest_s2,
)
from marchproxy_common.wire.rtmp.messages import (
    encode_command,
    encode_peer_bandwidth,
    is_video_keyframe,
    is_video_sequence_header,
    parse_command,
)
from marchproxy_rtmp.client import RtmpClientError, RtmpClientProtocol, open_client, parse_rtmp_url
from marchproxy_rtmp.config import RtmpConfig, config_from_snapshot
from marchproxy_rtmp.ingest import SERVER_WINDOW_ACK
from marchproxy_rtmp.synthetic import SyntheticPublisher, video_frame
from marchproxy_rtmp.testing import play_client, run_server, snapshot, wait_for
from tests.conftest import free_port

APPS = [
    {"name": "live", "publish_keys": [{"key": "secret", "stream": "tv"}]},
    {"name": "open", "publish_open": True, "gop_cache": False},
]


async def publisher(port: int, app: str, name: str, **kw: object) -> SyntheticPublisher:
    proto = await open_client("127.0.0.1", port, app)
    sid = await proto.publish(name)
    pub = SyntheticPublisher(proto, sid, **kw)  # type: ignore[arg-type]
    pub.send_headers()
    return pub


async def test_publish_and_play_fan_out_shares_encoded_bytes() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (hooks, port):
        pub = await publisher(port, "live", "tv?key=secret")
        players = [await play_client(port, "live", "tv") for _ in range(3)]
        await pub.run(60, realtime=False)
        await wait_for(lambda: all(rec.video >= 60 for _, rec in players))
        for proto, rec in players:
            assert rec.audio >= 60
            proto.close()
        stream = hooks.server.registry.get("live", "tv")
        assert stream is not None and stream.publisher is not None
        frame = stream.gop[-1]
        # one encoding per (chunk size, message stream id), shared by all three players
        assert len(frame._encoded) == 1
        status = hooks.status()["rtmp"]["applications"]["live"]["streams"][0]
        assert status["publishing"] and status["video_frames"] == 60
        pub.proto.close()


async def test_wrong_stream_key_is_refused() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (hooks, port):
        proto = await open_client("127.0.0.1", port, "live")
        with pytest.raises(RtmpClientError, match="Unauthorized"):
            await proto.publish("wrong")
        await asyncio.wait_for(proto.closed, 10)
        # the key as a query parameter of the stream it is bound to
        proto = await open_client("127.0.0.1", port, "live")
        await proto.publish("tv?key=secret")
        proto.close()
        assert hooks.server.counters.publish_rejected == 1
        # unknown application: connect is refused
        with pytest.raises(RtmpClientError):
            await open_client("127.0.0.1", port, "nope")


async def test_publish_keys_are_bound_to_stream_names_and_never_played() -> None:
    apps = [
        {
            "name": "live",
            "publish_keys": [
                {"key": "k-cam1-7f3a", "stream": "cam1"},
                {"key": "k-studio-91c2", "stream": "studio-*"},
            ],
        }
    ]
    async with asyncio.timeout(30), run_server(apps) as (hooks, port):
        reg = hooks.server.registry

        async def refused(name: str) -> None:
            proto = await open_client("127.0.0.1", port, "live")
            with pytest.raises(RtmpClientError, match="Unauthorized"):
                await proto.publish(name)
            proto.close()

        # the key goes in the query; players play the plain name and never see the key
        pub = await publisher(port, "live", "cam1?key=k-cam1-7f3a")
        player, rec = await play_client(port, "live", "cam1")
        await pub.run(31, realtime=False)
        await wait_for(lambda: rec.video >= 2)
        assert [s.name for s in reg.publishing()] == ["cam1"]
        # a valid key does not open other names
        await refused("cam2?key=k-cam1-7f3a")
        await refused("studio-a?key=k-cam1-7f3a")
        await refused("cam1")  # no key
        await refused("cam1?key=wrong")
        # the name alone is not a key any more
        await refused("k-cam1-7f3a?key=k-cam1-7f3a")
        pub.proto.close()
        await asyncio.wait_for(player.closed, 10)
        await wait_for(lambda: not reg.streams)
        # OBS-style "stream key" (the key as the name, no query): published under the bound name
        pub = await publisher(port, "live", "k-cam1-7f3a")
        assert [s.name for s in reg.publishing()] == ["cam1"]
        pub.proto.close()
        await wait_for(lambda: not reg.streams)
        # a glob binding: any matching name with the key, but never by the bare key
        pub = await publisher(port, "live", "studio-b?key=k-studio-91c2")
        assert [s.name for s in reg.publishing()] == ["studio-b"]
        await refused("other?key=k-studio-91c2")
        await refused("k-studio-91c2")
        pub.proto.close()
        assert hooks.server.counters.publish_rejected == 7


def test_bare_publish_keys_are_rejected() -> None:
    # a bare key was also the stream name, so every player of the stream learned it
    cfg, errors = config_from_snapshot(snapshot([{"name": "live", "publish_keys": ["k"]}]), "rtmp")
    assert cfg is None and errors and "publish_keys" in errors[0]


class RecordingClient(RtmpClientProtocol):
    """Our client, keeping the type and payload of every message it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[int, bytes]] = []

    def _on_message(self, ev: MessageReceived) -> None:
        self.received.append((ev.type_id, bytes(ev.payload)))
        super()._on_message(ev)


async def test_amf3_connect_from_flash_style_client_is_answered_in_amf3() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (_, port):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(RecordingClient, "127.0.0.1", port)
        await proto.ready
        obj = {"app": "open", "tcUrl": f"rtmp://127.0.0.1:{port}/open", "objectEncoding": 3.0}
        result = await proto.command("connect", obj, amf3=True)
        info = result.args[0]
        assert isinstance(info, dict)
        assert info["code"] == "NetConnection.Connect.Success"
        assert info["objectEncoding"] == 3.0
        sid = await proto.create_stream()
        assert sid == 1
        commands = [(t, p) for t, p in proto.received if t in (MSG_COMMAND_AMF0, MSG_COMMAND_AMF3)]
        assert len(commands) == 2  # _result of connect and of createStream
        # AMF3 command messages (type 17): format byte 0, then AMF0 values
        assert all(t == MSG_COMMAND_AMF3 and p[:1] == b"\x00" for t, p in commands), commands
        proto.close()
        # an AMF0 client gets AMF0 command messages
        _, plain = await loop.create_connection(RecordingClient, "127.0.0.1", port)
        await plain.connect("open", f"rtmp://127.0.0.1:{port}/open")
        assert {t for t, _ in plain.received if t in (17, 20)} == {MSG_COMMAND_AMF0}
        plain.close()


async def test_connect_announces_window_peer_bandwidth_and_chunk_size() -> None:
    async with asyncio.timeout(30), run_server(APPS, chunk_size=8192) as (_, port):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(RecordingClient, "127.0.0.1", port)
        await proto.connect("open", f"rtmp://127.0.0.1:{port}/open")
        control = {t: p for t, p in proto.received if t <= MSG_SET_PEER_BANDWIDTH}
        # Set Peer Bandwidth (RTMP spec 5.4.5): window size, limit type 2 (dynamic)
        assert control[MSG_SET_PEER_BANDWIDTH] == encode_peer_bandwidth(SERVER_WINDOW_ACK, 2)
        assert proto.decoder.peer_bandwidth == SERVER_WINDOW_ACK
        assert proto.decoder.window_ack_size == SERVER_WINDOW_ACK
        assert proto.decoder.chunk_size == 8192
        proto.close()


async def test_scheme_1_digest_c1_over_a_socket() -> None:
    c1 = bytearray(bytes(4) + bytes([0x80, 0x00, 0x07, 0x02]) + os.urandom(HANDSHAKE_SIZE - 8))
    digest = imprint_digest(c1, GENUINE_FP_KEY[:30], 772)  # scheme 1: offset base 772
    async with asyncio.timeout(30), run_server(APPS) as (hooks, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x03" + bytes(c1))
        s012 = await r.readexactly(1 + 2 * HANDSHAKE_SIZE)
        s1, s2 = s012[1 : 1 + HANDSHAKE_SIZE], s012[1 + HANDSHAKE_SIZE :]
        assert validate_digest_s2(s2, digest)  # keyed by our scheme 1 digest
        assert find_client_digest(bytes(c1)) == digest
        tc = f"rtmp://127.0.0.1:{port}/open"
        connect = encode_command("connect", 1, {"app": "open", "tcUrl": tc})
        w.write(s1 + ChunkWriter().write(3, MSG_COMMAND_AMF0, 0, 0, connect))
        decoder = ChunkStreamDecoder()
        names: list[str] = []
        while "_result" not in names:
            data = await r.read(65536)
            assert data
            names += [
                parse_command(e.type_id, e.payload).name
                for e in decoder.feed(data)
                if e.type_id == MSG_COMMAND_AMF0
            ]
        assert hooks.server.counters.digest_handshakes == 1
        w.close()


async def test_max_players_per_stream() -> None:
    apps = [{"name": "tv", "publish_open": True, "max_players": 1}]
    async with asyncio.timeout(30), run_server(apps) as (_, port):
        first, _ = await play_client(port, "tv", "ch1")
        with pytest.raises(RtmpClientError, match=r"Play\.Failed"):
            await play_client(port, "tv", "ch1")
        other, _ = await play_client(port, "tv", "ch2")  # the cap is per stream
        first.close()
        other.close()


async def test_second_publisher_is_refused() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (_, port):
        first = await publisher(port, "open", "cam")
        proto = await open_client("127.0.0.1", port, "open")
        with pytest.raises(RtmpClientError, match="BadName"):
            await proto.publish("cam")
        proto.close()
        first.proto.close()


@pytest.mark.parametrize("app", ["live", "open"])  # with and without GOP cache
async def test_late_joiner_starts_on_keyframe(app: str) -> None:
    name = "tv" if app == "live" else "late"
    async with asyncio.timeout(30), run_server(APPS) as (hooks, port):
        pub = await publisher(port, app, name + "?key=secret", gop=30)
        await pub.run(45, realtime=False)  # mid-GOP
        proto, rec = await play_client(port, app, name)
        if app == "open":
            await pub.run(20, realtime=False)  # no GOP cache: wait for frame 60, a keyframe
        # with the GOP cache the keyframe (frame 30) and what followed arrive at once
        await wait_for(lambda: rec.video >= 2, 10)  # sequence header + first frame
        videos = [m for m in rec.messages if m[0] == 9]
        assert is_video_sequence_header(videos[0][2])
        assert is_video_keyframe(videos[1][2])
        if app == "live":
            assert videos[1][1] == 1000  # frame 30 at 30 fps
        else:
            assert videos[1][1] == 2000  # frame 60
        proto.close()
        pub.proto.close()
        del hooks


def raw_stalled_player(port: int, app: str, name: str) -> socket.socket:
    """Blocking socket: handshake, connect, createStream, play; the caller never reads it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client = ClientHandshake()
    sock.sendall(client.initial())
    got = b""
    while len(got) < 1 + 2 * HANDSHAKE_SIZE:
        chunk = sock.recv(1 + 2 * HANDSHAKE_SIZE - len(got))
        assert chunk
        got += chunk
    w = ChunkWriter()
    tc = f"rtmp://127.0.0.1:{port}/{app}"
    sock.sendall(
        client.feed(got)
        + w.write(3, 20, 0, 0, encode_command("connect", 1, {"app": app, "tcUrl": tc}))
        + w.write(3, 20, 0, 0, encode_command("createStream", 2, None))
        + w.write(8, 20, 1, 0, encode_command("play", 0, None, name))  # first stream id is 1
    )
    return sock


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_stalled_player_memory_is_bounded_and_it_is_dropped() -> None:
    cap, frame_size, batch = 64 * 1024, 20_000, 10
    async with (
        asyncio.timeout(90),
        run_server(APPS, player_buffer_bytes=cap, slow_player_timeout=8.0) as (hooks, port),
    ):
        pub = await publisher(port, "open", "big", video_size=frame_size, gop=10)
        # a raw socket that does handshake + connect + play, then never reads again
        stalled = await asyncio.to_thread(raw_stalled_player, port, "open", "big")
        await wait_for(lambda: len(hooks.server.registry.get("open", "big").players) == 1)  # type: ignore[union-attr]
        healthy, rec = await play_client(port, "open", "big")
        stream = hooks.server.registry.get("open", "big")
        assert stream is not None
        counters = hooks.server.counters.delivery
        loop = asyncio.get_running_loop()

        async def send_for(seconds: float) -> int:
            """Publish as fast as the healthy player takes it; return the bytes sent."""
            sent, end = 0, loop.time() + seconds
            while loop.time() < end and not counters.players_dropped:
                await pub.run(batch, realtime=False)
                sent += batch * (frame_size + 200)
                await asyncio.sleep(0.05)
            return sent

        # until the stalled player's socket buffers and then its transport buffer are full
        async with asyncio.timeout(20):
            while not counters.frames_skipped:
                await send_for(0.2)
        await send_for(0.5)
        assert not counters.players_dropped
        # the process's memory while the publisher keeps sending for several seconds
        tracemalloc.start()
        rss0 = rss_bytes()
        try:
            sent = await send_for(5.0)
            grown, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        rss1 = rss_bytes()
        queued = max(p.transport.get_write_buffer_size() for p in stream.players)
        assert not counters.players_dropped  # still stalled, still connected, throughout
        assert sent > 10 << 20  # the publisher really sent a lot meanwhile
        # bounded: what is kept is the cap (plus one batch) for the stalled player, the GOP cache
        # and our own player's bookkeeping, not what was published
        report = (
            f"traced +{grown >> 10} KiB, RSS {(rss1 - rss0) >> 10:+} KiB, sent {sent >> 10} KiB"
        )
        assert grown < 3 << 20, report
        assert queued <= cap + batch * (frame_size + 5_000), queued
        # and after slow_player_timeout over the cap it is dropped; the healthy one keeps up
        async with asyncio.timeout(30):
            while not counters.players_dropped:
                await send_for(0.5)
        assert counters.players_dropped == 1
        assert len(stream.players) == 1  # only the healthy player is left
        await wait_for(lambda: rec.video >= 300, 20)
        healthy.close()
        stalled.close()
        pub.proto.close()


async def test_dropping_the_last_slow_player_stops_the_pull_and_the_stream() -> None:
    async with (
        asyncio.timeout(60),
        run_server([{"name": "live", "publish_open": True}]) as (origin, origin_port),
        run_server(
            [{"name": "edge", "pull": f"rtmp://127.0.0.1:{origin_port}/live"}],
            player_buffer_bytes=16 * 1024,
            slow_player_timeout=0.5,
        ) as (edge, edge_port),
    ):
        pub = await publisher(origin_port, "live", "big", video_size=20_000, gop=10)
        stalled = await asyncio.to_thread(raw_stalled_player, edge_port, "edge", "big")
        await wait_for(lambda: bool(edge.server.pulls))
        dropped = edge.server.counters.delivery
        for _ in range(400):  # until the stalled player is dropped (bounded: ~20 s)
            await pub.run(10, realtime=False)
            await asyncio.sleep(0.05)
            if dropped.players_dropped:
                break
        assert dropped.players_dropped == 1
        # nobody wants the stream any more: the pull ends and the stream is forgotten
        await wait_for(lambda: not edge.server.pulls, 10)
        await wait_for(lambda: not edge.server.registry.streams, 10)
        await wait_for(lambda: not origin.server.registry.get("live", "big").players, 10)  # type: ignore[union-attr]
        stalled.close()
        pub.proto.close()


async def test_publisher_disconnect_ends_stream_for_players() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (hooks, port):
        pub = await publisher(port, "open", "bye")
        await pub.run(5, realtime=False)
        proto, _ = await play_client(port, "open", "bye")
        pub.proto.close()
        await asyncio.wait_for(proto.closed, 10)
        assert any(s.get("code") == "NetStream.Play.UnpublishNotify" for s in proto.statuses)
        await wait_for(lambda: not hooks.server.registry.streams)


async def test_idle_publisher_is_dropped() -> None:
    async with asyncio.timeout(30), run_server(APPS, publisher_idle_timeout=0.5) as (hooks, port):
        pub = await publisher(port, "open", "quiet")
        await pub.run(5, realtime=False)
        proto, _ = await play_client(port, "open", "quiet")
        await asyncio.wait_for(pub.proto.closed, 10)  # no media for 0.5 s: dropped
        await asyncio.wait_for(proto.closed, 10)  # and the stream ended for its player
        assert hooks.server.counters.idle_publishers_dropped == 1


async def test_aggregate_messages_from_publisher_are_split() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (_, port):
        pub = await publisher(port, "open", "agg")
        proto, rec = await play_client(port, "open", "agg")
        tags = b""
        for i, (type_id, data) in enumerate([(9, video_frame(0, 30, 100)), (8, b"\xaf\x01x")]):
            tags += bytes([type_id]) + len(data).to_bytes(3, "big") + (i * 20).to_bytes(3, "big")
            tags += b"\x00"  # timestamp extension byte
            tags += b"\x00\x00\x00" + data + (11 + len(data)).to_bytes(4, "big")
        pub.proto.send(7, 22, pub.stream_id, tags, timestamp=1000)
        await wait_for(lambda: rec.audio >= 1 and rec.video >= 2)
        media = [(t, ts) for t, ts, _ in rec.messages if t in (8, 9)]
        assert (9, 1000) in media and (8, 1020) in media
        proto.close()
        pub.proto.close()


async def test_drain_ends_streams_politely() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (hooks, port):
        pub = await publisher(port, "open", "news")
        await pub.run(5, realtime=False)
        proto, _ = await play_client(port, "open", "news")
        await hooks.stop_accepting()
        await hooks.drain(asyncio.get_running_loop().time() + 0.2)
        await asyncio.wait_for(proto.closed, 10)
        await asyncio.wait_for(pub.proto.closed, 10)
        assert any(s.get("code") == "NetStream.Play.UnpublishNotify" for s in proto.statuses)


async def test_player_waits_for_publisher() -> None:
    async with asyncio.timeout(30), run_server(APPS) as (_, port):
        proto, rec = await play_client(port, "open", "later")
        pub = await publisher(port, "open", "later")
        await pub.run(31, realtime=False)
        await wait_for(lambda: rec.video >= 2, 10)
        assert is_video_keyframe([m for m in rec.messages if m[0] == 9][1][2])
        proto.close()
        pub.proto.close()


async def test_push_relay_to_second_instance() -> None:
    async with (
        asyncio.timeout(40),
        run_server([{"name": "live", "publish_open": True}]) as (edge, edge_port),
        run_server(
            [{"name": "src", "publish_open": True, "push": [f"rtmp://127.0.0.1:{edge_port}/live"]}]
        ) as (origin, origin_port),
    ):
        proto, rec = await play_client(edge_port, "live", "k")
        pub = await publisher(origin_port, "src", "k")
        await wait_for(
            lambda: (
                edge.server.registry.get("live", "k") is not None
                and edge.server.registry.get("live", "k").publisher is not None
            )
        )  # type: ignore[union-attr]
        await pub.run(60, realtime=False)
        await wait_for(lambda: rec.video >= 30)
        assert origin.server.counters.relay_push_started == 1
        pub.proto.close()
        await asyncio.wait_for(proto.closed, 10)  # origin unpublish ends the edge stream too
        proto.close()


async def test_push_relay_to_a_keyed_target_keeps_the_stream_name() -> None:
    keys = [{"key": "pk-any-cam", "stream": "cam*"}, {"key": "pk-fixed", "stream": "fixed"}]
    async with (
        asyncio.timeout(40),
        run_server([{"name": "live", "publish_keys": keys}]) as (edge, edge_port),
        run_server(
            [
                {
                    "name": "src",
                    "publish_open": True,
                    "push": [
                        f"rtmp://127.0.0.1:{edge_port}/live?key=pk-any-cam",
                        f"rtmp://127.0.0.1:{edge_port}/live/fixed?key=pk-fixed",
                    ],
                }
            ]
        ) as (origin, origin_port),
    ):
        pub = await publisher(origin_port, "src", "cam7")
        await wait_for(lambda: len(edge.server.registry.publishing()) == 2)
        assert sorted(s.name for s in edge.server.registry.publishing()) == ["cam7", "fixed"]
        proto, rec = await play_client(edge_port, "live", "cam7")
        await pub.run(40, realtime=False)
        await wait_for(lambda: rec.video >= 10)
        assert origin.server.counters.relay_push_failed == 0
        assert edge.server.counters.publish_rejected == 0
        pub.proto.close()
        proto.close()


@settings(max_examples=100, deadline=None)
@given(
    app=st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True),
    stream=st.from_regex(r"([A-Za-z0-9_-]{1,8}(/[A-Za-z0-9_-]{1,8})?)?", fullmatch=True),
    query=st.from_regex(
        r"([a-z]{1,5}=[A-Za-z0-9]{0,6}(&[a-z]{1,5}=[A-Za-z0-9]{0,6})?)?", fullmatch=True
    ),
    port=st.one_of(st.none(), st.integers(1, 65535)),
)
def test_rtmp_url_parts(app: str, stream: str, query: str, port: int | None) -> None:
    url = f"rtmp://example.net{f':{port}' if port else ''}/{app}"
    url += f"/{stream}" if stream else ""
    url += f"?{query}" if query else ""
    parsed = parse_rtmp_url(url)
    assert (parsed.app, parsed.stream, parsed.query) == (app, stream, query)
    assert parsed.port == (port or 1935)
    assert parsed.stream_name("local") == (stream or "local") + (f"?{query}" if query else "")


async def test_pull_on_demand_from_origin() -> None:
    async with (
        asyncio.timeout(40),
        run_server([{"name": "live", "publish_open": True}]) as (_, origin_port),
        run_server([{"name": "edge", "pull": f"rtmp://127.0.0.1:{origin_port}/live"}]) as (
            edge,
            edge_port,
        ),
    ):
        pub = await publisher(origin_port, "live", "cam")
        await pub.run(40, realtime=False)
        proto, rec = await play_client(edge_port, "edge", "cam")
        await wait_for(lambda: rec.video >= 5)  # the origin's GOP cache, relayed
        await pub.run(40, realtime=False)
        await wait_for(lambda: rec.video >= 50)
        videos = [m for m in rec.messages if m[0] == 9]
        assert is_video_sequence_header(videos[0][2])
        assert is_video_keyframe(videos[1][2])
        assert edge.server.counters.relay_pull_started == 1
        proto.close()
        await wait_for(lambda: not edge.server.pulls)
        pub.proto.close()


async def test_publisher_taking_over_a_pull_keeps_its_players() -> None:
    async with (
        asyncio.timeout(40),
        run_server([{"name": "live", "publish_open": True}]) as (origin, origin_port),
        run_server(
            [
                {
                    "name": "edge",
                    "publish_open": True,
                    "pull": f"rtmp://127.0.0.1:{origin_port}/live",
                }
            ]
        ) as (edge, edge_port),
    ):
        remote = await publisher(origin_port, "live", "cam", video_size=1000)
        await remote.run(40, realtime=False)
        proto, rec = await play_client(edge_port, "edge", "cam")
        await wait_for(lambda: rec.video >= 5)  # pulled from the origin
        local = await publisher(edge_port, "edge", "cam", video_size=2000)
        await wait_for(lambda: not edge.server.pulls)  # the pull yielded to the real publisher
        await local.run(40, realtime=False)
        own = len(video_frame(1, 30, 2000))
        # the same player session now gets the local publisher's stream, from its keyframe
        await wait_for(lambda: rec.lengths.count(own) >= 38, 10)
        assert not proto.closed.done()
        assert any(s.get("code") == "NetStream.Play.PublishNotify" for s in proto.statuses)
        videos = [(m, n) for m, n in zip(rec.messages, rec.lengths, strict=True) if m[0] == 9]
        first_local = next(
            i for i, (_, n) in enumerate(videos) if n == len(video_frame(0, 30, 2000))
        )
        assert is_video_sequence_header(videos[first_local - 1][0][2])
        assert is_video_keyframe(videos[first_local][0][2])
        stream = edge.server.registry.get("edge", "cam")
        assert stream is not None and len(stream.players) == 1
        await wait_for(lambda: not origin.server.registry.get("live", "cam").players)  # type: ignore[union-attr]
        proto.close()
        local.proto.close()
        remote.proto.close()


async def test_failed_pull_is_retried_until_the_origin_is_up() -> None:
    origin_port = free_port()
    edge_apps = [{"name": "edge", "pull": f"rtmp://127.0.0.1:{origin_port}/live"}]
    async with asyncio.timeout(40), run_server(edge_apps) as (edge, edge_port):
        proto, rec = await play_client(edge_port, "edge", "cam")
        # the origin is not listening yet: the first attempts fail
        await wait_for(lambda: edge.server.counters.relay_pull_failed >= 1, 10)
        origin_settings = {"data_port": origin_port}
        origin_apps = [{"name": "live", "publish_open": True}]
        async with run_server(origin_apps, settings=origin_settings) as (_, port):
            pub = await publisher(port, "live", "cam")
            await pub.run(40, realtime=False)
            await wait_for(lambda: rec.video >= 5, 15)  # a retry got through
            assert not proto.closed.done()
            assert not any(s.get("level") == "error" for s in proto.statuses)
            proto.close()
            pub.proto.close()


async def test_players_of_a_pull_that_keeps_failing_get_stream_not_found() -> None:
    dead = free_port()  # nothing listens here
    apps = [{"name": "edge", "pull": f"rtmp://127.0.0.1:{dead}/live"}]
    async with asyncio.timeout(60), run_server(apps) as (edge, port):
        proto, rec = await play_client(port, "edge", "cam")
        await asyncio.wait_for(proto.closed, 45)  # bounded retries, then the player is told
        codes = [s.get("code") for s in proto.statuses]
        assert "NetStream.Play.StreamNotFound" in codes, codes
        assert edge.server.counters.relay_pull_failed >= 3  # it did retry
        assert rec.video == 0
        await wait_for(lambda: not edge.server.pulls and not edge.server.registry.streams, 5)


async def test_protocol_error_closes_connection() -> None:
    async with asyncio.timeout(20), run_server(APPS) as (hooks, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x03" + bytes(1536))
        await r.readexactly(1 + 2 * 1536)
        w.write(bytes(1536) + b"\xc7garbage")  # C2 then a fmt 3 chunk with no header
        assert await r.read() == b""
        w.close()
        assert hooks.server.counters.protocol_errors == 1


async def test_config_validation() -> None:
    cfg, errors = config_from_snapshot(snapshot([{"name": "live", "push": ["http://x/y"]}]), "rtmp")
    assert cfg is None and errors and "push" in errors[0]
    cfg, errors = config_from_snapshot(snapshot([{"name": "a"}, {"name": "a"}]), "rtmp")
    assert cfg is None and errors
    cfg, errors = config_from_snapshot({"modules": [{"name": "other", "config": {"x": 1}}]}, "rtmp")
    assert cfg == RtmpConfig() and not errors
    async with run_server(APPS) as (hooks, _):
        assert await hooks.apply_config(snapshot([{"name": "bad name!"}]))
        assert hooks.server.config.app("live") is not None  # previous config stays in force
