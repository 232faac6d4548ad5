"""Shared fixtures for the deploy tests: the rendered compose file and kustomize build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
K8S = DEPLOY / "k8s"
TOOL_TIMEOUT = 60.0


def find_tool(name: str, hint: str) -> str:
    """The tool's path, from the project venv first, then PATH, then .tools/bin (where
    `make bootstrap` puts uv); a missing tool fails the test."""
    venv_bin = Path(sys.executable).parent / name
    tools_bin = ROOT / ".tools" / "bin" / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if not found and tools_bin.exists():
        found = str(tools_bin)
    if not found:
        pytest.fail(f"{name} is not installed: {hint}", pytrace=False)
    return found


def run_tool(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, cwd=ROOT, check=False, **kw
    )


def compose_config(env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    exe = find_tool("docker-compose", "apt-get install docker-compose (.ci/run installs it)")
    return run_tool(
        [exe, "-f", str(COMPOSE), "--env-file", str(env_file), *extra, "config"],
        # a clean environment: variables must come from the env file, not from this shell
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    )


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """deploy/docker-compose.yml as docker-compose renders it with deploy/.env.example."""
    proc = compose_config(ENV_EXAMPLE, "--profile", "monitoring")
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    rendered = yaml.safe_load(proc.stdout)
    assert isinstance(rendered, dict)
    return rendered


@pytest.fixture(scope="session")
def k8s() -> list[dict[str, Any]]:
    """Every object `kubectl kustomize deploy/k8s` emits."""
    exe = find_tool("kubectl", "install kubectl (Kubernetes CLI) to build deploy/k8s offline")
    proc = run_tool([exe, "kustomize", str(K8S)])
    assert proc.returncode == 0, f"kubectl kustomize failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]
