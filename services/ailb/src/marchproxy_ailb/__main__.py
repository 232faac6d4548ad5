"""``python -m marchproxy_ailb [--config FILE]``: the AILB module on the shared runtime."""

from marchproxy_ailb.config import AilbSettings
from marchproxy_ailb.module import AilbHooks
from marchproxy_common.module.runtime import run_module_main


def main() -> None:
    run_module_main(AilbSettings, AilbHooks)


if __name__ == "__main__":
    main()
