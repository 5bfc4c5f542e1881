"""work claims on jobs, the outbox, one charge per paid call

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('work_phase', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('work_attempt', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('claim_id', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('claim_expires_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table('regeneration_charges',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('regeneration_id', sa.Uuid(), nullable=False),
    sa.Column('charge_key', sa.String(length=200), nullable=False),
    sa.Column('step', sa.String(length=20), nullable=False),
    sa.Column('cost', sa.Numeric(precision=10, scale=4), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['regeneration_id'], ['clip_regenerations.id'],
                            name=op.f('fk_regeneration_charges_regeneration_id_clip_regenerations'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_regeneration_charges')),
    sa.UniqueConstraint('charge_key', name=op.f('uq_regeneration_charges_charge_key'))
    )
    op.create_index(op.f('ix_regeneration_charges_regeneration_id'), 'regeneration_charges',
                    ['regeneration_id'], unique=False)
    op.create_table('outbox_messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('queue', sa.String(length=100), nullable=False),
    sa.Column('message_id', sa.String(length=200), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_messages'))
    )
    op.create_index('ix_outbox_messages_unsent', 'outbox_messages', ['published_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_outbox_messages_unsent', table_name='outbox_messages')
    op.drop_table('outbox_messages')
    op.drop_index(op.f('ix_regeneration_charges_regeneration_id'), table_name='regeneration_charges')
    op.drop_table('regeneration_charges')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('claim_expires_at')
        batch.drop_column('claim_id')
        batch.drop_column('work_attempt')
        batch.drop_column('work_phase')
