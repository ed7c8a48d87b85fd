"""Re-encrypt plaid_items.access_token in place: Fernet -> AES-256-GCM.

migrate_fernet commits after every batch, so it cannot run inside the
migration's transaction: it runs in an autocommit block (which commits the
migration's work so far first). Rerunning it is safe: the keyring is
created only if missing, values already converted are skipped, and an
interrupted run resumes where it stopped.

raise_on_failure => true makes the CALL fail (SQLSTATE 22000) when rows
were left unconverted — after committing every row it could convert — so
Alembic does not record the revision: its NOTICEs are invisible here.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("SELECT manna_crypt.create_keyring('plaid_tokens', if_not_exists => true)")
    with op.get_context().autocommit_block():
        op.execute(
            "CALL manna_crypt.migrate_fernet('plaid_items', 'access_token', 'legacy_fernet', 'plaid_tokens', "
            "batch_size => 1000, aad_column => 'id', raise_on_failure => true)"
        )


def downgrade():
    # Going back to Fernet would need the plaintexts in the client again;
    # not supported.
    raise NotImplementedError("migrate_fernet is one-way")
