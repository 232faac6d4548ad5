"""``marchproxy-rtmp``: the RTMP module on the shared runtime."""

from __future__ import annotations

from marchproxy_common.module.runtime import run_module_main
from marchproxy_rtmp.config import RtmpSettings
from marchproxy_rtmp.module import RtmpHooks


def main() -> None:
    run_module_main(RtmpSettings, RtmpHooks)


if __name__ == "__main__":
    main()
