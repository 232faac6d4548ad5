"""ffmpeg publishes and plays through our RTMP module; nginx-rtmp receives our push relay."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pytest

from marchproxy_rtmp.testing import (
    count_frames,
    ffmpeg_publish_argv,
    ffmpeg_record_argv,
    have,
    kill,
    nginx_rtmp,
    process,
    run_server,
    wait_for,
)
from tests.conftest import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not have("ffmpeg") or not have("ffprobe"), reason="ffmpeg not installed"),
]

APPS = [{"name": "live", "publish_keys": [{"key": "secret", "stream": "tv"}]}]


async def test_ffmpeg_publish_and_several_players_decode_video_and_audio() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with asyncio.timeout(90), run_server(APPS) as (hooks, port):
            url = f"rtmp://127.0.0.1:{port}/live/tv"
            async with process(*ffmpeg_publish_argv(url + "?key=secret", 7)) as pub:
                await wait_for(lambda: hooks.server.registry.publishing(), 30)
                outs = [str(Path(tmp) / f"p{i}.flv") for i in range(3)]
                players = [process(*ffmpeg_record_argv(url, out, 3)) for out in outs]
                procs = [await p.__aenter__() for p in players]
                try:
                    codes = [await asyncio.wait_for(p.wait(), 45) for p in procs]
                finally:
                    for p in players:
                        await p.__aexit__(None, None, None)
                assert codes == [0, 0, 0]
                assert await asyncio.wait_for(pub.wait(), 45) == 0
            for out in outs:
                counts = await count_frames(out)
                # 3 s at 30 fps and ~43 AAC frames/s, with slack for a busy machine
                assert counts.get("video", 0) >= 60, counts
                assert counts.get("audio", 0) >= 60, counts
            assert hooks.server.counters.digest_handshakes >= 1  # ffmpeg sends a digest C1
            assert hooks.server.counters.plays_total == 3
            await wait_for(lambda: not hooks.server.registry.streams, 10)


async def test_ffmpeg_wrong_key_is_refused() -> None:
    async with asyncio.timeout(60), run_server(APPS) as (hooks, port):
        url = f"rtmp://127.0.0.1:{port}/live/wrong"
        async with process(*ffmpeg_publish_argv(url, 3)) as pub:
            assert await asyncio.wait_for(pub.wait(), 30) != 0
        assert hooks.server.counters.publish_rejected == 1
        assert not hooks.server.registry.publishing()


@pytest.mark.skipif(not have("/usr/lib/nginx/modules/ngx_rtmp_module.so"), reason="no nginx-rtmp")
async def test_push_relay_to_nginx_rtmp() -> None:
    nginx_port = free_port()
    apps = [{"name": "live", "publish_open": True, "push": [f"rtmp://127.0.0.1:{nginx_port}/live"]}]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "nginx.flv")
        async with (
            asyncio.timeout(90),
            nginx_rtmp(nginx_port),
            run_server(apps) as (hooks, port),
            process(*ffmpeg_publish_argv(f"rtmp://127.0.0.1:{port}/live/cam", 7)) as pub,
        ):
            await wait_for(
                lambda: any(r.connected for rs in hooks.server.pushes.values() for r in rs), 30
            )
            nginx_url = f"rtmp://127.0.0.1:{nginx_port}/live/cam"
            async with process(*ffmpeg_record_argv(nginx_url, out, 3)) as player:
                assert await asyncio.wait_for(player.wait(), 45) == 0
            await asyncio.wait_for(pub.wait(), 45)
        counts = await count_frames(out)
        assert counts.get("video", 0) >= 60, counts
        assert counts.get("audio", 0) >= 60, counts


async def test_hls_output_is_decodable_by_ffprobe() -> None:
    apps = [{"name": "live", "publish_open": True, "hls": True, "hls_fragment": 1.0}]
    async with asyncio.timeout(90), run_server(apps, hls_port=0) as (hooks, port):
        url = f"rtmp://127.0.0.1:{port}/live/tv"
        async with process(*ffmpeg_publish_argv(url, 5)) as pub:
            assert await asyncio.wait_for(pub.wait(), 45) == 0
        await wait_for(lambda: not hooks.server.registry.publishing(), 10)
        muxer = hooks.server.hls[("live", "tv")]
        assert muxer.ended and len(muxer.segments) >= 3
        playlist = f"http://127.0.0.1:{hooks.server.hls_port}/hls/live/tv.m3u8"
        counts = await count_frames(playlist)
        # 5 s at 30 fps / ~43 AAC frames per second, all kept in the playlist window
        assert counts.get("video", 0) >= 140, counts
        assert counts.get("audio", 0) >= 180, counts


@pytest.mark.skipif(not have("/usr/lib/nginx/modules/ngx_rtmp_module.so"), reason="no nginx-rtmp")
async def test_pull_on_demand_from_nginx_rtmp_origin() -> None:
    nginx_port = free_port()
    apps = [{"name": "edge", "pull": f"rtmp://127.0.0.1:{nginx_port}/live"}]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "edge.flv")
        async with (
            asyncio.timeout(90),
            nginx_rtmp(nginx_port),
            run_server(apps) as (hooks, port),
            process(*ffmpeg_publish_argv(f"rtmp://127.0.0.1:{nginx_port}/live/cam", 8)) as pub,
        ):
            edge_url = f"rtmp://127.0.0.1:{port}/edge/cam"
            async with process(*ffmpeg_record_argv(edge_url, out, 3)) as player:
                assert await asyncio.wait_for(player.wait(), 45) == 0
            assert hooks.server.counters.relay_pull_started == 1
            await asyncio.wait_for(pub.wait(), 45)
        counts = await count_frames(out)
        assert counts.get("video", 0) >= 60, counts
        assert counts.get("audio", 0) >= 60, counts


async def test_ffmpeg_late_joiner_starts_on_a_keyframe() -> None:
    async with asyncio.timeout(90), run_server(APPS) as (hooks, port):
        url = f"rtmp://127.0.0.1:{port}/live/tv"
        async with process(*ffmpeg_publish_argv(url + "?key=secret", 12)):
            await wait_for(lambda: hooks.server.registry.publishing(), 30)
            stream = hooks.server.registry.get("live", "tv")
            assert stream is not None
            # join late and mid-GOP: the cache holds a keyframe and at least 10 frames after it
            await wait_for(lambda: stream.video_frames > 60 and len(stream.gop) > 10, 30)
            frames_before = stream.video_frames
            probe = await asyncio.create_subprocess_exec(
                "ffprobe", "-v", "error", "-rw_timeout", "15000000", "-select_streams", "v",
                "-show_packets", "-read_intervals", "%+#1", "-show_entries",
                "packet=pts_time,flags", "-of", "json", url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(probe.communicate(), 45)
            finally:
                await kill(probe)
            assert probe.returncode == 0, err
        packets = json.loads(out)["packets"]
        assert packets, out
        first = packets[0]
        assert first["flags"].startswith("K"), first  # a keyframe, not whatever came next
        # ... and the one cached before the join (the GOP cache, 30 fps, -g 30): the player
        # starts at once instead of waiting for the next keyframe
        pts = float(first["pts_time"])
        assert (frames_before - 31) / 30 - 0.1 <= pts <= frames_before / 30 + 0.1, (
            pts,
            frames_before,
        )
        assert hooks.server.counters.plays_total == 1
