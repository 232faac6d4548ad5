"""Scaling executors behind one interface (``Executor`` in ``autoscaler``).

- ``process``: starts and stops local module processes (the default for ``make run``); scaling
  down sends SIGTERM, so the module unregisters, drains and exits by itself.
- ``docker``: the Docker Engine HTTP API (on its Unix socket, or a TCP URL): containers labelled
  ``marchproxy.module=<module>`` are created/started and stopped/removed.
- ``kubernetes``: the API server's ``deployments/<name>/scale`` subresource (merge patch of
  ``spec.replicas``), with the pod's service-account token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from marchproxy_common.tasks import spawn

_log = structlog.get_logger("marchproxy.nlb.executors")

STOP_WAIT = 15.0  # seconds a stopped child gets before SIGKILL when the NLB itself stops
HTTP_TIMEOUT = 30.0
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ExecutorError(RuntimeError):
    pass


@dataclass(eq=False)
class Child:
    proc: asyncio.subprocess.Process
    instance_id: str
    registered: bool = False  # seen in the registry at least once
    stopping: bool = False  # we sent SIGTERM (scale down, or the NLB stops)


class ProcessExecutor:
    """Local module processes. Children that started but have not registered yet count as
    instances (``pending``), or every evaluation while a module boots would start another;
    a child that exits before it ever registered is a failed start, and the module's next
    start waits ``backoff_base * 2**(failures-1)`` seconds (at most ``backoff_max``)."""

    name = "process"

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        env: Mapping[str, str] | None = None,
        *,
        is_registered: Callable[[str], bool] | None = None,
        backoff_base: float = 2.0,
        backoff_max: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.commands = {k: list(v) for k, v in commands.items()}
        self.env = dict(env or {})
        #: instance id -> is it in the registry? Without it children are never pending and
        #: a failed start cannot be told from a clean exit (no backoff).
        self.is_registered = is_registered
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._clock = clock
        self.children: dict[str, list[Child]] = {}
        self.failed_starts: dict[str, int] = {}
        self.started_total = 0
        self._next_start: dict[str, float] = {}

    def _alive(self, module: str) -> list[Child]:
        alive = [c for c in self.children.get(module, []) if c.proc.returncode is None]
        self.children[module] = alive
        for c in alive:
            if not c.registered and self._registered(c.instance_id):
                c.registered = True
                self.failed_starts.pop(module, None)  # a start worked: forget the failures
        return alive

    def _registered(self, instance_id: str) -> bool:
        return self.is_registered is None or self.is_registered(instance_id)

    def pending(self, module: str) -> int:
        """Children started and alive that have not registered yet."""
        return sum(1 for c in self._alive(module) if not c.registered and not c.stopping)

    def backoff(self, module: str) -> float:
        """Seconds until this module may be started again (0: now)."""
        return max(0.0, self._next_start.get(module, 0.0) - self._clock())

    async def scale(self, module: str, current: int, target: int) -> str:
        cmd = self.commands.get(module)
        if not cmd:
            raise ExecutorError(f"no process command configured for module {module!r}")
        alive = self._alive(module)
        mine = [c for c in alive if not c.stopping]  # not already draining
        if target > current:
            wait = self.backoff(module)
            if wait > 0:
                raise ExecutorError(
                    f"{module} failed to start {self.failed_starts.get(module, 0)} time(s); "
                    f"next start in {wait:.1f}s"
                )
            for _ in range(target - current):
                instance_id = f"{module}-{uuid.uuid4().hex[:8]}"
                env = {
                    **os.environ,
                    **self.env,
                    "MODULE_ID": module,
                    "INSTANCE_ID": instance_id,
                    "DATA_PORT": "0",
                    "GRPC_PORT": "0",
                    "ADMIN_PORT": "0",
                }
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    env=env,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                )
                child = Child(proc, instance_id)
                alive.append(child)
                self.started_total += 1
                spawn(self._reap(module, child), name=f"reap {module} pid {proc.pid}")
            return f"started {target - current} {module} process(es)"
        stop = min(current - target, len(mine))
        for child in reversed(mine[-stop:] if stop else []):
            child.stopping = True
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        if stop < current - target:
            return f"stopped {stop}; the other instances were not started by this NLB"
        return f"stopping {stop} {module} process(es)"

    async def _reap(self, module: str, child: Child) -> None:
        code = await child.proc.wait()
        if child.stopping or child.registered or self._registered(child.instance_id):
            return
        failures = self.failed_starts[module] = self.failed_starts.get(module, 0) + 1
        wait = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
        self._next_start[module] = self._clock() + wait
        _log.warning(
            "module_start_failed",
            module=module,
            instance_id=child.instance_id,
            exit_code=code,
            failures=failures,
            retry_in=wait,
        )

    async def close(self, *, keep_instances: bool = False) -> None:
        if keep_instances:
            self.children.clear()  # they run on, registered with the NLB that took over
            return
        procs = [c.proc for cs in self.children.values() for c in cs if c.proc.returncode is None]
        for c in (c for cs in self.children.values() for c in cs):
            c.stopping = True
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), STOP_WAIT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()


def _session(url: str) -> tuple[aiohttp.ClientSession, str]:
    """``unix:///var/run/docker.sock`` or ``http://host:port``."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"))
        return aiohttp.ClientSession(connector=connector, timeout=timeout), "http://docker"
    return aiohttp.ClientSession(timeout=timeout), url.rstrip("/")


