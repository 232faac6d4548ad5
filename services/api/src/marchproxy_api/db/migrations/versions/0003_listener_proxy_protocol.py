"""nlb_listeners.proxy_protocol: PROXY v2 (default), v1 or none per listener

Listeners in front of plain TCP backends (L4_TCP passthrough) must not send a PROXY header.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("nlb_listeners") as batch:
        batch.add_column(
            sa.Column("proxy_protocol", sa.String(length=8), nullable=False, server_default="v2")
        )


def downgrade() -> None:
    with op.batch_alter_table("nlb_listeners") as batch:
        batch.drop_column("proxy_protocol")
