"""Settings are read once from the environment; production refuses to start without secrets;
the event loop is selectable."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from marchproxy_common.config import DEV_CLUSTER_API_KEY, CommonSettings, ModuleSettings
from marchproxy_common.loop import run, selected_loop


def test_env_vars_of_design_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_API_KEY", "k1")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("LOG_FORMAT", "console")
    monkeypatch.setenv("HEARTBEAT_TIMEOUT", "1")
    monkeypatch.setenv("DATA_PORT", "7001")
    s = ModuleSettings()
    assert s.cluster_api_key == "k1"
    assert s.redis_url.startswith("redis://")
    assert s.log_format == "console"
    assert s.heartbeat_timeout == 1.0
    assert s.data_port == 7001
    with pytest.raises(Exception, match="frozen"):
        s.data_port = 1  # type: ignore[misc]


def test_development_has_a_default_key_and_bounds_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CLUSTER_API_KEY", raising=False)
    assert CommonSettings().effective_cluster_api_key == DEV_CLUSTER_API_KEY
    monkeypatch.setenv("HEARTBEAT_TIMEOUT", "0.1")
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        CommonSettings()


@pytest.mark.integration
def test_production_without_key_stops_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CLUSTER_API_KEY"}
    env["MARCHPROXY_ENV"] = "production"
    out = subprocess.run(
        [sys.executable, "-m", "marchproxy_nlb"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "CLUSTER_API_KEY" in lines[0]


def test_api_url_must_be_an_http_url() -> None:
    """A typo in API_URL stops start-up naming it, instead of a state client that never
    reaches the API."""
    assert CommonSettings(api_url="https://api.example:8443/x").api_url.startswith("https://")
    assert CommonSettings(api_url="").api_url == ""
    for bad in ("api:8000", "ftp://api", "http://"):
        with pytest.raises(ValueError, match="API_URL"):
            CommonSettings(api_url=bad)


def test_proxy_trusted_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every module reads PROXY_TRUSTED_SOURCES the same way: loopback by default, "*" all,
    "" nobody, and a bad entry is named."""
    assert ModuleSettings().proxy_trusted_networks() == ("127.0.0.0/8", "::1/128")
    assert ModuleSettings(proxy_trusted_sources="*").proxy_trusted_networks() is None
    assert ModuleSettings(proxy_trusted_sources="").proxy_trusted_networks() == ()
    monkeypatch.setenv("PROXY_TRUSTED_SOURCES", " 10.1.2.0/16 , fd00::/8")
    assert ModuleSettings().proxy_trusted_networks() == ("10.1.0.0/16", "fd00::/8")
    with pytest.raises(ValueError, match="not-a-cidr"):
        ModuleSettings(proxy_trusted_sources="10.0.0.0/8,not-a-cidr")


def test_loop_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.delenv("MARCHPROXY_LOOP", raising=False)
    assert selected_loop() == "asyncio"
    assert run(loop_type()).startswith("asyncio")
    monkeypatch.setenv("MARCHPROXY_LOOP", "uvloop")
    assert run(loop_type()).startswith("uvloop")
    monkeypatch.setenv("MARCHPROXY_LOOP", "tokio")
    with pytest.raises(SystemExit, match="MARCHPROXY_LOOP"):
        selected_loop()


def test_freeze_startup_heap_keeps_collecting_new_garbage() -> None:
    """What start-up left alive is frozen; cycles made afterwards are still collected."""
    code = (
        "import gc, weakref\n"
        "from marchproxy_common.loop import freeze_startup_heap\n"
        "kept = [[i] for i in range(50_000)]  # lists are tracked by the collector\n"
        "n = freeze_startup_heap()\n"
        "assert n >= 50_000 and gc.get_freeze_count() == n, n\n"
        "class Node: pass\n"
        "a, b = Node(), Node(); a.b, b.a = b, a\n"
        "ref = weakref.ref(a); del a, b\n"
        "gc.collect()\n"
        "assert ref() is None, 'a cycle made after the freeze was not collected'\n"
        "assert gc.get_freeze_count() == n\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
