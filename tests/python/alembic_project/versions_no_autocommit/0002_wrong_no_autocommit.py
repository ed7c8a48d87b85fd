"""The mistake this project's tests show: CALL migrate_fernet inside the
migration's transaction (no autocommit_block). It fails with SQLSTATE 25001
before writing anything, and the migration's transaction rolls back.

Used only by tests/python/test_migrate_safety.py, through version_locations.

Revision ID: 0002_wrong
Revises: 0001
"""
from alembic import op

revision = "0002_wrong"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("SELECT manna_crypt.create_keyring('plaid_tokens_wrong')")
    op.execute(
        "CALL manna_crypt.migrate_fernet('plaid_items', 'access_token', 'legacy_fernet', 'plaid_tokens_wrong', "
        "batch_size => 1000, aad_column => 'id')"
    )


def downgrade():
    pass
