"""The append-only JSONL usage log, written off the event loop by one writer thread.

Requests hand their record over and go on; every 10 ms at most the records collected so far
go to the writer thread as one batch (one wake-up per batch, not per request), which writes it
and flushes it to the OS (a process crash loses nothing that was flushed; an OS crash may lose
the last batches: there is no fsync per batch). When 100k records are not written yet,
recording waits for room (back-pressure, never a dropped record). Closing the log writes
everything still queued before it returns (bounded by a timeout, so a dead disk cannot hang a
shutdown forever).

Rotation keeps the disk use bounded without losing totals: when the file passes ``max_bytes``
the writer starts a new file whose first line is a *checkpoint* of the totals so far
(``{"checkpoint": {key_id: {field: n}}}``) and keeps ``backups`` older files (``path.1`` is the
newest). Replaying the current file alone (checkpoint + the records after it) therefore
rebuilds every total. The new file is written under ``path.tmp`` and renamed into place, so a
crash mid-rotation leaves either the old file or the new one, never neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

import structlog

_log = structlog.get_logger("marchproxy.ailb")

#: records not yet written before recording waits for room
MAX_PENDING = 100_000
#: records are handed to the writer at most this long after they came in (one batch)
BATCH_DELAY_S = 0.01
#: how long closing waits for the writer to finish
CLOSE_TIMEOUT_S = 10.0

Totals = dict[str, dict[str, int]]


def add_record(totals: Totals, fields: Sequence[str], rec: dict[str, Any]) -> None:
    """Count one usage record (``fields[0]`` is the request count) into ``totals``."""
    tot = totals.setdefault(str(rec["key_id"]), dict.fromkeys(fields, 0))
    tot[fields[0]] += 1
    for f in fields[1:]:
        tot[f] = tot.get(f, 0) + int(rec.get(f, 0))


def replay(path: str, fields: Sequence[str]) -> Totals:
    """Totals from the current log file: its checkpoint (if any) plus the records after it."""
    totals: Totals = {}
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        # a rotation was cut short: the old file is complete if it is still there
        if os.path.exists(path):
            os.remove(tmp)
        else:
            os.replace(tmp, path)
    if not os.path.isfile(path):
        return totals
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                if "checkpoint" in rec:
                    totals = {
                        k: {f: int(v.get(f, 0)) for f in fields}
                        for k, v in rec["checkpoint"].items()
                    }
                else:
                    add_record(totals, fields, rec)
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # a torn last line from a crash; the rest still counts
    return totals


class UsageLog:
    def __init__(
        self,
        path: str,
        fields: Sequence[str],
        *,
        max_bytes: int = 0,
        backups: int = 4,
        max_pending: int = MAX_PENDING,
        batch_delay_s: float = BATCH_DELAY_S,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.path = path
        self._fields = tuple(fields)
        self._max_bytes = max_bytes
        self._backups = backups
        self._max_pending = max_pending
        self._batch_delay_s = batch_delay_s
        self._on_error = on_error
        #: batches (lists of records) for the writer; bounded by ``_backlog`` below
        self._queue: queue.SimpleQueue[list[dict[str, Any]] | None] = queue.SimpleQueue()
        #: records collected on the loop for the next batch
        self._pending: list[dict[str, Any]] = []
        self._handoff_timer: asyncio.TimerHandle | None = None
        #: records appended but not yet written (pending + queued + being written)
        self._backlog = 0
        self._totals: Totals = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None
        self._done: asyncio.Future[None] | None = None
        #: records written so far (by the writer thread)
        self.written = 0

    def start(self, totals: Totals) -> None:
        """Open the file (a bad path fails here, at start-up) and start the writer; ``totals``
        (from :func:`replay`) seed the rotation checkpoints."""
        fh, regular = self._open()
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._done = self._loop.create_future()
        self._totals = {k: dict(v) for k, v in totals.items()}
        self._thread = threading.Thread(
            target=self._run, args=(fh, regular), name="ailb-usage-log", daemon=True
        )
        self._thread.start()

    @property
    def full(self) -> bool:
        """Whether :meth:`append` would wait for room now."""
        return self._backlog >= self._max_pending

    async def append(self, rec: dict[str, Any]) -> None:
        """Queue one record; waits only while ``max_pending`` records are not written yet.
        Records go to the writer in batches, at most ``batch_delay_s`` after they came in:
        one wake-up of the writer thread per batch, not per request."""
        assert self._room is not None and self._done is not None, "UsageLog.start() first"
        while self._backlog >= self._max_pending and not self._done.done():
            self._room.clear()
            await self._room.wait()
        if self._done.done():
            return  # the writer is gone (its error was logged and counted)
        self._pending.append(rec)
        self._backlog += 1
        if self._handoff_timer is None:
            assert self._loop is not None
            self._handoff_timer = self._loop.call_later(self._batch_delay_s, self._handoff)

    def _handoff(self) -> None:
        self._handoff_timer = None
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is None or self._done is None:
            return
        if self._handoff_timer is not None:
            self._handoff_timer.cancel()
        self._handoff()
        self._queue.put(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout_s)
        except TimeoutError:
            left = self._backlog
            _log.error("ailb_usage_log_stuck", path=self.path, unwritten=left, waited=timeout_s)
        self._thread = None

    # -- the writer thread -------------------------------------------------------------------

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def _finished(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if self._room is not None:
            self._room.set()  # wake anyone waiting for room: there will be none

    def _written(self, count: int) -> None:
        self._backlog -= count
        if self._room is not None and self._backlog < self._max_pending:
            self._room.set()

    def _open(self) -> tuple[IO[str], bool]:
        fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - the writer owns it
        regular = stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
        return fh, regular

    def _run(self, fh: IO[str], regular: bool) -> None:
        try:
            stop = False
            while not stop:
                batches = [self._queue.get()]
                while True:
                    try:
                        batches.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = None in batches
                records = [r for batch in batches if batch is not None for r in batch]
                if records:
                    fh = self._write(fh, records, regular)
                    self._notify(self._written, len(records))
        except Exception as exc:  # a bug, or the log could not be reopened
            self._error(exc)
        finally:
            with contextlib.suppress(OSError):
                fh.close()
            self._notify(self._finished)

    def _error(self, exc: Exception) -> None:
        _log.error("ailb_usage_log_failed", path=self.path, error=str(exc))
        if self._on_error is not None:
            self._on_error(exc)

    def _write(self, fh: IO[str], records: Iterable[dict[str, Any]], regular: bool) -> IO[str]:
        lines = []
        for rec in records:
            lines.append(json.dumps(rec, separators=(",", ":")))
            add_record(self._totals, self._fields, rec)
        try:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            self.written += len(lines)
        except OSError as exc:  # disk full, I/O error: count it, keep going
            self._error(exc)
            return fh
        if regular and self._max_bytes and fh.tell() > self._max_bytes:
            try:
                return self._rotate(fh)
            except OSError as exc:
                self._error(exc)
                return fh if not fh.closed else self._open()[0]
        return fh

    def _rotate(self, fh: IO[str]) -> IO[str]:
        fh.close()
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps({"checkpoint": self._totals, "ts": round(time.time(), 3)}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        if self._backups:
            for i in range(self._backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, self.path + ".1")
        os.replace(tmp, self.path)
        return self._open()[0]
