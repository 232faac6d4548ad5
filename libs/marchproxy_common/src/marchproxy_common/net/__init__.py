"""asyncio networking helpers shared by the data planes.

- ``net.proxied``: ``wrap_proxy_protocol(factory, mode, header_timeout)``, ``client_address``,
  ``proxy_info``: accept a PROXY v1/v2 header in front of any asyncio Protocol.
- ``net.relay``: ``Relay`` (bidirectional Protocol-to-Protocol relay with flow control, half-close,
  idle timeout, byte counters) and ``open_upstream``.
- ``net.fdpass``: pass sockets between processes over a Unix socket (SCM_RIGHTS):
  ``send_sockets``/``recv_sockets`` and ``ListenerHandoffServer``/``fetch_listeners`` for
  hitless restarts.
- ``net.handoff``: ``ConnectionHandoff`` / ``HandoffReceiver``: pass an accepted client socket
  (plus sniffed bytes and client address) to a co-located module, so the NLB leaves the path.
- ``net.udp``: ``UdpRelay``: UDP sessions per client address with an idle timeout.
"""
