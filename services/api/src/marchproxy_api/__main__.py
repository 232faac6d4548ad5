"""``marchproxy-api [serve|migrate]``: run the control plane or only apply migrations."""

from __future__ import annotations

import argparse
import asyncio
import signal

import structlog
from aiohttp import web

from marchproxy_api.app import create_app
from marchproxy_api.config import ApiSettings
from marchproxy_api.db.session import make_engine, migrate
from marchproxy_common.config import load_settings
from marchproxy_common.logs import configure_logging
from marchproxy_common.loop import freeze_startup_heap, run

_log = structlog.get_logger("marchproxy.api")
SHUTDOWN_TIMEOUT = 10.0


async def serve(settings: ApiSettings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, settings.api_host, settings.api_port)
    await site.start()
    _log.info("api_listening", host=settings.api_host, port=settings.api_port)
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def migrate_only(settings: ApiSettings) -> None:
    engine = make_engine(settings.sqlalchemy_url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
    _log.info("migrations_applied")


def main() -> None:
    parser = argparse.ArgumentParser(prog="marchproxy-api")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate"))
    args = parser.parse_args()
    settings = load_settings(ApiSettings)
    configure_logging(settings.log_level, settings.log_format)
    run(migrate_only(settings) if args.command == "migrate" else serve(settings))


if __name__ == "__main__":
    main()
