"""Sans-IO PostgreSQL v3 wire codec: decoders, encoders, md5/SCRAM helpers.

No asyncio or socket imports here: the DBLB (and the NLB sniffer) feed bytes in and get events.
"""

from __future__ import annotations

from .decoder import BackendDecoder, FrontendDecoder, MessageDecoder
from .errors import PROTOCOL_VIOLATION, RemoteProtocolError
from .messages import (
    DEFAULT_MAX_MESSAGE,
    MAX_AUTH_MESSAGE,
    MAX_STARTUP_PACKET,
    CancelRequest,
    DecoderState,
    FrontendEvent,
    GSSENCRequest,
    Message,
    SSLRequest,
    StartupMessage,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "MAX_AUTH_MESSAGE",
    "MAX_STARTUP_PACKET",
    "PROTOCOL_VIOLATION",
    "BackendDecoder",
    "CancelRequest",
    "DecoderState",
    "FrontendDecoder",
    "FrontendEvent",
    "GSSENCRequest",
    "Message",
    "MessageDecoder",
    "RemoteProtocolError",
    "SSLRequest",
    "StartupMessage",
]
