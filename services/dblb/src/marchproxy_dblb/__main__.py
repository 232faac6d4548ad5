"""``marchproxy-dblb``: the DBLB module on the shared runtime."""

from marchproxy_common.module.runtime import run_module_main

from .config import DblbSettings
from .module import DblbHooks


def main() -> None:
    run_module_main(DblbSettings, DblbHooks)


if __name__ == "__main__":
    main()
