"""Stop a listening ``asyncio.Server`` without dropping connections the kernel already accepted.

On the standard selector loop (Python 3.11 and 3.12), ``Server.close()`` racing an accept loses
the connection: ``_accept_connection`` calls ``accept()`` and schedules a task that builds the
transport one loop iteration later, and that task's ``Server._attach()`` fails its ``assert
self._sockets is not None`` once ``close()`` has run. The error is swallowed, the accepted
socket is never handed to a protocol, and when the process exits the client gets a reset
(CPython gh-109564, still open). A drain or a hitless hand-over closes listeners under load, so
it would hit this exactly when it must not.

``stop_serving(server)`` first stops the accept callbacks (public ``loop.remove_reader``), lets
the transports of sockets accepted so far attach and reach ``connection_made``, and only then
closes the server. Other loops (uvloop) get a plain ``close()``.
"""

from __future__ import annotations

import asyncio

__all__ = ["ATTACH_ITERATIONS", "stop_serving"]

# Loop iterations between ``accept()`` and ``connection_made``: one for the accept task's first
# step (it builds and attaches the transport), one for the ``call_soon(connection_made)``.
ATTACH_ITERATIONS = 2


async def stop_serving(server: asyncio.AbstractServer) -> None:
    """Stop accepting on ``server`` and close it; every connection accepted before this call
    has had its ``connection_made`` when it returns (on the selector loop)."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.SelectorEventLoop) and isinstance(server, asyncio.Server):
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(ATTACH_ITERATIONS):
            await asyncio.sleep(0)
    server.close()
