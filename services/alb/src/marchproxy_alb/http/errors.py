"""Exceptions of the ALB's HTTP side that derive from built-in ones other than ``Exception``.

Kept out of the modules libs/marchproxy_common/build_native.py compiles: mypyc cannot compile
such classes.
"""

from __future__ import annotations


class ClientGone(ConnectionError):
    """The client connection closed or broke while we were using it."""
