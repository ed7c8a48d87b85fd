"""plaid_items with Fernet-encrypted access tokens (the legacy state), and the
legacy Fernet key imported into manna_crypt.

The key is never written in a revision: it comes from `-x fernet_key=...` or
the MC_FERNET_KEY environment variable. It is passed as a bound parameter
(not in the SQL text), and the extension stores it wrapped under its root key.

Revision ID: 0001
Revises:
"""
import os

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def legacy_fernet_key():
    key = context.get_x_argument(as_dictionary=True).get("fernet_key") or os.environ.get("MC_FERNET_KEY")
    if not key:
        raise RuntimeError("pass the legacy Fernet key: -x fernet_key=... or MC_FERNET_KEY")
    return key


def upgrade():
    op.execute("CREATE EXTENSION IF NOT EXISTS manna_crypt")
    op.create_table(
        "plaid_items",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("access_token", sa.Text),
    )
    op.execute(
        sa.text("SELECT manna_crypt.import_fernet_key(:keyring, :key)").bindparams(
            keyring="legacy_fernet", key=legacy_fernet_key()
        )
    )


def downgrade():
    op.drop_table("plaid_items")
