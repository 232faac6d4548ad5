"""``python -m marchproxy_alb [--config FILE]``: the ALB module on the shared runtime."""

from marchproxy_alb.config import AlbSettings
from marchproxy_alb.module import AlbHooks
from marchproxy_common.module.runtime import run_module_main


def main() -> None:
    run_module_main(AlbSettings, lambda settings: AlbHooks(settings, tune_gc=True))


if __name__ == "__main__":
    main()
