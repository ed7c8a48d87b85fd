"""Equality on an EncryptedText column through its blind index (the SQL
side is README "Blind indexes"); used by manna_crypt.sqlalchemy.

`User.email == v` on EncryptedText("pii", aad="id", blind_index="email_bidx",
normalization="email") becomes

    users.email_bidx = ANY (manna_crypt.blind_index_all(:v, 'pii', 'email', 256))

on the FROM element the column comes from (a table, an alias, a
subquery), and `User.email.in_([a, b])` one such predicate over the
concatenated arrays,

    users.email_bidx = ANY (manna_crypt.blind_index_all(:a, ...) || manna_crypt.blind_index_all(:b, ...))

Both are index conditions of a btree index on the bytea column (one index
scan; an OR of two predicates would be a BitmapOr of two), in custom and
generic plans alike: blind_index_all() is STABLE, so it is evaluated once
per scan. It returns the value's term under every live index key, so rows
whose term is still under the previous key (during a rotation, before the
backfill reaches them) are found too.

The keyring, normalization and bits are written into the SQL as literals:
they are the column's settings, not data, and the statement reads the same
in EXPLAIN as in the README. Only the value is a bound parameter.

With bits < 256 two values may share a term (a truncated HMAC), so the
predicate adds a recheck that decrypts the candidate rows:

    AND manna_crypt.blind_normalize(<the column decrypted, as selected>, 'email')
        = manna_crypt.blind_normalize(:v, 'email')

which needs decrypt rights (manna_crypt_user) and the AAD column on the
same FROM element. At 256 bits a collision is not a practical concern and
nothing is decrypted.
"""

from __future__ import annotations

import operator
from typing import Any, List

from sqlalchemy import (ARRAY, Integer, LargeBinary, String, Text, and_, any_, cast, false, func, literal,
                        literal_column)
from sqlalchemy.exc import CompileError, InvalidRequestError
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement

__all__ = ["EncryptedComparisonError", "blind_lookup", "check_bits", "column_label", "sibling"]


class EncryptedComparisonError(InvalidRequestError, CompileError):
    """An SQL comparison on an EncryptedText column that cannot work: any
    comparison without a blind index (it could never match), anything but
    == and in_() with one. Raised when the expression is built."""


_EQ = (operator.eq, operators.eq)
_IN = (operators.in_op,)
# the full-length HMAC-SHA256; below it the lookup rechecks by decrypting
FULL_BITS = 256


def column_label(expr: Any) -> str:
    table = getattr(expr, "table", None)
    name = getattr(expr, "name", None) or "?"
    tname = getattr(table, "name", None) or getattr(table, "description", None)
    return f"{tname}.{name}" if tname else str(name)


def check_bits(bits: Any) -> int:
    """What blind_index() accepts: a multiple of 8 from 8 to 256."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (8 <= bits <= FULL_BITS) or bits % 8:
        raise ValueError(f"bits must be a multiple of 8 from 8 to 256, not {bits!r}")
    return bits


def sibling(col: Any, name: str, what: str) -> Any:
    """The column `name` of the FROM element `col` belongs to (a table, an
    alias of it, the `excluded` row of an upsert, a subquery)."""
    table = getattr(col, "table", None)
    if table is None:
        raise CompileError(
            f"EncryptedText column {column_label(col)} is used without its table, so its {what} "
            f"column {name!r} cannot be found; use it from the mapped table"
        )
    for c in table.c:
        if c.name == name or c.key == name:
            return c
    raise CompileError(
        f"EncryptedText column {column_label(col)}: its {what} column {name!r} is not a column of "
        f"{getattr(table, 'name', None) or table}; map it in the model (or select it in the same subquery)"
    )


def _sql_string(value: str) -> Any:
    """A string constant written into the SQL (quotes doubled; an E'' string
    when there is a backslash, read the same whatever
    standard_conforming_strings says)."""
    body = value.replace("'", "''")
    if "\\" in body:
        return literal_column("E'" + body.replace("\\", "\\\\") + "'", Text)
    return literal_column("'" + body + "'", Text)


def _value(typ: Any, col: Any, v: Any) -> Any:
    """A value to look up as an SQL expression of type text."""
    if hasattr(v, "__clause_element__"):  # an ORM attribute
        v = v.__clause_element__()
    if isinstance(v, str):
        # Text, not the column's type: its bind processor could encrypt (fernet=)
        return literal(v, Text())
    if isinstance(v, ColumnElement):
        if isinstance(v.type, typ.__class__):
            raise EncryptedComparisonError(
                f"cannot compare encrypted column {column_label(col)} with another encrypted column "
                f"({column_label(v)}): compare each with a value"
            )
        return v if isinstance(v.type, String) else cast(v, Text)
    raise TypeError(f"EncryptedText compares with str values, not {type(v).__name__}")


def _values(typ: Any, col: Any, op: Any, other: tuple) -> List[Any]:
    if op in _EQ:
        return [_value(typ, col, other[0])]
    seq = other[0]
    if isinstance(seq, (list, tuple, set, frozenset)):
        return [_value(typ, col, v) for v in seq if v is not None]
    raise EncryptedComparisonError(
        f"in_() on blind-indexed column {column_label(col)} takes a list of values (not a subquery "
        "or an expanding parameter): each value's term is computed in the statement"
    )


def _concat(arrays: List[Any]) -> Any:
    """a || b || c ... as a balanced tree: a long in_() list nests
    log2(n) deep, never n (SQLAlchemy's compiler and cache key recurse)."""
    if len(arrays) == 1:
        return arrays[0]
    half = len(arrays) // 2
    return _concat(arrays[:half]).op("||", return_type=ARRAY(LargeBinary))(_concat(arrays[half:]))


def blind_lookup(typ: Any, col: Any, op: Any, other: tuple) -> Any:
    """The blind-index predicate for `col <op> other`, or None when this is
    not a lookup (`== None` stays IS NULL)."""
    if len(other) != 1 or other[0] is None or op not in _EQ + _IN:
        return None
    values = _values(typ, col, op, other)
    if not values:
        return false()  # IN () matches nothing
    bidx = sibling(col, typ.blind_index, "blind-index")
    norm = _sql_string(typ.normalization)
    consts = (_sql_string(typ.keyring), norm, literal_column(str(int(typ.bits)), Integer))
    terms = _concat([func.manna_crypt.blind_index_all(v, *consts, type_=ARRAY(LargeBinary)) for v in values])
    pred = bidx == any_(terms)
    if typ.bits >= FULL_BITS:
        return pred

    def normalized(e: Any) -> Any:
        return func.manna_crypt.blind_normalize(e, norm, type_=Text)

    plain = normalized(typ.decrypt_expression(col))
    recheck = plain == normalized(values[0]) if len(values) == 1 else plain.in_([normalized(v) for v in values])
    return and_(pred, recheck)
