"""Alembic support for manna_crypt. Importing this module (in env.py, and in
every revision that uses the operations) registers:

Operations
    op.create_keyring(name, rotation_period=None, if_not_exists=True)
    op.protect_column(table, column, keyring, aad_column=None, schema=None,
                      blind_index_column=None, normalization=None, bits=None)
    op.unprotect_column(table, column, schema=None)
    op.migrate_fernet(table, column, fernet_keyring, target_keyring, ...)
    op.rewrap_column(table, column, keyring, ...)
    op.encrypt_column(table, column, keyring, ...)
    op.backfill_blind_index(table, column, ...)

The four re-encryption operations commit after every batch, so each runs
in an autocommit block (`op.get_context().autocommit_block()`, entered for
you unless you are already in one): **the migration's work before it is
committed first.** Their progress NOTICEs go to the "manna_crypt" logger
(INFO) as they arrive. When the run leaves rows unconverted (recorded in
manna_crypt.reencrypt_failures) they raise manna_crypt.RowsLeftError,
unless raise_on_failure=False. They return the run id.

Autogenerate
    EncryptedText columns compare equal to the database's `text` column and
    are rendered as sa.Text(); a new EncryptedText column (or a new table
    with one) is followed by op.protect_column(...), since autogenerate
    never compares the trigger and CHECK that protect the column. An
    existing column whose protection differs from the model (keyring, AAD
    column, blind index added, changed or removed; read from
    manna_crypt.protected_columns()) gets op.protect_column, followed by
    op.backfill_blind_index when the new protection has a blind index.
    (manna_crypt._alembic_autogen)
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations

from . import RowsLeftError
from .psycopg import LOGGER_NAME, log_notice

__all__ = [
    "CreateKeyringOp",
    "ProtectColumnOp",
    "UnprotectColumnOp",
    "MigrateFernetOp",
    "RewrapColumnOp",
    "EncryptColumnOp",
    "BackfillBlindIndexOp",
    "ROWS_LEFT_SQLSTATE",
]

log = logging.getLogger(LOGGER_NAME)

# The SQLSTATE the re-encryption procedures raise after their last COMMIT
# when raise_on_failure => true and rows were left unconverted
# (data_exception, which no other manna_crypt error uses).
ROWS_LEFT_SQLSTATE = "22000"


def _regclass_text(operations: Operations, table: str, schema: Optional[str]) -> str:
    """The table as a quoted name regclass parses back to the same table."""
    prep = operations.get_context().dialect.identifier_preparer
    name = prep.quote(table)
    return f"{prep.quote_schema(schema)}.{name}" if schema else name


def _execute(operations: Operations, stmt: Any) -> Any:
    """Online: the result (for a value); offline: the SQL is written out."""
    ctx = operations.get_context()
    if ctx.as_sql:
        operations.execute(stmt)
        return None
    return operations.get_bind().execute(stmt)


# ---- create_keyring -----------------------------------------------------------


@Operations.register_operation("create_keyring")
class CreateKeyringOp(MigrateOperation):
    def __init__(self, name: str, rotation_period: Optional[str] = None, if_not_exists: bool = True):
        self.name = name
        self.rotation_period = rotation_period
        self.if_not_exists = if_not_exists

    @classmethod
    def create_keyring(cls, operations, name, rotation_period=None, if_not_exists=True):
        """manna_crypt.create_keyring(name, rotation_period); with
        if_not_exists (the default) an existing keyring is left as it is,
        so a rerun migration passes. rotation_period: an interval as text
        ('90 days') or None."""
        return operations.invoke(cls(name, rotation_period, if_not_exists))

    def reverse(self):
        raise NotImplementedError("a keyring is never dropped by a migration (its keys may still be needed)")


@Operations.implementation_for(CreateKeyringOp)
def _create_keyring(operations, op: CreateKeyringOp):
    sql = "SELECT manna_crypt.create_keyring(CAST(:name AS text), CAST(:period AS interval)"
    if op.if_not_exists:
        sql += ", if_not_exists => true"
    _execute(operations, sa.text(sql + ")").bindparams(name=op.name, period=op.rotation_period))


# ---- protect_column / unprotect_column --------------------------------------------


@Operations.register_operation("protect_column")
class ProtectColumnOp(MigrateOperation):
    def __init__(self, table_name, column_name, keyring, aad_column=None, schema=None, blind_index_column=None,
                 normalization=None, bits=None, _backfill=False, _previous=None):
        self.table_name = table_name
        self.column_name = column_name
        self.keyring = keyring
        self.aad_column = aad_column
        self.schema = schema
        self.blind_index_column = blind_index_column
        self.normalization = normalization
        self.bits = bits
        # set by autogenerate: render op.backfill_blind_index after it, and
        # the protection it replaces (for reverse()), as ProtectColumnOp args
        self._backfill = _backfill
        self._previous = _previous

    @classmethod
    def protect_column(cls, operations, table_name, column_name, keyring, aad_column=None, schema=None,
                       blind_index_column=None, normalization=None, bits=None):
        """manna_crypt.protect_column(table, column, keyring, aad_column,
        blind_index_column, normalization, bits): from now on plaintext
        written to the column is encrypted by the database, and the bytea
        blind_index_column (if given) set to its blind-index term
        (idempotent; the table's owner only). normalization and bits left
        None take the function's defaults ('none', 256)."""
        return operations.invoke(cls(table_name, column_name, keyring, aad_column, schema, blind_index_column,
                                     normalization, bits))

    def spec(self):
        """The protection as protected_columns() reports it."""
        if self.blind_index_column is None:
            return (self.keyring, self.aad_column, None, None, None)
        return (self.keyring, self.aad_column, self.blind_index_column, self.normalization or "none",
                256 if self.bits is None else self.bits)

    def reverse(self):
        if self._previous is not None:
            prev = self._previous
            return ProtectColumnOp(self.table_name, self.column_name, *prev[:2], self.schema, *prev[2:],
                                   _backfill=prev[2] is not None, _previous=self.spec())
        return UnprotectColumnOp(self.table_name, self.column_name, self.schema, self.keyring, self.aad_column,
                                 self.spec()[2:])

    def to_diff_tuple(self):
        return ("protect_column", self.schema, self.table_name, self.column_name) + self.spec()


@Operations.register_operation("unprotect_column")
class UnprotectColumnOp(MigrateOperation):
    def __init__(self, table_name, column_name, schema=None, _keyring=None, _aad_column=None,
                 _index=(None, None, None)):
        self.table_name = table_name
        self.column_name = column_name
        self.schema = schema
        # kept so that reverse() can protect it again
        self._keyring = _keyring
        self._aad_column = _aad_column
        self._index = _index

    @classmethod
    def unprotect_column(cls, operations, table_name, column_name, schema=None):
        """manna_crypt.unprotect_column(table, column): removes the
        protection (the values stay ciphertexts)."""
        return operations.invoke(cls(table_name, column_name, schema))

    def to_diff_tuple(self):
        return ("unprotect_column", self.schema, self.table_name, self.column_name)

    def reverse(self):
        if self._keyring is None:
            raise NotImplementedError("unprotect_column does not know the keyring to protect with again")
        return ProtectColumnOp(self.table_name, self.column_name, self._keyring, self._aad_column, self.schema,
                               *self._index)


@Operations.implementation_for(ProtectColumnOp)
def _protect_column(operations, op: ProtectColumnOp):
    sql = ("SELECT manna_crypt.protect_column(CAST(:tbl AS regclass), CAST(:col AS text), CAST(:keyring AS text),"
           " CAST(:aad AS text)")
    params = dict(tbl=_regclass_text(operations, op.table_name, op.schema), col=op.column_name,
                  keyring=op.keyring, aad=op.aad_column)
    # named, and only what is given: the function's defaults stay its own
    if op.blind_index_column is not None:
        sql += ", blind_index_column => CAST(:bidx AS text)"
        params["bidx"] = op.blind_index_column
        if op.normalization is not None:
            sql += ", normalization => CAST(:norm AS text)"
            params["norm"] = op.normalization
        if op.bits is not None:
            sql += ", bits => CAST(:bits AS integer)"
            params["bits"] = op.bits
    _execute(operations, sa.text(sql + ")").bindparams(**params))


@Operations.implementation_for(UnprotectColumnOp)
def _unprotect_column(operations, op: UnprotectColumnOp):
    stmt = sa.text(
        "SELECT manna_crypt.unprotect_column(CAST(:tbl AS regclass), CAST(:col AS text))"
    ).bindparams(tbl=_regclass_text(operations, op.table_name, op.schema), col=op.column_name)
    _execute(operations, stmt)


# ---- the re-encryption procedures -------------------------------------------------


class _ReencryptOp(MigrateOperation):
    procedure = ""

    def __init__(self, table_name, column_name, keyrings, batch_size=1000, aad_column=None,
                 dry_run=False, raise_on_failure=True, schema=None):
        self.table_name = table_name
        self.column_name = column_name
        self.keyrings = tuple(keyrings)
        self.batch_size = batch_size
        self.aad_column = aad_column
        self.dry_run = dry_run
        self.raise_on_failure = raise_on_failure
        self.schema = schema

    def reverse(self):
        raise NotImplementedError(f"{self.procedure} is one-way")

    def sql_args(self):
        """The CALL's arguments after the table and column, and their parameters."""
        names = [f"k{i}" for i in range(len(self.keyrings))]
        args = [f"CAST(:{n} AS text)" for n in names]
        args += ["batch_size => CAST(:bs AS integer)", "aad_column => CAST(:aad AS name)",
                 "dry_run => CAST(:dry AS boolean)"]
        return args, dict(zip(names, self.keyrings), bs=self.batch_size, aad=self.aad_column, dry=self.dry_run)


@Operations.register_operation("migrate_fernet")
class MigrateFernetOp(_ReencryptOp):
    procedure = "migrate_fernet"

    @classmethod
    def migrate_fernet(cls, operations, table_name, column_name, fernet_keyring, target_keyring,
                       batch_size=1000, aad_column=None, dry_run=False, raise_on_failure=True, schema=None):
        """CALL manna_crypt.migrate_fernet(...) in an autocommit block:
        Fernet tokens -> AES-256-GCM under target_keyring, in place. Returns
        the run id; raises RowsLeftError when rows were left (unless
        raise_on_failure=False)."""
        return operations.invoke(cls(table_name, column_name, (fernet_keyring, target_keyring), batch_size,
                                     aad_column, dry_run, raise_on_failure, schema))


@Operations.register_operation("rewrap_column")
class RewrapColumnOp(_ReencryptOp):
    procedure = "rewrap_column"

    @classmethod
    def rewrap_column(cls, operations, table_name, column_name, keyring, batch_size=1000, aad_column=None,
                      dry_run=False, raise_on_failure=True, schema=None):
        """CALL manna_crypt.rewrap_column(...) in an autocommit block: values
        under older keys of the keyring -> its active key."""
        return operations.invoke(cls(table_name, column_name, (keyring,), batch_size, aad_column, dry_run,
                                     raise_on_failure, schema))


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(_ReencryptOp):
    procedure = "encrypt_column"

    @classmethod
    def encrypt_column(cls, operations, table_name, column_name, keyring, batch_size=1000, aad_column=None,
                       dry_run=False, raise_on_failure=True, schema=None):
        """CALL manna_crypt.encrypt_column(...) in an autocommit block:
        plaintext -> ciphertext under the keyring."""
        return operations.invoke(cls(table_name, column_name, (keyring,), batch_size, aad_column, dry_run,
                                     raise_on_failure, schema))


_HAS_RAISE_PARAM = sa.text(
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
    " WHERE n.nspname = 'manna_crypt' AND p.proname = :proc AND 'raise_on_failure' = ANY (p.proargnames))"
)
_LAST_RUN = sa.text(
    "SELECT run_id, failed FROM manna_crypt.reencrypt_runs"
    " WHERE tbl = CAST(:tbl AS regclass) AND col = CAST(:col AS name) ORDER BY run_id DESC LIMIT 1"
)


def _call_sql(op: _ReencryptOp, with_raise: bool) -> Any:
    args, params = op.sql_args()
    args = ["CAST(:tbl AS regclass)", "CAST(:col AS name)"] + args
    if with_raise:
        args.append("raise_on_failure => CAST(:raise AS boolean)")
        params["raise"] = op.raise_on_failure
    sql = f"CALL manna_crypt.{op.procedure}({', '.join(args)})"
    return sa.text(sql), dict(params, col=op.column_name)


class _Notices:
    """Forwards the server's notices on the connection to logging while the
    CALL runs: psycopg 3 as they arrive, psycopg 2 after the CALL."""

    def __init__(self, bind: Any):
        self.raw = bind.connection.dbapi_connection
        self.handler = None
        self.seen = 0

    def __enter__(self):
        if hasattr(self.raw, "add_notice_handler"):  # psycopg 3
            from .psycopg import _handler

            self.handler = _handler(log)
            self.raw.add_notice_handler(self.handler)
        elif hasattr(self.raw, "notices"):  # psycopg 2
            self.seen = len(self.raw.notices)
        return self

    def __exit__(self, *exc):
        if self.handler is not None:
            self.raw.remove_notice_handler(self.handler)
        elif hasattr(self.raw, "notices"):
            for line in list(self.raw.notices)[self.seen:]:
                sev, _, msg = line.strip().partition(":")
                log_notice(log, sev, msg.strip())
        return False


def _run_reencrypt(operations, op: _ReencryptOp):
    ctx = operations.get_context()
    tbl = _regclass_text(operations, op.table_name, op.schema)
    if ctx.as_sql:
        stmt, params = _call_sql(op, True)
        with ctx.autocommit_block():
            operations.execute(stmt.bindparams(tbl=tbl, **params))
        return None
    conn = ctx.connection
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return _call_online(operations, op, tbl)
    with ctx.autocommit_block():
        return _call_online(operations, op, tbl)


def _call_online(operations, op: _ReencryptOp, tbl: str):
    bind = operations.get_bind()
    with_raise = bool(bind.execute(_HAS_RAISE_PARAM, {"proc": op.procedure}).scalar())
    stmt, params = _call_sql(op, with_raise)
    try:
        with _Notices(bind):
            result = bind.execute(stmt, dict(params, tbl=tbl))
            run_id = result.scalar() if result.returns_rows else None
    except sa.exc.DBAPIError as e:
        state = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
        if ROWS_LEFT_SQLSTATE is None or state != ROWS_LEFT_SQLSTATE:
            raise
        # raised after the run's last COMMIT: the connection is usable (autocommit)
        row = bind.execute(_LAST_RUN, {"tbl": tbl, "col": op.column_name}).first()
        run_id, failed = (row.run_id, row.failed) if row is not None else (None, None)
        raise RowsLeftError(
            f"{op.procedure} on {tbl}.{op.column_name} left {failed} row(s) unconverted "
            f"(run {run_id}; see manna_crypt.reencrypt_failures)", run_id=run_id, failed=failed) from e
    if op.dry_run or with_raise:
        return run_id
    # An extension without raise_on_failure: read the run's outcome.
    row = bind.execute(_LAST_RUN, {"tbl": tbl, "col": op.column_name}).first()
    if row is None:
        return run_id
    if op.raise_on_failure and row.failed:
        raise RowsLeftError(
            f"{op.procedure} on {tbl}.{op.column_name} left {row.failed} row(s) unconverted "
            f"(run {row.run_id}; see manna_crypt.reencrypt_failures)", run_id=row.run_id, failed=row.failed)
    return row.run_id


@Operations.register_operation("backfill_blind_index")
class BackfillBlindIndexOp(_ReencryptOp):
    procedure = "backfill_blind_index"

    @classmethod
    def backfill_blind_index(cls, operations, table_name, column_name, batch_size=1000, dry_run=False,
                             raise_on_failure=True, schema=None):
        """CALL manna_crypt.backfill_blind_index(...) in an autocommit block:
        the blind-index column of a protected column set, row by row, to
        the term under the keyring's active index key (after a blind index
        is added to a column that has rows, and after rotate_index_key).
        The keyring, AAD column, index column, normalization and bits are
        the column's protection's."""
        return operations.invoke(cls(table_name, column_name, (), batch_size, None, dry_run, raise_on_failure,
                                     schema))

    def sql_args(self):
        return (["batch_size => CAST(:bs AS integer)", "dry_run => CAST(:dry AS boolean)"],
                dict(bs=self.batch_size, dry=self.dry_run))


for _cls in (MigrateFernetOp, RewrapColumnOp, EncryptColumnOp, BackfillBlindIndexOp):
    Operations.implementation_for(_cls)(_run_reencrypt)


# The autogenerate hooks and renderers; imported last, as they use the
# operations above.
from . import _alembic_autogen  # noqa: E402,F401


