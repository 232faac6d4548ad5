"""The pure HLS muxer: TS packet framing, CRC, segmenting on keyframes, playlist; and the
server's HLS endpoint forgetting ended streams."""

from __future__ import annotations

import asyncio

import aiohttp

from marchproxy_rtmp.client import open_client
from marchproxy_rtmp.hls import TS_PACKET, HlsMuxer, crc32_mpeg2, pat_packet, pmt_packet
from marchproxy_rtmp.synthetic import AAC_SEQUENCE_HEADER, SyntheticPublisher, audio_frame
from marchproxy_rtmp.testing import run_server, wait_for

AVC_CONFIG = (
    b"\x17\x00\x00\x00\x00"
    + bytes([1, 0x42, 0xC0, 0x1E, 0xFF, 0xE1, 0, 4])
    + b"gB\xc0\x1e"
    + bytes([1, 0, 2])
    + b"h\xce"
)


def avc_frame(key: bool, nal: bytes = b"\x65" + bytes(500)) -> bytes:
    head = b"\x17\x01\x00\x00\x00" if key else b"\x27\x01\x00\x00\x00"
    return head + len(nal).to_bytes(4, "big") + nal


def test_crc32_mpeg2_check_value() -> None:
    assert crc32_mpeg2(b"123456789") == 0x0376E6E7


def test_psi_packets_are_188_bytes() -> None:
    for pkt in (pat_packet(), pmt_packet(True, True)):
        assert len(pkt) == TS_PACKET and pkt[0] == 0x47


def test_segments_start_on_keyframes_and_playlist_ends() -> None:
    mux = HlsMuxer("cam", fragment=1.0, playlist_length=3)
    mux.on_media(9, 0, AVC_CONFIG)
    mux.on_media(8, 0, AAC_SEQUENCE_HEADER)
    mux.on_media(9, 0, avc_frame(False))  # before the first keyframe: dropped
    for i in range(150):  # 5 s at 30 fps, keyframe every 30 frames
        ts = i * 1000 // 30
        mux.on_media(9, ts, avc_frame(i % 30 == 0))
        mux.on_media(8, ts, audio_frame(i))
    mux.finish()
    assert [s.sequence for s in mux.segments] == [2, 3, 4]  # window of 3
    for seg in mux.segments:
        assert len(seg.data) % TS_PACKET == 0
        assert all(seg.data[i] == 0x47 for i in range(0, len(seg.data), TS_PACKET))
        assert seg.data[TS_PACKET * 2 + 1] & 0x40  # first media packet starts a PES
    text = mux.playlist()
    assert "#EXT-X-MEDIA-SEQUENCE:2" in text and text.rstrip().endswith("#EXT-X-ENDLIST")
    assert mux.segment(3) is not None and mux.segment(0) is None


async def test_ended_hls_stream_is_evicted_after_its_playlist_window() -> None:
    apps = [
        {
            "name": "live",
            "publish_open": True,
            "hls": True,
            "hls_fragment": 0.5,
            "hls_playlist_length": 2,
        }
    ]
    async with (
        asyncio.timeout(30),
        run_server(apps, hls_port=0) as (hooks, port),
        aiohttp.ClientSession() as http,
    ):
        server = hooks.server
        url = f"http://127.0.0.1:{server.hls_port}/hls/live/cam.m3u8"
        proto = await open_client("127.0.0.1", port, "live")
        pub = SyntheticPublisher(proto, await proto.publish("cam"), gop=15)
        pub.send_headers()
        await pub.run(90, realtime=False)  # 3 s of media: segments of ~0.5 s
        await wait_for(lambda: len(server.hls[("live", "cam")].segments) == 2)
        muxer = server.hls[("live", "cam")]
        window = sum(s.duration for s in muxer.segments)
        proto.close()
        await wait_for(lambda: muxer.ended)
        ended_at = asyncio.get_running_loop().time()
        async with http.get(url) as r:  # still served for a while, with ENDLIST
            assert r.status == 200
            assert (await r.text()).rstrip().endswith("#EXT-X-ENDLIST")
        seg = muxer.segments[-1].sequence
        # after the playlist window it is forgotten: playlist and segments are gone
        await wait_for(lambda: ("live", "cam") not in server.hls, window + 5)
        assert asyncio.get_running_loop().time() - ended_at >= window - 0.2
        async with http.get(url) as r:
            assert r.status == 404
        async with http.get(url.replace(".m3u8", f"-{seg}.ts")) as r:
            assert r.status == 404
