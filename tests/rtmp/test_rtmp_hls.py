"""The pure HLS muxer: TS packet framing, CRC, segmenting on keyframes, playlist."""

from __future__ import annotations

from marchproxy_rtmp.hls import TS_PACKET, HlsMuxer, crc32_mpeg2, pat_packet, pmt_packet
from marchproxy_rtmp.synthetic import AAC_SEQUENCE_HEADER, audio_frame

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
