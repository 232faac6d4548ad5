"""`make run`: the whole MarchProxy stack as local processes, with demo backends.

Starts the API (SQLite, embedded defaults), the NLB with one multi-protocol listener, the ALB,
DBLB, AILB and RTMP modules, and three demo backends (an HTTP service, an OpenAI-compatible LLM
upstream and, when it is running, the local PostgreSQL). The API is seeded with one module of
each type; the data planes load that desired state from the API (long poll, or Redis when
REDIS_URL is set), register with the NLB, and a first request goes through the NLB to show that
traffic flows. Ctrl-C stops everything.

    python scripts/devstack.py            # fixed ports (printed), runs until Ctrl-C
    python scripts/devstack.py --check    # free ports, check traffic through the NLB, exit
    python scripts/devstack.py --check --port-base 20000   # ports 20000.. (the tests pick them)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
START_TIMEOUT = 60.0
APPLY_TIMEOUT = 60.0
PORT_WAIT_TIMEOUT = 70.0  # a TIME_WAIT lasts 60 s on Linux

FIXED_PORTS = {
    "api": 8000,
    "nlb_grpc": 50051,
    "nlb_admin": 8082,
    "nlb_listener": 8888,
    "alb_data": 8080,
    "alb_grpc": 50061,
    "alb_admin": 9101,
    "dblb_data": 6432,
    "dblb_grpc": 50062,
    "dblb_admin": 9102,
    "ailb_data": 4000,
    "ailb_grpc": 50063,
    "ailb_admin": 9103,
    "rtmp_data": 1935,
    "rtmp_grpc": 50064,
    "rtmp_admin": 9104,
    "demo_http": 9000,
    "demo_llm": 9001,
}
MODULES = ("alb", "dblb", "ailb", "rtmp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether a server would fail to bind 127.0.0.1:``port``: something listens there, or a
    socket without SO_REUSEADDR holds it (the fixed gRPC ports 50051.. lie in Linux's ephemeral
    range, so a client connection, or its TIME_WAIT for 60 s after heavy connection churn,
    can hold one)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as our servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def wait_ports_free(ports: dict[str, int]) -> None:
    """Fail at once when a server already listens on one of ``ports``; wait for ports that
    only a client socket holds (it ends, or its TIME_WAIT does within a minute)."""
    deadline = time.monotonic() + PORT_WAIT_TIMEOUT
    announced = False
    while True:
        served = [f"{k}={v}" for k, v in ports.items() if listening(v)]
        if served:
            raise SystemExit(f"devstack: ports already in use: {', '.join(served)}")
        held = [f"{k}={v}" for k, v in ports.items() if port_in_use(v)]
        if not held:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"devstack: ports still held by other sockets: {', '.join(held)}")
        if not announced:
            print(
                f"devstack: waiting for {', '.join(held)}: held by client sockets "
                f"(ss -tanp sport = :PORT shows them), at most {PORT_WAIT_TIMEOUT:.0f} s",
                flush=True,
            )
            announced = True
        await asyncio.sleep(1.0)


# -- demo backends (in this process) --------------------------------------------------------------


async def demo_http(request: web.Request) -> web.Response:
    body = {
        "service": "demo-http",
        "path": request.path,
        "x_forwarded_for": request.headers.get("X-Forwarded-For", ""),
        "via": request.headers.get("Via", ""),
    }
    return web.json_response(body)


async def demo_llm_chat(request: web.Request) -> web.StreamResponse:
    payload = await request.json()
    last = (payload.get("messages") or [{}])[-1].get("content", "")
    text = f"demo upstream says: you wrote {str(last)[:200]!r}"
    created = int(time.time())
    if payload.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(text.split(" ")):
            chunk = {
                "id": "chatcmpl-demo",
                "object": "chat.completion.chunk",
                "created": created,
                "model": payload.get("model", "demo"),
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": (" " if i else "") + word},
                        "finish_reason": None,
                    }
                ],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp
    words = len(text.split())
    return web.json_response(
        {
            "id": "chatcmpl-demo",
            "object": "chat.completion",
            "created": created,
            "model": payload.get("model", "demo"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": words, "total_tokens": 5 + words},
        }
    )


async def demo_llm_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "demo", "object": "model"}]})


async def start_app(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Stack:
    ports: dict[str, int]
    admin_password: str
    cluster_key: str
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            **os.environ,
            "CLUSTER_API_KEY": self.cluster_key,
            "API_URL": f"http://127.0.0.1:{self.ports['api']}",
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
            "PYTHONUNBUFFERED": "1",
            "HEARTBEAT_INTERVAL": "1",
            "HEARTBEAT_TIMEOUT": "5",
            "DRAIN_TIMEOUT": "5",
        }
        base.update(extra)
        return base

    def spawn(self, name: str, module: str, env: dict[str, str]) -> None:
        RUN_DIR.mkdir(exist_ok=True)
        log = open(RUN_DIR / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.procs.append((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (RUN_DIR / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"devstack: {name} exited with {proc.returncode}\n{tail}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_http(stack: Stack, url: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        while time.monotonic() < deadline:
            stack.check_alive()
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise SystemExit(f"devstack: {what} did not come up at {url}")


async def api_call(
    http: aiohttp.ClientSession, method: str, url: str, token: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as r:
        data = await r.json()
        if r.status >= 400 and r.status != 409:
            raise SystemExit(f"devstack: {method} {url} -> {r.status} {data}")
        return data  # type: ignore[no-any-return]


async def seed(stack: Stack) -> dict[str, int]:
    """Create the demo modules and routes through the API (idempotent: 409 means it exists)."""
    p = stack.ports
    api = f"http://127.0.0.1:{p['api']}/api/v1"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(
            f"{api}/auth/login", json={"username": "admin", "password": stack.admin_password}
        ) as r:
            if r.status != 200:
                raise SystemExit(f"devstack: cannot log in to the API: {await r.text()}")
            token = (await r.json())["access_token"]
        modules: dict[str, dict[str, Any]] = {
            "alb": {"type": "ALB", "config": {}},
            "ailb": {
                "type": "AILB",
                "config": {
                    "model_list": [
                        {
                            "model_name": "demo",
                            "provider": "openai",
                            "base_url": f"http://127.0.0.1:{p['demo_llm']}/v1",
                            "api_key": "demo",
                            "model": "demo",
                        }
                    ]
                },
            },
            "rtmp": {
                "type": "RTMP",
                "config": {"applications": [{"name": "live", "publish_open": True}]},
            },
            "dblb": {
                "type": "DBLB",
                "config": {"databases": {"*": {"host": "127.0.0.1", "port": 5432}}},
            },
        }
        ids: dict[str, int] = {}
        for name, spec in modules.items():
            body = {"name": name, "enabled": True, "version": "0.1.0", **spec}
            created = await api_call(http, "POST", f"{api}/modules", token, body)
            if "id" in created:
                ids[name] = int(created["id"])
        if "alb" not in ids:  # already seeded on an earlier run
            listing = await api_call(http, "GET", f"{api}/modules?name=alb", token, {})
            items = listing.get("items") or listing.get("data") or []
            ids.update({m["name"]: int(m["id"]) for m in items if "name" in m})
        if "alb" in ids:
            await api_call(
                http,
                "POST",
                f"{api}/modules/{ids['alb']}/routes",
                token,
                {
                    "name": "demo-http",
                    "match_rules": {"path": "/*"},
                    "backend_config": {"target": f"http://127.0.0.1:{p['demo_http']}"},
                },
            )
        if "ailb" in ids:  # HTTP with Host llm.localhost goes to the AILB through the NLB
            await api_call(
                http,
                "POST",
                f"{api}/modules/{ids['ailb']}/routes",
                token,
                {"name": "llm", "match_rules": {"host": "llm.localhost"}},
            )
        async with http.get(
            f"{api}/state/status", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            status = await r.json()
        # Versions are per component: each snapshot carries the version of its last change.
        return {c["component"]: int(c["version"]) for c in status["components"]}


async def wait_applied(stack: Stack, versions: dict[str, int]) -> None:
    deadline = time.monotonic() + APPLY_TIMEOUT
    pending = {m: f"http://127.0.0.1:{stack.ports[m + '_admin']}/status" for m in MODULES}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        while pending and time.monotonic() < deadline:
            stack.check_alive()
            for name, url in list(pending.items()):
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, KeyError):
                    async with http.get(url) as r:
                        if (await r.json())["config"]["applied_version"] >= versions[name]:
                            del pending[name]
            await asyncio.sleep(0.3)
    if pending:
        raise SystemExit(f"devstack: {sorted(pending)} did not apply their desired state")


async def wait_registered(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.ports['nlb_admin']}/status"
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        while time.monotonic() < deadline:
            stack.check_alive()
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url) as r:
                    mods = {m["module_id"] for m in (await r.json())["status"]["modules"]}
                    if set(MODULES) <= mods:
                        return
            await asyncio.sleep(0.3)
    raise SystemExit("devstack: not every module registered with the NLB")


async def demo_traffic(stack: Stack) -> dict[str, Any]:
    """One HTTP request through the NLB listener → ALB → demo backend."""
    url = f"http://127.0.0.1:{stack.ports['nlb_listener']}/hello"
    deadline = time.monotonic() + 20
    last = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return await r.json()  # type: ignore[no-any-return]
                    last = f"{r.status} {await r.text()}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            await asyncio.sleep(0.3)
    raise SystemExit(f"devstack: no answer through the NLB at {url}: {last}")


async def handed_over(stack: Stack) -> float:
    """Connections the NLB handed to the ALB (nlb_handoffs_total) rather than relayed."""
    url = f"http://127.0.0.1:{stack.ports['nlb_admin']}/metrics"
    prefix = 'nlb_handoffs_total{module="alb",result="ok"} '
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(url) as r,
    ):
        text = await r.text()
    return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))


async def demo_llm_through_nlb(stack: Stack) -> str:
    """A chat completion through the NLB (Host llm.localhost → AILB → demo upstream)."""
    url = f"http://127.0.0.1:{stack.ports['nlb_listener']}/v1/chat/completions"
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(url, json=body, headers={"Host": "llm.localhost"}) as r,
    ):
        if r.status != 200:
            raise SystemExit(f"devstack: LLM request through the NLB failed: {await r.text()}")
        return str((await r.json())["choices"][0]["message"]["content"])


def banner(stack: Stack, answer: dict[str, Any]) -> str:
    p = stack.ports
    lines = [
        "",
        "MarchProxy is running (logs in .run/). Through the NLB listener:",
        f"  curl http://127.0.0.1:{p['nlb_listener']}/hello            -> ALB -> demo backend",
        f"    answered: {json.dumps(answer)}",
        f"  psql -h 127.0.0.1 -p {p['nlb_listener']} -U postgres test    -> DBLB -> PostgreSQL",
        f"  ffmpeg -re -f lavfi -i testsrc -c:v libx264 -f flv "
        f"rtmp://127.0.0.1:{p['nlb_listener']}/live/demo",
        f"  curl http://127.0.0.1:{p['nlb_listener']}/v1/chat/completions"
        " -H 'Host: llm.localhost' -H 'content-type: application/json'"
        ' -d \'{"model":"demo","messages":[{"role":"user","content":"hi"}]}\''
        "   -> AILB -> demo LLM",
        "Operators:",
        f"  API       http://127.0.0.1:{p['api']}/api/docs  (admin / {stack.admin_password})",
        f"  NLB       http://127.0.0.1:{p['nlb_admin']}/status   gRPC 127.0.0.1:{p['nlb_grpc']}",
        f"  cluster key: {stack.cluster_key}",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def main(check: bool, port_base: int | None = None) -> int:
    if port_base is not None:
        ports = {k: port_base + i for i, k in enumerate(FIXED_PORTS)}
    elif check:
        ports = {k: free_port() for k in FIXED_PORTS}
    else:
        ports = dict(FIXED_PORTS)
    await wait_ports_free(ports)
    password = os.environ.get("MARCHPROXY_ADMIN_PASSWORD") or "marchproxy-admin"
    stack = Stack(ports, password, os.environ.get("CLUSTER_API_KEY", "marchproxy-dev-cluster-key"))
    RUN_DIR.mkdir(exist_ok=True)

    http_app = web.Application()
    http_app.router.add_route("*", "/{tail:.*}", demo_http)
    llm_app = web.Application()
    llm_app.router.add_post("/v1/chat/completions", demo_llm_chat)
    llm_app.router.add_get("/v1/models", demo_llm_models)
    stack.runners += [
        await start_app(http_app, ports["demo_http"]),
        await start_app(llm_app, ports["demo_llm"]),
    ]
    sqlite = RUN_DIR / (f"api-{secrets.token_hex(4)}.sqlite3" if check else "api.sqlite3")
    try:
        stack.spawn(
            "api",
            "marchproxy_api",
            stack.env(
                API_HOST="127.0.0.1",
                API_PORT=str(ports["api"]),
                SQLITE_PATH=str(sqlite),
                MARCHPROXY_ADMIN_PASSWORD=password,
                STATE_POLL_DEFAULT="10",
            ),
        )
        await wait_http(stack, f"http://127.0.0.1:{ports['api']}/healthz", "the API")
        versions = await seed(stack)
        listeners = f"{ports['nlb_listener']}=http,tls,postgresql,rtmp"
        stack.spawn(
            "nlb",
            "marchproxy_nlb",
            stack.env(
                NLB_GRPC_PORT=str(ports["nlb_grpc"]),
                NLB_ADMIN_PORT=str(ports["nlb_admin"]),
                NLB_LISTENERS=listeners,
            ),
        )
        await wait_http(stack, f"http://127.0.0.1:{ports['nlb_admin']}/healthz", "the NLB")
        for m in MODULES:
            # the ALB runs next to the NLB: it takes its connections over (SCM_RIGHTS), so the
            # NLB is not in the data path of HTTP traffic
            handoff = str(RUN_DIR / f"{m}-{ports[f'{m}_data']}.sock") if m == "alb" else ""
            stack.spawn(
                m,
                f"marchproxy_{m}",
                stack.env(
                    NLB_ADDR=f"127.0.0.1:{ports['nlb_grpc']}",
                    DATA_PORT=str(ports[f"{m}_data"]),
                    GRPC_PORT=str(ports[f"{m}_grpc"]),
                    ADMIN_PORT=str(ports[f"{m}_admin"]),
                    HANDOFF_PATH=handoff,
                ),
            )
        await wait_applied(stack, versions)
        await wait_registered(stack)
        answer = await demo_traffic(stack)
        print(banner(stack, answer), flush=True)
        if check:
            if answer.get("service") != "demo-http":
                raise SystemExit(f"devstack: unexpected answer {answer}")
            if not await handed_over(stack):
                raise SystemExit("devstack: the NLB relayed HTTP instead of handing it over")
            print(f"LLM through the NLB: {await demo_llm_through_nlb(stack)}", flush=True)
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            stack.check_alive()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return 0
    finally:
        stack.stop()
        for runner in stack.runners:
            await runner.cleanup()
        if check:
            sqlite.unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="free ports; verify, then exit")
    parser.add_argument(
        "--port-base",
        type=int,
        help=f"use the {len(FIXED_PORTS)} consecutive ports from this one instead",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.check, args.port_base)))
