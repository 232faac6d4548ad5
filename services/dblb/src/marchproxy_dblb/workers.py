"""Several DBLB processes on one port (SO_REUSEPORT), so the pooler uses more than one core.

The main process (worker 0) runs the module runtime and its own data plane; it starts
``workers - 1`` worker processes (``python -m marchproxy_dblb.workers``) that run only a data
plane on the same port. The kernel spreads new connections over the listeners.

- **Limits are shared by splitting them**: each worker gets its part of every pool size,
  ``min_pool_size`` and ``max_client_conn`` (:meth:`PoolManager.share_of`).
- **Config**: the main process sends each snapshot it applies to every worker (JSON lines on
  the worker's stdin); a worker applies the first one before it listens, and exits when its
  stdin closes (the main process stopped).
- **Restarts**: a worker that dies is started again, after a delay that doubles while it keeps
  dying soon after its start (``dblb_worker_exited`` / ``dblb_worker_restarted`` in the log,
  ``marchproxy_dblb_worker_restarts_total`` on ``/metrics``).
- **Stats**: workers report their pools every second (JSON lines on stdout); ``/metrics`` of
  the main process sums them with its own.
- **Cancel requests**: the fake backend pid carries the worker index in its low bits; a
  CancelRequest that reaches another worker is forwarded to the owner's unix socket (what
  PgBouncer's peering does).
- **Admin console**: the worker that took a command runs it on each other one through the
  same unix sockets and answers once all did: PAUSE / RESUME act on every worker, SHOW POOLS and
  SHOW STATS sum the workers' rows, SHOW CLIENTS and SHOW SERVERS list them all (with a
  ``worker`` column). RELOAD goes to the main process, which re-reads the config and sends it to
  every worker (workers have no config file of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from marchproxy_common.loop import run
from marchproxy_common.tasks import spawn
from marchproxy_common.wire.postgres import CancelRequest, FrontendDecoder, RemoteProtocolError
from marchproxy_common.wire.postgres import encoder as enc

if TYPE_CHECKING:
    from .module import DblbHooks

_log = structlog.get_logger("marchproxy.dblb.workers")
#: Low bits of a fake backend pid that name the worker (so at most 8 workers).
WORKER_BITS = 3
MAX_WORKERS = 1 << WORKER_BITS
#: Seconds a worker has to bind its listener and say it is ready.
WORKER_START_TIMEOUT = 30.0
#: Seconds a worker has to exit after its stdin closed, before it is killed.
WORKER_STOP_TIMEOUT = 10.0
#: Seconds before a worker that died is started again; doubled (up to RESTART_MAX_DELAY) while
#: it keeps dying within RESTART_MAX_DELAY of its start.
RESTART_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
#: Seconds between pool reports from a worker.
REPORT_INTERVAL = 1.0
#: Largest line on a worker pipe (a config snapshot or a pool report).
MAX_PIPE_LINE = 64 << 20
#: Seconds to deliver a CancelRequest to a peer worker.
PEER_CANCEL_TIMEOUT = 5.0
#: Seconds apply_config waits for every worker to acknowledge a snapshot.
APPLY_TIMEOUT = 10.0
#: Seconds a peer has to answer an admin command other than PAUSE (SHOW, RESUME, RELOAD).
PEER_ADMIN_TIMEOUT = APPLY_TIMEOUT + 5.0


def worker_of(pid: int) -> int:
    return pid & (MAX_WORKERS - 1)


def peer_socket(peer_dir: str, index: int) -> str:
    return os.path.join(peer_dir, f"w{index}.sock")


async def serve_peer(hooks: DblbHooks, path: str) -> asyncio.AbstractServer:
    """This worker's unix socket, for the other workers: a CancelRequest (16 bytes, as on the
    wire) for one of our clients, or an admin command as one JSON line (``{"command": "PAUSE",
    "database": null}``, ``{"command": "SHOW", "what": "POOLS"}``) answered with one JSON line
    (:meth:`DblbHooks.admin_local`: ``{"ok": true, "rows": [...], "errors": [...]}``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(PEER_CANCEL_TIMEOUT):
                first = await reader.readexactly(1)
                if first == b"{":
                    line = first + await reader.readline()
            if first == b"{":
                answer = await hooks.admin_local(json.loads(line))
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
                return
            async with asyncio.timeout(PEER_CANCEL_TIMEOUT):
                data = first + await reader.readexactly(15)
            events = FrontendDecoder().feed(data)
            if len(events) == 1 and isinstance(events[0], CancelRequest):
                hooks.cancel_local(events[0].process_id, events[0].secret_key)
        except (
            OSError,
            TimeoutError,
            ValueError,  # bad JSON, or a line over the reader's limit
            asyncio.IncompleteReadError,
            RemoteProtocolError,
        ) as exc:
            _log.info("peer_request_bad", error=str(exc))
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path)


