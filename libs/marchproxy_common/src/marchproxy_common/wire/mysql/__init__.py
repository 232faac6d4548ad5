"""Sans-IO MySQL protocol pieces: packet framing, handshake, scrambles, response tracking."""

from __future__ import annotations

from .errors import RemoteProtocolError
from .packets import Handshake, HandshakeResponse, Packet, PacketDecoder, encode_packet
from .response import ResponseTracker

__all__ = [
    "Handshake",
    "HandshakeResponse",
    "Packet",
    "PacketDecoder",
    "RemoteProtocolError",
    "ResponseTracker",
    "encode_packet",
]
