"""Active health checks: ``GET <path>`` on every target of a pool each ``interval``.

A target turns unhealthy after ``unhealthy_threshold`` failed checks in a row and healthy again
after ``healthy_threshold`` good ones (2xx/3xx within ``timeout``).
"""

from __future__ import annotations

import asyncio

import structlog

from marchproxy_alb.balancer import BackendPool
from marchproxy_alb.metrics import AlbMetrics
from marchproxy_alb.routing import Target

log = structlog.get_logger("marchproxy.alb.health")

MAX_STATUS_LINE = 1024


async def probe(target: Target, path: str, deadline: float) -> bool:
    """One check on a fresh connection; True on a 2xx/3xx status."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(deadline):
            ssl = True if target.scheme == "https" else None
            reader, writer = await asyncio.open_connection(target.host, target.port, ssl=ssl)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                "User-Agent: marchproxy-alb-health\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readuntil(b"\n")
            parts = line[:MAX_STATUS_LINE].split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False
    finally:
        if writer is not None:
            writer.close()


async def run_health_checks(pool: BackendPool, metrics: AlbMetrics) -> None:
    hc = pool.health
    while True:
        results = await asyncio.gather(*(probe(t, hc.path, hc.timeout) for t in pool.targets))
        for target, ok in zip(pool.targets, results, strict=True):
            flipped = pool.record_health(target, ok)
            if flipped is False:
                metrics.ejections.labels(target.key, "health_check").inc()
                log.warning("alb_target_unhealthy", target=target.key)
            elif flipped is True:
                log.info("alb_target_healthy", target=target.key)
        await asyncio.sleep(hc.interval)
