"""Architecture rules, checked on the source: sans-IO stays sans-IO, pure state stays pure."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "libs/marchproxy_common/src/marchproxy_common"

# directory -> top-level modules it must never import
RULES = {
    COMMON / "wire": {"asyncio", "socket", "grpc", "structlog", "aiohttp", "selectors"},
    ROOT / "services/nlb/src/marchproxy_nlb/registry": {"grpc", "aiohttp", "asyncio", "socket"},
}


def imported_roots(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("directory", sorted(RULES), ids=lambda p: str(p.relative_to(ROOT)))
def test_forbidden_imports(directory: Path) -> None:
    banned = RULES[directory]
    files = sorted(directory.rglob("*.py"))
    assert files, f"{directory} has no Python files"
    offences = [
        f"{f.relative_to(ROOT)}:{line} imports {name}"
        for f in files
        for line, name in imported_roots(f)
        if name in banned
    ]
    assert not offences, "\n".join(offences)


def test_no_bare_create_task_outside_tasks_module() -> None:
    """Background tasks start through marchproxy_common.tasks.spawn (named, referenced)."""
    offences = []
    for src in [COMMON, *sorted((ROOT / "services").glob("*/src"))]:
        for f in src.rglob("*.py"):
            if f.name == "tasks.py" and f.parent == COMMON:
                continue
            text = f.read_text(encoding="utf-8")
            if "asyncio.create_task(" in text or "loop.create_task(" in text:
                offences.append(str(f.relative_to(ROOT)))
    assert not offences, offences
