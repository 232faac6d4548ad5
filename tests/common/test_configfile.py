"""Static desired-state files (``--config``), and what a module loads only when it needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from marchproxy_common.configfile import ConfigFileError, load_config_file


def test_yaml_and_json_files_load(tmp_path: Path) -> None:
    (tmp_path / "state.yaml").write_text("version: 3\nroutes:\n  - name: a\n")
    (tmp_path / "state.json").write_text('{"version": 4, "routes": []}')
    assert load_config_file(tmp_path / "state.yaml") == {"version": 3, "routes": [{"name": "a"}]}
    assert load_config_file(tmp_path / "state.json") == {"version": 4, "routes": []}


def test_empty_yaml_is_an_empty_snapshot(tmp_path: Path) -> None:
    (tmp_path / "empty.yml").write_text("")
    assert load_config_file(tmp_path / "empty.yml") == {}


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("bad.yaml", "a: [1, 2", "not valid YAML"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping"),
        ("list.json", "[1, 2]", "must hold a mapping"),
    ],
)
def test_bad_files_are_one_config_file_error(
    tmp_path: Path, name: str, text: str, needle: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigFileError, match=needle):
        load_config_file(tmp_path / name)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read config file"):
        load_config_file(tmp_path / "absent.yaml")


def test_module_runtime_loads_yaml_and_tenacity_only_when_used(tmp_path: Path) -> None:
    """Every module imported both at start even when its state came from Redis, the API or a
    JSON file and it never registered with an NLB: ~1.3 MiB of idle RSS for nothing."""
    (tmp_path / "state.json").write_text("{}")
    code = (
        "import sys\n"
        "import marchproxy_common.module.runtime\n"
        "from marchproxy_common.configfile import load_config_file\n"
        f"load_config_file({str(tmp_path / 'state.json')!r})\n"
        "print(sorted({'yaml', 'tenacity'} & set(sys.modules)))\n"
        f"load_config_file({str(tmp_path / 'state.json')!r}.replace('.json', '.yaml'))\n"
        "print('yaml' in sys.modules)\n"
    )
    (tmp_path / "state.yaml").write_text("{}")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr
