"""Each Dockerfile's build stage, run here without Docker: the same `uv sync` command on the
same files the Dockerfile copies (after .dockerignore), then every module of the service
imported from that venv (with the shared library's modules it uses). This catches an image that
cannot start although the development venv works: a service importing a package it does not
depend on (for example another service's), or package data a non-editable wheel leaves out."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, find_tool

pytestmark = pytest.mark.integration

SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/pyproject.toml"))
SYNC_TIMEOUT = 180.0
NATIVE_TIMEOUT = 300.0
# never part of an image (.dockerignore)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", "*.egg-info", ".pytest_cache")

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
names = sys.argv[1:]
for top in names:
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        if ".migrations" in info.name:  # alembic env.py only runs under alembic
            continue
        importlib.import_module(info.name)
for dev_only in ("pytest", "hypothesis", "ruff"):
    try:
        importlib.import_module(dev_only)
    except ImportError:
        continue
    raise SystemExit(f"dev dependency {dev_only} is in the image venv")
print("ok")
"""


def _build_stage(service: str) -> tuple[dict[str, str], list[str]]:
    """The build stage's ENV and its `uv sync` argv, read from the Dockerfile."""
    text = (ROOT / "services" / service / "Dockerfile").read_text(encoding="utf-8")
    build = text.split("\nFROM ")[1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.*?)(?<!\\)$", build, re.M | re.S):
        env |= dict(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", block))
    (sync,) = re.findall(r"^RUN (uv sync .*)$", build, re.M)
    return env, shlex.split(sync)


@pytest.mark.parametrize("service", SERVICES)
def test_image_build_stage_yields_a_complete_service_venv(service: str, tmp_path: Path) -> None:
    uv = find_tool("uv", "make bootstrap")
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "libs", src / "libs", ignore=IGNORED)
    shutil.copytree(ROOT / "services" / service, src / "services" / service, ignore=IGNORED)

    stage_env, argv = _build_stage(service)
    assert stage_env["UV_PROJECT_ENVIRONMENT"] == "/opt/venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    env |= stage_env | {
        "UV_PROJECT_ENVIRONMENT": str(venv),
        "UV_PYTHON": getattr(sys, "_base_executable", sys.executable),
        "UV_COMPILE_BYTECODE": "0",  # same result, less time; bytecode is not what we test
        "UV_LINK_MODE": "hardlink",  # uv copies when the cache is on another filesystem
        "UV_OFFLINE": "1",  # everything uv.lock pins is in the cache after `make install`
    }
    proc = subprocess.run(
        [uv, *argv[1:]],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=SYNC_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stderr[-4000:]}"
    assert (venv / "bin" / f"marchproxy-{service}").exists()
    # non-editable: the code lives in the venv, not in the build context
    shutil.rmtree(src)
    if service in NATIVE:
        _native_stage(service, venv)
    check = _image_python(venv, tmp_path, "-c", IMPORT_EVERYTHING, f"marchproxy_{service}")
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr[-4000:]
    if service in NATIVE:  # the image runs the compiled per-request modules
        kind = _image_python(venv, tmp_path, "-c", BUILD_KIND, NATIVE[service])
        assert kind.stdout.strip() == "compiled", kind.stdout + kind.stderr[-4000:]


def _image_python(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The venv's interpreter as in the image: no build context, no development venv."""
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


#: services whose image compiles modules (build_native.py), and one module it compiles
NATIVE = {"alb": "marchproxy_alb.proxy", "dblb": "marchproxy_dblb.pool"}
BUILD_KIND = (
    "import importlib, sys\n"
    "from marchproxy_common.native import build_kind\n"
    "print(build_kind(importlib.import_module(sys.argv[1])))\n"
)


def _locked_version(name: str) -> str:
    lock = (ROOT / "uv.lock").read_text(encoding="utf-8")
    m = re.search(rf'^name = "{re.escape(name)}"\nversion = "([^"]+)"', lock, re.M)
    assert m, name
    return m.group(1)


def _native_stage(service: str, venv: Path) -> None:
    """The Dockerfile's native stage, run here: its tools are the locked versions (the
    development venv's mypy and setuptools) and its command compiles in the venv."""
    text = (ROOT / "services" / service / "Dockerfile").read_text(encoding="utf-8")
    native = text.split(" AS native\n")[1].split("\nFROM ")[0]
    pins = dict(re.findall(r"\b(mypy|setuptools)==([\d.]+)", native))
    assert pins == {n: _locked_version(n) for n in ("mypy", "setuptools")}, pins
    (cmd,) = re.findall(r"^RUN /opt/native-tools/bin/python (.*?)(?<!\\)$", native, re.M | re.S)
    argv = shlex.split(cmd.replace("\\\n", " "))
    assert "COPY libs/marchproxy_common/build_native.py /tmp/build_native.py" in native
    assert argv == [
        "/tmp/build_native.py",
        service,
        "/opt/venv/lib/python3.11/site-packages",
        "--python-executable",
        "/opt/venv/bin/python",
    ], argv
    site = next((venv / "lib").glob("python3*/site-packages"))
    script = ROOT / "libs" / "marchproxy_common" / "build_native.py"
    python = str(venv / "bin" / "python")
    proc = subprocess.run(
        [sys.executable, str(script), service, str(site), "--python-executable", python],
        capture_output=True,
        text=True,
        timeout=NATIVE_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
