"""UdpRelay with real UDP sockets: per-client sessions, replies, idle expiry, limits."""

from __future__ import annotations

import asyncio

from marchproxy_common.net.udp import UdpRelay

Addr = tuple[str, int]


class Echo(asyncio.DatagramProtocol):
    """Upstream: replies with '<tag>:<sender port>:<payload>'."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.seen: list[Addr] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.seen.append(addr)
        self.transport.sendto(b"%s:%d:%s" % (self.tag, addr[1], data), addr)  # type: ignore[attr-defined]


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.queue.put_nowait(data)


async def udp_endpoint(proto: asyncio.DatagramProtocol, **kw: object) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(lambda: proto, **kw)  # type: ignore[arg-type]
    return t


async def test_udp_sessions_per_client_with_replies_and_idle_expiry() -> None:
    a, b = Echo(b"A"), Echo(b"B")
    ta = await udp_endpoint(a, local_addr=("127.0.0.1", 0))
    tb = await udp_endpoint(b, local_addr=("127.0.0.1", 0))
    ups = [ta.get_extra_info("sockname"), tb.get_extra_info("sockname")]
    picks: list[Addr] = []
    closed: list[tuple[Addr, str, int, int]] = []

    def pick(client: Addr) -> Addr | None:
        picks.append(client)
        return tuple(ups[len(picks) % 2 == 0])  # first client -> A, second -> B

    relay = UdpRelay(
        pick,
        idle_timeout=0.4,
        on_session_close=lambda c, u, up, down, why: closed.append((c, why, up, down)),
    )
    host, port = await relay.start("127.0.0.1", 0)
    c1, c2 = Client(), Client()
    t1 = await udp_endpoint(c1, remote_addr=(host, port))
    t2 = await udp_endpoint(c2, remote_addr=(host, port))
    try:
        async with asyncio.timeout(20):
            for i in range(5):  # the first datagrams race the session's socket: all arrive
                t1.sendto(b"one-%d" % i)
            t2.sendto(b"two")
            got1 = sorted([await c1.queue.get() for _ in range(5)])
            got2 = await c2.queue.get()
            assert [g.split(b":")[0] for g in got1] == [b"A"] * 5
            assert sorted(g.split(b":")[2] for g in got1) == [b"one-%d" % i for i in range(5)]
            assert got2.startswith(b"B:")
            assert relay.sessions == 2
            assert len(picks) == 2  # one pick per client address, not per datagram
            # one upstream socket per client: A saw one source port
            assert len({addr for addr in a.seen}) == 1
            # then both go quiet: both sessions expire
            while relay.sessions:
                await asyncio.sleep(0.05)
            assert sorted(why for _, why, _, _ in closed) == ["idle", "idle"]
            assert relay.bytes_up == sum(len(b"one-%d" % i) for i in range(5)) + 3
            # a new datagram after expiry opens a new session
            t1.sendto(b"again")
            assert (await c1.queue.get()).endswith(b"again")
            assert relay.sessions_total == 3
    finally:
        relay.close()
        for t in (t1, t2, ta, tb):
            t.close()


async def test_udp_limits_and_no_upstream() -> None:
    echo = Echo(b"E")
    te = await udp_endpoint(echo, local_addr=("127.0.0.1", 0))
    allow = {"yes": True}

    def pick(client: Addr) -> Addr | None:
        return te.get_extra_info("sockname") if allow["yes"] else None

    relay = UdpRelay(pick, idle_timeout=30, max_sessions=1)
    host, port = await relay.start("127.0.0.1", 0)
    c1, c2 = Client(), Client()
    t1 = await udp_endpoint(c1, remote_addr=(host, port))
    t2 = await udp_endpoint(c2, remote_addr=(host, port))
    try:
        async with asyncio.timeout(20):
            t1.sendto(b"x")
            assert (await c1.queue.get()).endswith(b"x")
            t2.sendto(b"y")  # a second client: over max_sessions
            while relay.dropped_overload == 0:
                await asyncio.sleep(0.01)
            relay.close()
            relay2 = UdpRelay(pick)
            allow["yes"] = False
            host2, port2 = await relay2.start("127.0.0.1", 0)
            t2.close()
            t2 = await udp_endpoint(c2, remote_addr=(host2, port2))
            t2.sendto(b"z")
            while relay2.dropped_no_upstream == 0:
                await asyncio.sleep(0.01)
            relay2.close()
    finally:
        relay.close()
        for t in (t1, t2, te):
            t.close()
