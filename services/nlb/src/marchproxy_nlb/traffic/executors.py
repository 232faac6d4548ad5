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
import uuid
from collections.abc import Mapping, Sequence
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


class ProcessExecutor:
    name = "process"

    def __init__(
        self, commands: Mapping[str, Sequence[str]], env: Mapping[str, str] | None = None
    ) -> None:
        self.commands = {k: list(v) for k, v in commands.items()}
        self.env = dict(env or {})
        self.children: dict[str, list[asyncio.subprocess.Process]] = {}
        self.stopping: set[int] = set()

    async def scale(self, module: str, current: int, target: int) -> str:
        cmd = self.commands.get(module)
        if not cmd:
            raise ExecutorError(f"no process command configured for module {module!r}")
        alive = [p for p in self.children.get(module, []) if p.returncode is None]
        self.children[module] = alive
        mine = [p for p in alive if p.pid not in self.stopping]  # not already draining
        if target > current:
            for _ in range(target - current):
                env = {
                    **os.environ,
                    **self.env,
                    "MODULE_ID": module,
                    "INSTANCE_ID": f"{module}-{uuid.uuid4().hex[:8]}",
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
                alive.append(proc)
                spawn(self._reap(proc), name=f"reap {module} pid {proc.pid}")
            return f"started {target - current} {module} process(es)"
        stop = min(current - target, len(mine))
        for proc in reversed(mine[-stop:] if stop else []):
            self.stopping.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if stop < current - target:
            return f"stopped {stop}; the other instances were not started by this NLB"
        return f"stopping {stop} {module} process(es)"

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        self.stopping.discard(proc.pid)

    async def close(self, *, keep_instances: bool = False) -> None:
        if keep_instances:
            self.children.clear()  # they run on, registered with the NLB that took over
            return
        procs = [p for ps in self.children.values() for p in ps if p.returncode is None]
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
