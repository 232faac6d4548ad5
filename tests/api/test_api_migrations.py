"""Alembic: upgrade to head, models match the migrations (no drift), downgrade to base —
on SQLite (embedded mode) and on a fresh Postgres database."""

from __future__ import annotations

import pytest
from alembic import command

from marchproxy_api.config import ApiSettings
from marchproxy_api.db.session import alembic_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_check_downgrade(backend: str, tmp_path, pg_url: str) -> None:
    if backend == "sqlite":
        url = ApiSettings(database_url="", sqlite_path=str(tmp_path / "m.sqlite3")).sqlalchemy_url
    else:
        url = ApiSettings(database_url=pg_url).sqlalchemy_url
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    command.check(cfg)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
