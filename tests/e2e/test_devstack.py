"""README's first command: `make run` starts the whole stack and traffic flows through the NLB.

Runs `scripts/devstack.py --check` (the same code as `make run`, on free ports): API on SQLite,
NLB, ALB/DBLB/AILB/RTMP modules, demo backends; an HTTP request and an LLM chat completion go
through the NLB listener, then everything stops.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port_block


def devstack_port_count() -> int:
    """len(FIXED_PORTS) of scripts/devstack.py, read without running the script."""
    tree = ast.parse((ROOT / "scripts" / "devstack.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "FIXED_PORTS":
            assert isinstance(node.value, ast.Dict)
            return len(node.value.keys)
    raise AssertionError("scripts/devstack.py has no FIXED_PORTS")


pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_make_run_stack_carries_traffic_through_the_nlb() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "scripts/devstack.py",
            "--check",
            "--port-base",
            str(free_port_block(devstack_port_count())),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"service": "demo-http"' in out.stdout
    assert '"via": "1.1 marchproxy-alb"' in out.stdout
    assert "LLM through the NLB: demo upstream says: you wrote 'hello'" in out.stdout
