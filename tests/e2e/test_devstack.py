"""README's first command: `make run` starts the whole stack and traffic flows through the NLB.

Runs `scripts/devstack.py --check` (the same code as `make run`, on free ports): API on SQLite,
NLB, ALB/DBLB/AILB/RTMP modules, demo backends; an HTTP request and an LLM chat completion go
through the NLB listener, then everything stops.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_make_run_stack_carries_traffic_through_the_nlb() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/devstack.py", "--check"],
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
