"""Sans-IO RTMP: handshake, chunk stream, AMF0/AMF3 and command messages (Adobe RTMP spec 1.0)."""

from marchproxy_common.wire.rtmp.errors import RtmpProtocolError

__all__ = ["RtmpProtocolError"]
