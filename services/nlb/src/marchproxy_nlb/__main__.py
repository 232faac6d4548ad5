"""``marchproxy-nlb`` / ``python -m marchproxy_nlb``: the standalone network load balancer."""

from __future__ import annotations

import argparse

from marchproxy_common.config import load_settings
from marchproxy_common.logs import configure_logging
from marchproxy_common.loop import run
from marchproxy_nlb.app import NlbApp
from marchproxy_nlb.config import NlbSettings


async def _serve(settings: NlbSettings) -> None:
    # grpc.aio binds to the loop that is running when the server is built
    await NlbApp(settings).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="marchproxy-nlb", description=__doc__)
    parser.add_argument("--config", help="static desired-state file (YAML or JSON)")
    args = parser.parse_args(argv)
    overrides = {"config_file": args.config} if args.config else {}
    settings = load_settings(NlbSettings, **overrides)
    configure_logging(settings.log_level, settings.log_format)
    run(_serve(settings))


if __name__ == "__main__":
    main()
