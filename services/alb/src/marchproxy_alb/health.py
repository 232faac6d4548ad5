"""Active health checks: ``GET <path>`` on every target of a pool each ``interval``.

A target turns unhealthy after ``unhealthy_threshold`` failed checks in a row and healthy again
after ``healthy_threshold`` good ones (2xx/3xx within ``timeout``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import structlog

from .balancer import BackendPool
from .metrics import AlbMetrics
from .routing import Target

log = structlog.get_logger("marchproxy.alb.health")

MAX_STATUS_LINE = 1024


async def probe(
    target: Target,
    path: str,
    deadline: float,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> bool:
    """One check on a fresh connection; True on a 2xx/3xx status. https:// targets are
    verified as requests are: with ``ssl_context`` (the upstream pool's) and ``server_name``."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(deadline):
            ctx: ssl.SSLContext | None = None
            if target.scheme == "https":
                ctx = ssl_context or ssl.create_default_context()
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=ctx,
                server_hostname=(server_name or target.host) if ctx is not None else None,
            )
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                "User-Agent: marchproxy-alb-health\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readuntil(b"\n")
            parts = line[:MAX_STATUS_LINE].split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    except (
        OSError,  # ssl.SSLError (a certificate that does not verify) included
        TimeoutError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ):
        return False
    finally:
        if writer is not None:
            writer.close()


async def run_health_checks(
    pool: BackendPool,
    metrics: AlbMetrics,
    *,
    ssl_context: Callable[[], ssl.SSLContext] | None = None,
    server_name: str | None = None,
) -> None:
    """Check every target each interval. ``ssl_context`` returns the upstream pool's current
    context (it changes with ``upstream.ca_file``/``tls_verify``)."""
    hc = pool.health
    while True:
        ctx = ssl_context() if ssl_context is not None else None
        results = await asyncio.gather(
            *(probe(t, hc.path, hc.timeout, ctx, server_name) for t in pool.targets)
        )
        for target, ok in zip(pool.targets, results, strict=True):
            flipped = pool.record_health(target, ok)
            if flipped is False:
                metrics.ejections.labels(target.key, "health_check").inc()
                log.warning("alb_target_unhealthy", target=target.key)
            elif flipped is True:
                log.info("alb_target_healthy", target=target.key)
        await asyncio.sleep(hc.interval)
