"""manna-crypt: the Python side of the manna_crypt PostgreSQL extension.

* manna_crypt.sqlalchemy  EncryptedText, a SQLAlchemy 2 type for columns
                          protected by manna_crypt.protect_column()
* manna_crypt.alembic     op.create_keyring, op.protect_column,
                          op.migrate_fernet / op.rewrap_column /
                          op.encrypt_column, autogenerate support
* manna_crypt.psycopg     NOTICEs into logging, a health check
* manna_crypt.mc1         the mc1 format with a raw key (cryptography)

Only the lightweight names live here; import the submodules for the rest.
"""

__version__ = "0.2.0"

__all__ = ["__version__", "RowsLeftError"]


class RowsLeftError(RuntimeError):
    """A re-encryption run finished but left rows unconverted (recorded in
    manna_crypt.reencrypt_failures under `run_id`). Every other row was
    converted and committed; fix the rows and run the operation again, or
    pass raise_on_failure=False to accept them."""

    def __init__(self, message: str, run_id=None, failed=None):
        super().__init__(message)
        self.run_id = run_id
        self.failed = failed
