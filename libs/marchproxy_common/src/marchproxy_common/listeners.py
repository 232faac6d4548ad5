"""The protocol names an NLB listener in desired state may accept (docs/desired-state.md).

Each is a ``marchproxy.v1.Protocol`` name without its prefix, lower-cased: the API validates
listeners against this set and the NLB reads the same set, so a listener the API accepts is
never one the NLB rejects (which would refuse the whole snapshot). HLS (HTTP) and QUIC are not
listener protocols.
"""

from __future__ import annotations

LISTENER_PROTOCOLS = frozenset(
    {"http", "https", "http2", "grpc", "websocket", "tls", "postgresql", "mysql", "rtmp",
     "redis", "tcp", "udp", "mongodb", "rtsp"}
)  # fmt: skip

#: what the NLB may send an instance before the client's bytes
PROXY_HEADER_MODES = ("v2", "v1", "none")