async def admin_on_peer(
    path: str, command: Mapping[str, Any], wait_s: float
) -> dict[str, Any] | None:
    """Run an admin command on the worker behind ``path``: its answer, or None when it could
    not be reached, timed out or answered nonsense."""
    try:
        async with asyncio.timeout(wait_s):
            # SHOW CLIENTS of a busy worker is one long line
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_PIPE_LINE)
            try:
                writer.write(json.dumps(command).encode() + b"\n")
                await writer.drain()
                answer = json.loads(await reader.readline())
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError) as exc:
        _log.warning("peer_admin_failed", path=path, command=command, error=str(exc))
        return None
    if not isinstance(answer, dict):
        _log.warning("peer_admin_failed", path=path, command=command, error="not an object")
        return None
    return answer


async def forward_cancel(path: str, pid: int, key: int) -> None:
    try:
        async with asyncio.timeout(PEER_CANCEL_TIMEOUT):
            _, writer = await asyncio.open_unix_connection(path)
            writer.write(enc.cancel_request(pid, key))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        _log.info("peer_cancel_failed", path=path, error=str(exc))


class WorkerSupervisor:
    """The main process's side: start the workers, feed them config, collect their reports,
    and start a worker again when it dies (as nginx's master process does): its share of the
    pool limits and its core would otherwise stay lost until the module restarts."""

    def __init__(self, hooks: DblbHooks, host: str, port: int, count: int, peer_dir: str) -> None:
        self.hooks = hooks
        self.host, self.port, self.count, self.peer_dir = host, port, count, peer_dir
        #: worker ``index`` runs as ``procs[index - 1]``
        self.procs: list[asyncio.subprocess.Process] = []
        #: worker index -> its latest pool report
        self.reports: dict[int, list[dict[str, Any]]] = {}
        #: workers started again after they died
        self.restarts = 0
        self._watchers: list[asyncio.Task[None]] = []
        self._seq = 0
        #: the latest snapshot as sent; a (re)started worker gets it before it listens
        self._config_line = b'{"snapshot": null, "seq": 0}\n'
        #: worker index -> the last snapshot sequence number it applied (and its errors)
        self.applied: dict[int, tuple[int, list[str]]] = {}
        self._changed = asyncio.Event()

    async def start(self, snapshot: Mapping[str, Any] | None) -> None:
        if snapshot is not None:
            self._set_config(snapshot)
        try:
            for index in range(1, self.count):
                self.procs.append(await self._spawn(index))
            async with asyncio.timeout(WORKER_START_TIMEOUT):
                for index, proc in enumerate(self.procs, start=1):
                    await self._until_ready(index, proc)
        except BaseException:
            await self.stop()
            raise
        for index in range(1, self.count):
            self._watchers.append(spawn(self._watch(index), name=f"dblb worker {index}"))

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        """Start worker ``index`` and hand it the current config (it applies that first)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "marchproxy_dblb.workers",
            str(index),
            str(self.count),
            self.host,
            str(self.port),
            self.peer_dir,
            self.hooks.settings.proxy_protocol,
            self.hooks.settings.proxy_trusted_sources,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=MAX_PIPE_LINE,
        )
        assert proc.stdin is not None
        proc.stdin.write(self._config_line)
        return proc

    async def _until_ready(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Until worker ``index`` listens, with the config it was given applied."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            if line.startswith(b'{"ready"'):
                self._note_applied(index, json.loads(line))  # (the ready line says it too)
                return
        raise RuntimeError(f"DBLB worker exited at start ({await proc.wait()})")

    async def _watch(self, index: int) -> None:
        """Read worker ``index``'s reports; when it dies, start it again after a delay that
        doubles while it keeps dying within RESTART_MAX_DELAY of its start."""
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY
        while True:
            proc = self.procs[index - 1]
            started = loop.time()
            await self._read(index, proc)
            self.reports.pop(index, None)
            try:  # its exit code (negative: the signal that ended it), once reaped
                async with asyncio.timeout(WORKER_STOP_TIMEOUT):
                    returncode = await proc.wait()
            except TimeoutError:  # it closed its stdout but lives on: no use to us
                returncode = await _kill(proc)
            self._changed.set()  # wait_applied stops waiting for it
            if loop.time() - started > RESTART_MAX_DELAY:
                delay = RESTART_DELAY
            _log.warning(
                "dblb_worker_exited", worker=index, returncode=returncode, restart_in=delay
            )
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_DELAY)
                try:
                    new = await self._spawn(index)
                except OSError as exc:
                    _log.error("dblb_worker_start_failed", worker=index, error=str(exc))
                    continue
                # in place at once: a snapshot sent while it starts reaches it too
                self.procs[index - 1] = new
                self.applied.pop(index, None)
                try:
                    async with asyncio.timeout(WORKER_START_TIMEOUT):
                        await self._until_ready(index, new)
                except (RuntimeError, TimeoutError, ValueError, KeyError) as exc:
                    _log.error("dblb_worker_start_failed", worker=index, error=str(exc))
                    await _kill(new)
                    continue
                except BaseException:  # cancelled: the supervisor stops
                    await _kill(new)
                    raise
                break
            self.restarts += 1
            _log.info("dblb_worker_restarted", worker=index, pid=new.pid)

    async def _read(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Worker ``index``'s pool reports and config acknowledgements, until its stdout ends."""
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over MAX_PIPE_LINE: skip it
                continue
            if not line:
                return
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and isinstance(msg.get("pools"), list):
                    self.reports[index] = msg["pools"]
                elif isinstance(msg, dict) and isinstance(msg.get("applied"), int):
                    self._note_applied(index, msg)

    def _note_applied(self, index: int, msg: dict[str, Any]) -> None:
        """Worker ``index`` says which snapshot it applied, and its errors."""
        self.applied[index] = (int(msg["applied"]), list(msg.get("errors") or []))
        self._changed.set()

    def _set_config(self, snapshot: Mapping[str, Any]) -> bytes:
        self._seq += 1
        line = json.dumps({"snapshot": snapshot, "seq": self._seq}, default=str).encode() + b"\n"
        self._config_line = line
        return line

    def broadcast(self, snapshot: Mapping[str, Any]) -> int:
        """Send ``snapshot`` to every worker; returns its sequence number."""
        line = self._set_config(snapshot)
        for proc in self.procs:
            if proc.stdin is not None and proc.returncode is None:
                with contextlib.suppress(ConnectionError):
                    proc.stdin.write(line)
        return self._seq

    async def wait_applied(self, seq: int) -> list[str]:
        """Until every running worker applied snapshot ``seq``; their errors (or a timeout).
        A worker being started again gets the latest snapshot before it listens."""
        try:
            async with asyncio.timeout(APPLY_TIMEOUT):
                while True:
                    running = [i for i, p in enumerate(self.procs, 1) if p.returncode is None]
                    done = [i for i in running if self.applied.get(i, (0, []))[0] >= seq]
                    if len(done) == len(running):
                        break
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return [f"workers did not apply the config within {APPLY_TIMEOUT:g}s"]
        return [f"worker {i}: {e}" for i in sorted(self.applied) for e in self.applied[i][1]]

    def running(self) -> int:
        """Workers alive now, the main process included."""
        return 1 + sum(p.returncode is None for p in self.procs)

    def worker_reports(self) -> list[dict[str, Any]]:
        return [row for rows in self.reports.values() for row in rows]

    async def stop(self) -> None:
        for task in self._watchers:  # (no restarts from here on)
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    proc.stdin.close()
        for proc in self.procs:
            try:
                async with asyncio.timeout(WORKER_STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                await _kill(proc)


async def _kill(proc: asyncio.subprocess.Process) -> int:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    return await proc.wait()


async def _worker_main(argv: list[str]) -> int:
    from .config import DblbSettings
    from .module import DblbHooks

    index, count, host, port, peer_dir, proxy_protocol, proxy_trusted_sources = argv
    settings = DblbSettings(
        data_host=host,
        data_port=int(port),
        register_with_nlb=False,
        proxy_protocol=proxy_protocol,  # type: ignore[arg-type]
        proxy_trusted_sources=proxy_trusted_sources,
        mysql_port=-1,
        workers=int(count),
    )
    hooks = DblbHooks(settings, worker_index=int(index), peer_dir=peer_dir)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_PIPE_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # stdout is the channel to the main process: keep it on its own descriptor and send
    # whatever else writes to stdout (the log) to stderr
    control = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    out, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, control)

    def apply(line: bytes) -> dict[str, Any]:
        msg = json.loads(line)
        errors: list[str] = []
        if isinstance(msg, dict) and isinstance(msg.get("snapshot"), dict):
            errors = hooks.apply_snapshot(msg["snapshot"])
            if errors:
                _log.warning("worker_config_rejected", worker=index, errors=errors)
        return {"applied": msg.get("seq", 0) if isinstance(msg, dict) else 0, "errors": errors}

    # the first line is the config the main process runs: apply it before listening, so that
    # no client lands on a worker without it (a restarted worker joins a port in use)
    line = await reader.readline()
    if not line:
        return 0  # the main process stopped before we started
    first = apply(line)
    await hooks.start_data_plane()
    out.write(json.dumps({"ready": int(index), **first}).encode() + b"\n")

    async def report() -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            out.write(json.dumps({"pools": hooks.local_pool_report()}).encode() + b"\n")

    reporter = spawn(report(), name=f"dblb worker {index} report")
    try:
        while line := await reader.readline():
            out.write(json.dumps(apply(line)).encode() + b"\n")
    finally:
        reporter.cancel()
        await hooks.close()
    _log.info("dblb_worker_stopped", worker=index, reason="its stdin closed")
    return 0


if __name__ == "__main__":
    sys.exit(run(_worker_main(sys.argv[1:])))  # (the loop the main process runs on)
