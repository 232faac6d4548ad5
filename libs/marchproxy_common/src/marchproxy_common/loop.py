"""Start a service's main coroutine on the selected event loop (MARCHPROXY_LOOP=asyncio|uvloop).

The default is the standard library's loop: uvloop was no faster in our relay measurements and
aborted under connection churn (DESIGN.md section 5), so it stays opt-in.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOOP_ENV = "MARCHPROXY_LOOP"


def selected_loop() -> str:
    name = os.environ.get(LOOP_ENV, "asyncio").strip().lower() or "asyncio"
    if name not in ("asyncio", "uvloop"):
        raise SystemExit(f"{LOOP_ENV} must be 'asyncio' or 'uvloop', not {name!r}")
    return name


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on the loop named by MARCHPROXY_LOOP."""
    if selected_loop() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    from marchproxy_common.net.sockets import PollerSelector

    # the selector shares its epoll with the service's SocketPoller (net.sockets)
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(PollerSelector())) as runner:
        return runner.run(main)


def freeze_startup_heap() -> int:
    """Move every object alive after start-up out of the cyclic collector's sight.

    Imported modules, grpc, protobuf, pydantic and the first config live as long as the
    process, yet each full (generation 2) collection walks them all: with ~150k objects that
    is a 70 ms pause here, taken every few config applies (each applied snapshot of 1,000 routes
    adds tens of thousands of survivors). Frozen objects are still freed by reference counting;
    only reference cycles among them are never collected, a one-off start-up cost. Call it
    once, from a process's entry point after start-up (process-wide: not from library code
    that may run inside another program). Returns the number of objects frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