class DockerExecutor:
    name = "docker"
    LABEL = "marchproxy.module"

    def __init__(
        self,
        url: str,
        images: Mapping[str, str],
        *,
        env: Mapping[str, str] | None = None,
        network: str = "",
        stop_timeout: int = 30,
    ) -> None:
        self.url = url
        self.images = dict(images)
        self.env = dict(env or {})
        self.network = network
        self.stop_timeout = stop_timeout
        self._http: aiohttp.ClientSession | None = None
        self._base = ""

    def _client(self) -> tuple[aiohttp.ClientSession, str]:
        if self._http is None:
            self._http, self._base = _session(self.url)
        return self._http, self._base

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        http, base = self._client()
        async with http.request(method, base + path, **kw) as r:
            body = await r.read()
            if r.status >= 300 and r.status != 304:
                raise ExecutorError(f"docker {method} {path}: {r.status} {body[:200]!r}")
            return json.loads(body) if body else None

    def pending(self, module: str) -> int:
        return 0  # scale() compares the target with the containers that exist, started or not

    def backoff(self, module: str) -> float:
        return 0.0

    async def containers(self, module: str) -> list[dict[str, Any]]:
        filters = json.dumps({"label": [f"{self.LABEL}={module}"]})
        found: list[dict[str, Any]] = await self._call(
            "GET", "/containers/json", params={"filters": filters}
        )
        return sorted(found, key=lambda c: c.get("Created", 0))

    async def scale(self, module: str, current: int, target: int) -> str:
        running = await self.containers(module)
        if target > len(running):
            image = self.images.get(module)
            if not image:
                raise ExecutorError(f"no image configured for module {module!r}")
            for _ in range(target - len(running)):
                name = f"marchproxy-{module}-{uuid.uuid4().hex[:8]}"
                spec: dict[str, Any] = {
                    "Image": image,
                    "Labels": {self.LABEL: module},
                    "Env": [f"{k}={v}" for k, v in {**self.env, "MODULE_ID": module}.items()],
                }
                if self.network:
                    spec["HostConfig"] = {"NetworkMode": self.network}
                created = await self._call(
                    "POST", "/containers/create", params={"name": name}, json=spec
                )
                await self._call("POST", f"/containers/{created['Id']}/start")
            return f"created {target - len(running)} container(s)"
        victims = running[target:] if target < len(running) else []
        for c in reversed(victims):
            await self._call("POST", f"/containers/{c['Id']}/stop", params={"t": self.stop_timeout})
            await self._call("DELETE", f"/containers/{c['Id']}")
        return f"removed {len(victims)} container(s)"

    async def close(self, *, keep_instances: bool = False) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class KubernetesExecutor:
    name = "kubernetes"

    def __init__(
        self,
        api_url: str = "https://kubernetes.default.svc",
        namespace: str = "",
        *,
        token: str = "",
        ca_file: str = "",
        deployments: Mapping[str, str] | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.namespace = namespace or _read(SA_DIR / "namespace") or "default"
        self.token = token or _read(SA_DIR / "token")
        ca = ca_file or (str(SA_DIR / "ca.crt") if (SA_DIR / "ca.crt").exists() else "")
        self.ssl: Any = None
        if ca and self.api_url.startswith("https"):
            import ssl

            self.ssl = ssl.create_default_context(cafile=ca)
        self.deployments = dict(deployments or {})
        self._http: aiohttp.ClientSession | None = None

    def pending(self, module: str) -> int:
        return 0  # the Deployment's replica count is the target; Kubernetes does the rest

    def backoff(self, module: str) -> float:
        return 0.0  # Kubernetes backs off crashing pods itself (CrashLoopBackOff)

    def deployment(self, module: str) -> str:
        return self.deployments.get(module, f"marchproxy-{module}")

    def _url(self, module: str) -> str:
        return (
            f"{self.api_url}/apis/apps/v1/namespaces/{self.namespace}/deployments/"
            f"{self.deployment(module)}/scale"
        )

    async def _call(self, method: str, module: str, **kw: Any) -> dict[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))
        headers = {"Accept": "application/json", **kw.pop("headers", {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        async with self._http.request(
            method, self._url(module), headers=headers, ssl=self.ssl, **kw
        ) as r:
            body = await r.json(content_type=None)
            if r.status >= 300:
                raise ExecutorError(f"kubernetes {method} scale {module}: {r.status} {body}")
            return body  # type: ignore[no-any-return]

    async def replicas(self, module: str) -> int:
        return int((await self._call("GET", module)).get("spec", {}).get("replicas", 0))

    async def scale(self, module: str, current: int, target: int) -> str:
        body = await self._call(
            "PATCH",
            module,
            data=json.dumps({"spec": {"replicas": target}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        return f"deployment {self.deployment(module)} replicas={body['spec']['replicas']}"

    async def close(self, *, keep_instances: bool = False) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
