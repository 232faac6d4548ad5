"""Which build of a service runs: per-request modules compiled by mypyc (the images run them;
``libs/marchproxy_common/build_native.py``) or the interpreted sources."""

from __future__ import annotations

from types import ModuleType


def build_kind(module: ModuleType) -> str:
    """``compiled`` when ``module`` (one the service's build compiles) is an extension module."""
    return "interpreted" if (module.__file__ or "").endswith(".py") else "compiled"
