"""an owner's jobs paged newest first: one index on (owner, created_at, id)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_owner_created_at_id', 'jobs', ['owner', 'created_at', 'id'])
    op.drop_index('ix_jobs_owner', table_name='jobs')


def downgrade() -> None:
    op.create_index('ix_jobs_owner', 'jobs', ['owner'])
    op.drop_index('ix_jobs_owner_created_at_id', table_name='jobs')
