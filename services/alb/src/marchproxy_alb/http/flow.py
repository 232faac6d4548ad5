"""Bounded byte channels between the two sides of a proxied exchange, with flow control.

A producer protocol feeds body chunks; when more than ``high`` bytes are queued it pauses its
transport's reading, and the consumer resumes it once the queue drains below ``low``. Nothing ever
holds more than ``high`` + one read of a body in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, as the C function it wraps where it wraps one: the standard loop's
    ``time()`` is ``time.monotonic()`` behind a Python method call (~0.5k instructions, and a
    request read the clock four times). Other loops (uvloop) keep their own ``time``."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


CHANNEL_HIGH_WATER = 256 * 1024
CHANNEL_LOW_WATER = 64 * 1024


class BodyChannel:
    __slots__ = (
        "_chunks",
        "_eof",
        "_error",
        "_high",
        "_low",
        "_pause",
        "_paused",
        "_resume",
        "_waiter",
        "buffered",
        "received",
    )

    def __init__(
        self,
        pause: Callable[[], None],
        resume: Callable[[], None],
        *,
        high: int = CHANNEL_HIGH_WATER,
        low: int = CHANNEL_LOW_WATER,
    ) -> None:
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._high = high
        self._low = low
        self.buffered = 0
        self.received = 0

    @property
    def at_eof(self) -> bool:
        """All of the body arrived and was consumed."""
        return self._eof and not self._chunks

    @property
    def complete(self) -> bool:
        """All of the body arrived (maybe still queued)."""
        return self._eof

    def feed(self, data: bytes) -> None:
        if self._eof or self._error is not None:
            return
        self._chunks.append(data)
        n = len(data)
        self.buffered += n
        self.received += n
        if self.buffered > self._high and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._eof and not self._chunks:
            return
        self._error = exc
        self._wake()

    def release(self) -> None:
        """Drop whatever is queued and undo our pause (the exchange is over)."""
        self._chunks.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            self._resume()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def read_nowait(self) -> bytes | None:
        """Queued bytes, b"" at the end of the body, or None when nothing is ready yet."""
        if not self._chunks:
            if self._error is not None:
                raise self._error
            return b"" if self._eof else None
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self.buffered -= len(data)
        if self._paused and self.buffered <= self._low:
            self._paused = False
            self._resume()
        return data

    async def read(self) -> bytes:
        """Next queued bytes (joined), or b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self.buffered -= len(data)
        if self._paused and self.buffered <= self._low:
            self._paused = False
            self._resume()
        return data


class WriteFlow:
    """pause_writing/resume_writing bookkeeping for a protocol (asyncio's drain helper)."""

    __slots__ = ("_waiter", "closed", "paused")

    def __init__(self) -> None:
        self.paused = False
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        while self.paused and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.closed:
            raise ConnectionResetError("connection lost while writing")
