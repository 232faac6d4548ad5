"""Start a service's main coroutine on the selected event loop (MARCHPROXY_LOOP=asyncio|uvloop).

The default is the standard library's loop: uvloop was no faster in our relay measurements and
aborted under connection churn (DESIGN.md section 5), so it stays opt-in.
"""

from __future__ import annotations

import asyncio
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
    with asyncio.Runner() as runner:
        return runner.run(main)
