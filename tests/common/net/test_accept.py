"""net.accept.Acceptor on real sockets: batches, the pause on EMFILE and close."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
from structlog.testing import capture_logs

import marchproxy_common.net.accept as accept_module
from marchproxy_common.net.accept import Acceptor


def listening(cls: type[socket.socket] = socket.socket) -> socket.socket:
    sock = cls(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


async def wait_for(cond, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(limit):
        while not cond():
            await asyncio.sleep(0.005)


async def test_every_connection_reaches_the_callback_non_blocking_with_nodelay() -> None:
    accepted: list[tuple[socket.socket, object]] = []
    sock = listening()
    acceptor = Acceptor([sock], lambda s, peer: accepted.append((s, peer)), name="t")
    acceptor.start()
    port = sock.getsockname()[1]
    # more than one batch, connected before the loop gets to accept any of them
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    try:
        await wait_for(lambda: len(accepted) == len(clients))
        assert {peer for _, peer in accepted} == {c.getsockname() for c in clients}
        for s, _ in accepted:
            assert not s.getblocking()
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        acceptor.close()
        for c in clients:
            c.close()
        for s, _ in accepted:
            s.close()
    assert sock.fileno() == -1 and not acceptor.accepting


class CountsAccepts(socket.socket):
    """A listening socket that counts the acceptor's accept calls."""

    calls = 0

    def _accept(self):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super()._accept()


async def test_a_batch_of_one_accepts_every_connection_without_a_failed_accept() -> None:
    accepted: list[socket.socket] = []
    sock = listening(CountsAccepts)
    acceptor = Acceptor([sock], lambda s, peer: accepted.append(s), name="t", batch=1)
    acceptor.start()
    port = sock.getsockname()[1]
    # several waiting at once: the poll reports the listener again until all are taken
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        await wait_for(lambda: len(accepted) == len(clients))
        await asyncio.sleep(0.05)
        assert sock.calls == len(clients)  # (CountsAccepts: the acceptor's C accept calls)
    finally:
        acceptor.close()
        for c in clients:
            c.close()
        for s in accepted:
            s.close()
    with listening() as other, pytest.raises(ValueError, match="at least 1"):
        Acceptor([other], lambda s, peer: None, batch=0)


class FailsOnce(socket.socket):
    """A listening socket whose first accept fails as when the process is out of descriptors."""

    failures = 1

    def _accept(self):  # type: ignore[no-untyped-def]
        # (the acceptor calls the C accept under socket.accept(): see Acceptor._accept)
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super()._accept()


async def test_out_of_descriptors_pauses_accepting_then_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accept_module, "ACCEPT_RETRY_DELAY", 0.3)
    accepted: list[socket.socket] = []
    sock = listening(FailsOnce)
    acceptor = Acceptor([sock], lambda s, _: accepted.append(s), name="t")
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        acceptor.start()
        client = socket.create_connection(sock.getsockname())
        try:
            await wait_for(lambda: not acceptor.accepting)
            paused_at = loop.time()
            await wait_for(lambda: len(accepted) == 1)
            assert loop.time() - paused_at >= 0.25  # not spinning on the error
            assert acceptor.accepting
        finally:
            client.close()
            acceptor.close()
            for s in accepted:
                s.close()
    [failed] = [e for e in logs if e["event"] == "accept_failed"]
    assert failed["listener"] == "t" and failed["retry_after"] == 0.3


async def test_close_during_the_pause_cancels_the_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accept_module, "ACCEPT_RETRY_DELAY", 0.1)
    sock = listening(FailsOnce)
    acceptor = Acceptor([sock], lambda s, _: s.close(), name="t")
    acceptor.start()
    client = socket.create_connection(sock.getsockname())
    try:
        await wait_for(lambda: not acceptor.accepting)
        acceptor.close()
        await asyncio.sleep(0.3)  # past the retry: nothing is started on the closed socket
        assert not acceptor.accepting and sock.fileno() == -1
    finally:
        client.close()
