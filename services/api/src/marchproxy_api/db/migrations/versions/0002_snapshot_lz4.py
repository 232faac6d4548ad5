"""snapshot bodies compressed with lz4 (Postgres)

Every config write stores the changed snapshots, hundreds of KB each with 1,000 routes;
TOAST's default pglz costs ~2x the time of lz4 there. Postgres only, and only when the server
was built with lz4; a no-op elsewhere.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HAS_LZ4 = (
    "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
)


def _set(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or bind.execute(text(_HAS_LZ4)).first() is None:
        return
    op.execute(f"ALTER TABLE state_snapshots ALTER COLUMN body SET COMPRESSION {method}")


def upgrade() -> None:
    _set("lz4")


def downgrade() -> None:
    _set("pglz")
