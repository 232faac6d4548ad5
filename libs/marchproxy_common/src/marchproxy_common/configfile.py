"""Load a static desired-state file (YAML or JSON) — the ``--config`` mode with no API at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_CONFIG_FILE_BYTES = 16 * 1024 * 1024


class ConfigFileError(ValueError):
    """The file is missing, too large, or not a YAML/JSON object."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {p}: {exc.strerror}") from None
    if size > MAX_CONFIG_FILE_BYTES:
        raise ConfigFileError(f"config file {p} is larger than {MAX_CONFIG_FILE_BYTES} bytes")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigFileError(f"config file {p} is not valid JSON: {exc}") from None
    else:
        data = _load_yaml(p, text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {p} must hold a mapping (a desired-state snapshot)")
    return data


def _load_yaml(p: Path, text: str) -> Any:
    # imported here: a service whose state comes from Redis, the API or a .json file never
    # needs PyYAML's 20 modules (~0.9 MiB resident)
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"config file {p} is not valid YAML: {exc}") from None
