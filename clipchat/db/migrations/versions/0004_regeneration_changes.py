"""a change of several clips: its clips' regenerations share a change id

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clip_regenerations') as batch:
        batch.add_column(sa.Column('change_id', sa.Uuid(), nullable=True))
    op.create_index('ix_clip_regenerations_change', 'clip_regenerations', ['change_id'])


def downgrade() -> None:
    op.drop_index('ix_clip_regenerations_change', table_name='clip_regenerations')
    with op.batch_alter_table('clip_regenerations') as batch:
        batch.drop_column('change_id')
