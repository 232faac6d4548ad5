"""Compile a service's per-request modules with mypyc, next to their sources under ROOT.

    python libs/marchproxy_common/build_native.py SERVICE ROOT [--python-executable PYTHON]

SERVICE is ``alb`` or ``dblb``. ROOT is a directory that holds ``marchproxy_SERVICE``,
``marchproxy_common`` and ``marchproxy`` (the protos): ``.native/SERVICE``, a copy of their
sources that ``make native`` makes for the tests and benchmarks, or an image's site-packages
(the ``native`` stage of services/SERVICE/Dockerfile). Python then imports each compiled
module (``proxy.cpython-311-*.so``) instead of its ``.py``, which stays beside it as the
readable source. ``--python-executable`` names the interpreter whose installed packages
type-check the imports (default: this one).

Why: the CPU these services spend per request or transaction is mostly interpreter time.
Compiled, the same typed code runs about half the instructions per ALB request and 12-16% less
CPU per DBLB transaction (benchmarks/alb/README.md, services/dblb/README.md). The sources
are unchanged Python that mypy checks strictly; mypyc turns their annotations into C types and
checks them at run time, which is why the services' tests also run against this build
(``make test``).

What compiled code does differently, and the sources avoid:
- a local name has one type in a function: two ``except ... as exc`` clauses of unrelated
  exception types need two names;
- a class deriving from some built-in exceptions (``ConnectionError``) cannot be compiled
  (``marchproxy_alb/http/errors.py`` holds the one we have, and is not compiled);
- a class attribute read through the class must be ``Final`` (or ``ClassVar``), and a class
  attribute default must be a literal;
- a dataclass builds its annotations when its module loads: each class they name must exist
  by then (not defined later in the module, not in a module that is still importing this one);
- no ``*`` unpacking inside a tuple display that is not a call argument (mypyc 2.4 crashes).
- mypyc 2.4 turns a ``bytes`` slice whose end lies before its start into a SystemError instead
  of ``b""``: guard such slices (``framing.scan_simple_response``; the Hypothesis tests of the
  framing code found that one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

#: the modules on each service's per-request path. Not the shared library's client-socket
#: transport (``marchproxy_common.net.sockets``, -8% ALB instructions more): compiled, its
#: ``SocketTransport`` (an ``asyncio.Transport``) crashed the cyclic garbage collector in about
#: half the runs of tests/alb/test_alb_tls_proxy.py.
MODULES = {
    "alb": [
        "marchproxy_alb/http/framing.py",
        "marchproxy_alb/http/downstream.py",
        "marchproxy_alb/http/upstream.py",
        "marchproxy_alb/http/flow.py",
        "marchproxy_alb/proxy.py",
        "marchproxy_alb/routing.py",
        "marchproxy_alb/balancer.py",
        "marchproxy_alb/metrics.py",
    ],
    "dblb": [
        "marchproxy_dblb/frontends/postgres.py",
        "marchproxy_dblb/pool.py",
        "marchproxy_common/wire/postgres/decoder.py",
        "marchproxy_common/wire/postgres/encoder.py",
        "marchproxy_common/wire/postgres/messages.py",
    ],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("service", choices=sorted(MODULES))
    ap.add_argument("root", type=Path)
    ap.add_argument("--python-executable", default=sys.executable)
    args = ap.parse_args()
    root = args.root.resolve()
    modules = MODULES[args.service]
    packages = [f"marchproxy_{args.service}", "marchproxy_common", "marchproxy"]
    missing = [m for m in modules if not (root / m).is_file()]
    if missing:
        ap.error(f"not under {root}: {', '.join(missing)}")
    from mypyc.build import mypycify
    from setuptools import setup

    with tempfile.TemporaryDirectory(prefix="marchproxy-native-") as tmp:
        # compiled in a copy of the packages (mypy must not see the rest of a site-packages)
        work = Path(tmp, "src")
        for package in packages:
            shutil.copytree(
                root / package, work / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        os.chdir(work)  # mypyc names modules by their paths relative to the working directory
        setup(
            name=f"marchproxy-{args.service}-native",
            ext_modules=mypycify(
                # (an image venv has no type stubs: what lacks them is typed as Any, as where
                # the stubs are missing anyway; none of it is on the per-request path)
                [
                    "--python-executable",
                    args.python_executable,
                    "--ignore-missing-imports",
                    *modules,
                ],
                opt_level="3",
                # one extension module next to the packages holds the compiled code's runtime
                group_name=f"marchproxy_{args.service}_native",
                target_dir=str(Path(tmp, "c")),
            ),
            script_args=[
                "--quiet",
                "build_ext",
                "--inplace",
                "--build-temp",
                str(Path(tmp, "build")),
                "--build-lib",
                str(Path(tmp, "build")),
            ],
        )
        for built in work.rglob("*.so"):
            shutil.copy2(built, root / built.relative_to(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
