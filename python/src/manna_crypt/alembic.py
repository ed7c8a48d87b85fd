"""Alembic support for manna_crypt. Importing this module (in env.py, and in
every revision that uses the operations) registers:

Operations
    op.create_keyring(name, rotation_period=None, if_not_exists=True)
    op.protect_column(table, column, keyring, aad_column=None, schema=None)
    op.unprotect_column(table, column, schema=None)
    op.migrate_fernet(table, column, fernet_keyring, target_keyring, ...)
    op.rewrap_column(table, column, keyring, ...)
    op.encrypt_column(table, column, keyring, ...)

The three re-encryption operations commit after every batch, so each runs
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
    never compares the trigger and CHECK that protect the column.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import sqlalchemy as sa
from alembic.autogenerate import comparators, renderers
from alembic.operations import MigrateOperation, Operations, ops

from . import RowsLeftError
from .psycopg import LOGGER_NAME, log_notice
from .sqlalchemy import EncryptedText

__all__ = [
    "CreateKeyringOp",
    "ProtectColumnOp",
    "UnprotectColumnOp",
    "MigrateFernetOp",
    "RewrapColumnOp",
    "EncryptColumnOp",
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
    def __init__(self, table_name, column_name, keyring, aad_column=None, schema=None):
        self.table_name = table_name
        self.column_name = column_name
        self.keyring = keyring
        self.aad_column = aad_column
        self.schema = schema

    @classmethod
    def protect_column(cls, operations, table_name, column_name, keyring, aad_column=None, schema=None):
        """manna_crypt.protect_column(table, column, keyring, aad_column):
        from now on plaintext written to the column is encrypted by the
        database (idempotent; the table's owner only)."""
        return operations.invoke(cls(table_name, column_name, keyring, aad_column, schema))

    def reverse(self):
        return UnprotectColumnOp(self.table_name, self.column_name, self.schema, self.keyring, self.aad_column)

    def to_diff_tuple(self):
        return ("protect_column", self.schema, self.table_name, self.column_name, self.keyring, self.aad_column)


@Operations.register_operation("unprotect_column")
class UnprotectColumnOp(MigrateOperation):
    def __init__(self, table_name, column_name, schema=None, _keyring=None, _aad_column=None):
        self.table_name = table_name
        self.column_name = column_name
        self.schema = schema
        # kept so that reverse() can protect it again
        self._keyring = _keyring
        self._aad_column = _aad_column

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
        return ProtectColumnOp(self.table_name, self.column_name, self._keyring, self._aad_column, self.schema)


@Operations.implementation_for(ProtectColumnOp)
def _protect_column(operations, op: ProtectColumnOp):
    stmt = sa.text(
        "SELECT manna_crypt.protect_column(CAST(:tbl AS regclass), CAST(:col AS text), CAST(:keyring AS text),"
        " CAST(:aad AS text))"
    ).bindparams(
        tbl=_regclass_text(operations, op.table_name, op.schema),
        col=op.column_name,
        keyring=op.keyring,
        aad=op.aad_column,
    )
    _execute(operations, stmt)


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
    names = [f"k{i}" for i in range(len(op.keyrings))]
    args = ["CAST(:tbl AS regclass)", "CAST(:col AS name)"] + [f"CAST(:{n} AS text)" for n in names]
    args += ["batch_size => CAST(:bs AS integer)", "aad_column => CAST(:aad AS name)",
             "dry_run => CAST(:dry AS boolean)"]
    if with_raise:
        args.append("raise_on_failure => CAST(:raise AS boolean)")
    sql = f"CALL manna_crypt.{op.procedure}({', '.join(args)})"
    params = dict(zip(names, op.keyrings), col=op.column_name, bs=op.batch_size, aad=op.aad_column,
                  dry=op.dry_run)
    if with_raise:
        params["raise"] = op.raise_on_failure
    return sa.text(sql), params


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


for _cls in (MigrateFernetOp, RewrapColumnOp, EncryptColumnOp):
    Operations.implementation_for(_cls)(_run_reencrypt)


# ---- autogenerate -------------------------------------------------------------------

_IMPORT = "import manna_crypt.alembic  # noqa: F401  (registers op.protect_column)"


def _as_text(col: sa.Column) -> sa.Column:
    """A copy of an EncryptedText column typed sa.Text() for rendering (the
    database column is text); the model's own column is left alone."""
    copy = col._copy()
    copy.type = sa.Text()
    return copy


def _protect_op(col: sa.Column, table_name: str, schema: Optional[str]) -> ProtectColumnOp:
    typ: EncryptedText = col.type
    return ProtectColumnOp(table_name, col.name, typ.keyring, typ.aad, schema)


@comparators.dispatch_for("schema")
def _protect_new_encrypted_columns(autogen_context, upgrade_ops, schemas):
    """Runs after Alembic's own table comparison (registered later): every
    EncryptedText column that the upgrade creates is rendered as text and
    followed by op.protect_column."""
    new_ops = []
    for op in upgrade_ops.ops:
        new_ops.append(op)
        if isinstance(op, ops.CreateTableOp):
            enc = [c for c in op.columns if isinstance(c, sa.Column) and isinstance(c.type, EncryptedText)]
            if enc:
                op.columns = [_as_text(c) if any(c is e for e in enc) else c for c in op.columns]
                new_ops.extend(_protect_op(c, op.table_name, op.schema) for c in enc)
        elif isinstance(op, ops.ModifyTableOps):
            inner = []
            for sub in op.ops:
                if isinstance(sub, ops.AddColumnOp) and isinstance(sub.column.type, EncryptedText):
                    protect = _protect_op(sub.column, sub.table_name, sub.schema)
                    sub.column = _as_text(sub.column)
                    inner.extend([sub, protect])
                else:
                    inner.append(sub)
            op.ops = inner
    upgrade_ops.ops[:] = new_ops


_PROTECT_SPECS = sa.text(
    "SELECT t.tgargs FROM pg_catalog.pg_trigger t"
    " WHERE t.tgrelid = CAST(:tbl AS regclass) AND t.tgname = 'zz_manna_crypt_protect'"
)


def _protect_specs(autogen_context, schema: Optional[str], tname: str) -> dict:
    """{column: (keyring, aad column or None)} of the table's protected
    columns, from the arguments of its zz_manna_crypt_protect trigger
    (column, keyring, AAD column, ...; see protect_column)."""
    conn = autogen_context.connection
    if conn is None:
        return {}
    prep = conn.dialect.identifier_preparer
    name = f"{prep.quote_schema(schema)}.{prep.quote(tname)}" if schema else prep.quote(tname)
    raw = conn.execute(_PROTECT_SPECS, {"tbl": name}).scalar()
    if raw is None:
        return {}
    args = bytes(raw).split(b"\0")[:-1]
    args = [a.decode("utf-8") for a in args]
    return {args[i]: (args[i + 1], args[i + 2] or None) for i in range(0, len(args) - 2, 3)}


@comparators.dispatch_for("table")
def _protect_existing_encrypted_columns(autogen_context, modify_table_ops, schema, tname, conn_table,
                                        metadata_table):
    """An EncryptedText column that exists in the database but is not
    protected there as the model says (a Text attribute turned into
    EncryptedText, another keyring or AAD column) gets op.protect_column.
    The other way round renders nothing: a column protected in SQL but
    mapped as Text is never unprotected by autogenerate."""
    if conn_table is None or metadata_table is None:
        return
    enc = [c for c in metadata_table.c if isinstance(c.type, EncryptedText) and c.name in conn_table.c]
    if not enc:
        return
    specs = _protect_specs(autogen_context, schema, tname)
    for col in enc:
        if specs.get(col.name) != (col.type.keyring, col.type.aad):
            modify_table_ops.ops.append(_protect_op(col, tname, schema))


def _fmt(*args: Any, **kw: Any) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kw.items() if v is not None]
    return ", ".join(parts)


@renderers.dispatch_for(ProtectColumnOp)
def _render_protect(autogen_context, op: ProtectColumnOp) -> str:
    autogen_context.imports.add(_IMPORT)
    args = _fmt(op.table_name, op.column_name, op.keyring, aad_column=op.aad_column, schema=op.schema)
    return f"op.protect_column({args})"


@renderers.dispatch_for(UnprotectColumnOp)
def _render_unprotect(autogen_context, op: UnprotectColumnOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return f"op.unprotect_column({_fmt(op.table_name, op.column_name, schema=op.schema)})"
