"""RSS per idle relayed connection: our relay vs HAProxy (mode tcp, one thread).

    uv run --frozen python benchmarks/nlb/relay_rss.py [--conns 4000]

Opens N idle client connections through each proxy to an upstream that accepts and holds them,
then reads the proxy's RSS from /proc and prints (RSS_after - RSS_before) / N and the ratio.
Keep N under (open-file limit / 2): each relayed connection uses two descriptors in the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
from pathlib import Path

from relay_bench import HERE, free_port, proc

MAX_CONNS = 20000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def hold_upstream(port: int, held: list[asyncio.StreamWriter]) -> asyncio.Server:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    return await asyncio.start_server(handler, "127.0.0.1", port, backlog=4096)


async def open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for i in range(n):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x")  # one byte, so the relay pairs and goes idle like a real session
        writers.append(w)
        if i % 200 == 199:
            await asyncio.sleep(0.01)
    return writers


async def measure(pid: int, port: int, n: int, held: list[asyncio.StreamWriter]) -> float:
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    writers = await open_idle(port, n)
    async with asyncio.timeout(60):
        while len(held) < n:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    after = rss_kib(pid)
    for w in writers:
        w.close()
    for w in held:
        w.close()
    held.clear()
    await asyncio.sleep(0.5)
    return (after - before) * 1024 / n


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=4000)
    a = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, MAX_CONNS * 3), hard))
    n = a.conns
    tmp = Path(tempfile.mkdtemp(prefix="relay-rss-"))
    results: dict[str, float] = {}
    for name in ("haproxy", "relay", "relay-uvloop"):
        up_port, port = free_port(), free_port()
        held: list[asyncio.StreamWriter] = []
        server = await hold_upstream(up_port, held)
        if name == "haproxy":
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(
                f"global\n  nbthread 1\n  maxconn {n + 100}\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n"
                f"  timeout server 600s\nlisten l\n  bind 127.0.0.1:{port}\n"
                f"  server s 127.0.0.1:{up_port}\n"
            )
            cmd = ["haproxy", "-f", str(cfg), "-db"]
        else:
            cmd = [sys.executable, str(HERE / "relay_proxy.py"), str(port), str(up_port)]
            if name == "relay-uvloop":
                cmd += ["--loop", "uvloop"]
        with proc(cmd, port) as p:
            results[name] = await measure(p.pid, port, n, held)
        server.close()
        await server.wait_closed()
        print(f"{name:14s} {results[name]:8.0f} bytes RSS per idle relayed connection", flush=True)
    base = results["haproxy"]
    for name, v in results.items():
        if name != "haproxy" and base > 0:
            print(f"  {name} / haproxy = {v / base:.2f} (lower is better)")


if __name__ == "__main__":
    asyncio.run(main())
