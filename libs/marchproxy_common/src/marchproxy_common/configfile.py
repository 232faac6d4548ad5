"""Load a static desired-state file (YAML or JSON) — the ``--config`` mode with no API at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

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
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"config file {p} is not valid YAML/JSON: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {p} must hold a mapping (a desired-state snapshot)")
    return data
