"""The one exception type of the RTMP wire code."""

from __future__ import annotations


class RtmpProtocolError(Exception):
    """The peer broke the RTMP protocol (or a named size cap); the connection should close."""
