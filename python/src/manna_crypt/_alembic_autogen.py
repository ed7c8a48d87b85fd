"""Alembic autogenerate for EncryptedText columns (imported by
manna_crypt.alembic, which documents it).

Autogenerate never compares triggers and CHECKs, so these hooks compare
what protects a column: the model's EncryptedText (keyring, aad,
blind_index, normalization, bits) against the database's
manna_crypt.protected_columns(). The database side is read through that
function only, never by parsing the protect trigger's arguments, whose
layout is the extension's business.
"""

from __future__ import annotations

from typing import Any, List, Optional

import sqlalchemy as sa
from alembic.autogenerate import comparators, renderers
from alembic.operations import ops

from .alembic import ProtectColumnOp, UnprotectColumnOp
from .sqlalchemy import EncryptedText

_IMPORT = "import manna_crypt.alembic  # noqa: F401  (registers op.protect_column)"


def _as_text(col: sa.Column) -> sa.Column:
    """A copy of an EncryptedText column typed sa.Text() for rendering (the
    database column is text); the model's own column is left alone."""
    copy = col._copy()
    copy.type = sa.Text()
    return copy


def _protect_op(col: sa.Column, table_name: str, schema: Optional[str], previous: Optional[tuple] = None,
                backfill: bool = False) -> ProtectColumnOp:
    typ: EncryptedText = col.type
    index: tuple = (None, None, None)
    if typ.blind_index is not None:
        index = (typ.blind_index, typ.normalization, typ.bits)
    return ProtectColumnOp(table_name, col.name, typ.keyring, typ.aad, schema, *index, _backfill=backfill,
                           _previous=previous)


@comparators.dispatch_for("schema")
def _protect_new_encrypted_columns(autogen_context, upgrade_ops, schemas):
    """Runs after Alembic's own table comparison (registered later): every
    EncryptedText column that the upgrade creates is rendered as text, and
    protected once the table's new columns exist (its blind-index column
    may come after it)."""
    new_ops = []
    for op in upgrade_ops.ops:
        new_ops.append(op)
        if isinstance(op, ops.CreateTableOp):
            enc = [c for c in op.columns if isinstance(c, sa.Column) and isinstance(c.type, EncryptedText)]
            if enc:
                op.columns = [_as_text(c) if any(c is e for e in enc) else c for c in op.columns]
                new_ops.extend(_protect_op(c, op.table_name, op.schema) for c in enc)
        elif isinstance(op, ops.ModifyTableOps):
            protects = []
            for sub in op.ops:
                if isinstance(sub, ops.AddColumnOp) and isinstance(sub.column.type, EncryptedText):
                    protects.append(_protect_op(sub.column, sub.table_name, sub.schema))
                    sub.column = _as_text(sub.column)
            op.ops.extend(protects)
    upgrade_ops.ops[:] = new_ops


_HAS_PROTECTED_COLUMNS = sa.text("SELECT to_regprocedure('manna_crypt.protected_columns()') IS NOT NULL")
_PROTECTED = sa.text(
    "SELECT p.col, p.keyring, p.aad_column, p.blind_index_column, p.normalization, p.bits"
    "  FROM manna_crypt.protected_columns() p"
    " WHERE (p.schema_name, p.table_name) = (SELECT n.nspname::text, c.relname::text"
    "   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    "  WHERE c.oid = to_regclass(:tbl))"
)


def _protect_specs(autogen_context, schema: Optional[str], tname: str) -> dict:
    """{column: (keyring, AAD column, blind-index column, normalization,
    bits)} of the table's protected columns (None where absent), as
    ProtectColumnOp.spec() spells them."""
    conn = autogen_context.connection
    if conn is None or not conn.execute(_HAS_PROTECTED_COLUMNS).scalar():
        return {}
    prep = conn.dialect.identifier_preparer
    name = f"{prep.quote_schema(schema)}.{prep.quote(tname)}" if schema else prep.quote(tname)
    return {r.col: (r.keyring, r.aad_column, r.blind_index_column, r.normalization, r.bits)
            for r in conn.execute(_PROTECTED, {"tbl": name})}


def _position(op_list: List[Any], old_index_col: Optional[str]) -> int:
    """Where a changed protection goes: before the DROP of the blind-index
    column it stops using (a write in between would find the trigger naming
    a missing column), else last."""
    for i, sub in enumerate(op_list):
        if isinstance(sub, ops.DropColumnOp) and old_index_col is not None and sub.column_name == old_index_col:
            return i
    return len(op_list)


@comparators.dispatch_for("table")
def _protect_existing_encrypted_columns(autogen_context, modify_table_ops, schema, tname, conn_table,
                                        metadata_table):
    """An EncryptedText column that exists in the database but is not
    protected there as the model says (a Text attribute turned into
    EncryptedText, another keyring or AAD column, a blind index added,
    changed or removed) gets op.protect_column; when the protection changes
    to a blind index on a column already protected, op.backfill_blind_index
    follows (its rows have no term, or terms of the old settings). The
    downgrade restores the previous protection (and backfills it). A column
    protected in SQL but mapped as Text is never unprotected by
    autogenerate."""
    if conn_table is None or metadata_table is None:
        return
    enc = [c for c in metadata_table.c if isinstance(c.type, EncryptedText) and c.name in conn_table.c]
    if not enc:
        return
    specs = _protect_specs(autogen_context, schema, tname)
    for col in enc:
        have = specs.get(col.name)
        want = _protect_op(col, tname, schema).spec()
        if have == want:
            continue
        backfill = have is not None and want[2] is not None and have[2:] != want[2:]
        op = _protect_op(col, tname, schema, previous=have, backfill=backfill)
        at = _position(modify_table_ops.ops, have[2] if have is not None and have[2] != want[2] else None)
        modify_table_ops.ops.insert(at, op)


def _fmt(*args: Any, **kw: Any) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kw.items() if v is not None]
    return ", ".join(parts)


@renderers.dispatch_for(ProtectColumnOp)
def _render_protect(autogen_context, op: ProtectColumnOp) -> List[str]:
    autogen_context.imports.add(_IMPORT)
    index = {}
    if op.blind_index_column is not None:
        # the function's defaults are left out
        index = dict(blind_index_column=op.blind_index_column,
                     normalization=None if op.normalization in (None, "none") else op.normalization,
                     bits=None if op.bits in (None, 256) else op.bits)
    args = _fmt(op.table_name, op.column_name, op.keyring, aad_column=op.aad_column, schema=op.schema, **index)
    lines = [f"op.protect_column({args})"]
    if op._backfill:
        lines.append(f"op.backfill_blind_index({_fmt(op.table_name, op.column_name, schema=op.schema)})")
    return lines


@renderers.dispatch_for(UnprotectColumnOp)
def _render_unprotect(autogen_context, op: UnprotectColumnOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return f"op.unprotect_column({_fmt(op.table_name, op.column_name, schema=op.schema)})"
