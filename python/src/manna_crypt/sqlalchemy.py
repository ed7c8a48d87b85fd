"""SQLAlchemy 2 column type for a column protected by
manna_crypt.protect_column(): the key never leaves the database.

    class PlaidItem(Base):
        __tablename__ = "plaid_items"
        id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
        access_token: Mapped[str] = mapped_column(EncryptedText("plaid_tokens", aad="id"))

* Reads decrypt in SQL: the column is selected as
  manna_crypt.decrypt_gcm(plaid_items.access_token, CAST(plaid_items.id AS TEXT)),
  in the same statement (joined, selectin, deferred and refresh loads alike).
* Writes send the plaintext as an ordinary bound parameter; the column's
  trigger (installed by protect_column) encrypts it under the keyring with
  the row's AAD column as associated data. No extra statement, no RETURNING:
  insertmanyvalues batches stay batches, and an identity id the server
  generates is already visible to the trigger.
* ==, !=, IN, LIKE, <, ORDER BY … on the column raise EncryptedComparisonError:
  the stored value is a ciphertext with a fresh nonce, so SQL comparisons
  can never match. IS NULL / IS NOT NULL work.
* With a blind index (`EncryptedText("pii", aad="id", blind_index="email_bidx",
  normalization="email")`, the column protected with the same
  blind_index_column and normalization), == and in_() compare the
  blind-index column of the same FROM element instead:
  users.email_bidx = ANY(manna_crypt.blind_index_all(:v, 'pii', 'email', 256)),
  an index condition on a btree index over email_bidx that also matches
  rows still under an older index key. With bits < 256 the lookup adds a
  recheck that decrypts (see manna_crypt._blind). Every other comparison
  still raises.

The AAD column is a column of the same table (smallint, integer, bigint,
text, varchar or uuid: what protect_column accepts), named by its database
name; `aad=None` means no AAD. The application role needs manna_crypt_user
(decrypt_gcm); writers need nothing of manna_crypt.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

from sqlalchemy import Text, case, cast, func, literal, null, select
from sqlalchemy.sql import operators
from sqlalchemy.types import TypeDecorator

from ._blind import EncryptedComparisonError, blind_lookup, check_bits, column_label, sibling

__all__ = ["EncryptedText", "EncryptedComparisonError", "decrypted", "health", "health_check"]


# Operators that do not look at the value and so work on a ciphertext.
_ALLOWED = {operators.is_, operators.is_not}


class _Comparator(TypeDecorator.Comparator):  # type: ignore[name-defined]
    def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
        if self.type.blind_index is not None:
            lookup = blind_lookup(self.type, self.expr, op, other)
            if lookup is not None:
                return lookup
        self._check(op, other)
        return super().operate(op, *other, **kwargs)

    def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
        self._check(op, (other,))
        return super().reverse_operate(op, other, **kwargs)

    def _check(self, op: Any, other: tuple) -> None:
        if op in _ALLOWED:
            return
        # `col == None` / `col != None` are IS [NOT] NULL
        if op in (operator.eq, operator.ne, operators.eq, operators.ne) and len(other) == 1 and other[0] is None:
            return
        name = getattr(op, "__name__", str(op))
        label = column_label(self.expr)
        if self.type.blind_index is not None:
            raise EncryptedComparisonError(
                f"cannot use {name} on encrypted column {label}: its blind index "
                f"{self.type.blind_index!r} answers equality only (== and in_() with values). Filter "
                "on another column, or compare in Python after loading; IS NULL / IS NOT NULL work."
            )
        raise EncryptedComparisonError(
            f"cannot use {name} on encrypted column {label}: it stores AES-256-GCM "
            "ciphertexts with a fresh random nonce, so SQL comparisons, ordering and pattern matching "
            "never see the plaintext. For == and in_(), give it a blind index (EncryptedText(..., "
            "blind_index=...), README \"Blind indexes\"); otherwise filter on another column, or "
            "compare in Python after loading; IS NULL / IS NOT NULL work."
        )


class EncryptedText(TypeDecorator):
    """A `text` column protected by manna_crypt.protect_column(table, column,
    keyring, aad_column): see the module docstring."""

    impl = Text
    cache_ok = True
    comparator_factory = _Comparator

    def __init__(self, keyring: str, aad: Optional[str] = None, fernet_keyring: Optional[str] = None,
                 fernet: Any = None, blind_index: Optional[str] = None, normalization: str = "none",
                 bits: int = 256) -> None:
        """keyring: the AES-GCM keyring protect_column() encrypts under (also
        what autogenerate's op.protect_column names); aad: the database name
        of the AAD column of the same table, or None.

        blind_index: the database name of the column's bytea blind-index
        column in the same table (map it in the model too), kept by the
        protect trigger (protect_column(..., blind_index_column =>,
        normalization =>, bits =>), which autogenerate renders from these
        three): == and in_() then look values up through it (module
        docstring). normalization ('none', 'lower', 'email', 'digits') and
        bits (8 to 256, a multiple of 8) must be the column's; below 256
        bits a lookup also decrypts its candidate rows to recheck them.

        For the releases of a live Fernet -> AES-256-GCM migration (README,
        "Deploy order"): fernet_keyring, the Fernet keyring holding the
        application's imported Fernet keys, makes reads open Fernet tokens
        as well as mc1 values, and a Fernet token that the column's trigger
        sealed as if it were plaintext (written by a release that still
        wrote Fernet after the column was protected) — two decryptions per
        such value, so drop it when the migration is over. fernet: an object
        with encrypt(bytes) -> bytes (cryptography's Fernet or MultiFernet)
        makes writes store Fernet tokens made in Python, as the application
        did before (the "dual read" release, before the column is protected)."""
        if not keyring:
            raise ValueError("EncryptedText needs the keyring name")
        if fernet is not None and fernet_keyring is None:
            raise ValueError("fernet= (Fernet writes) needs fernet_keyring= (Fernet reads)")
        if blind_index is None and (normalization != "none" or bits != 256):
            raise ValueError("normalization= and bits= describe a blind index: give blind_index= too")
        if blind_index is not None:
            if not blind_index or not isinstance(normalization, str) or not normalization:
                raise ValueError("blind_index= and normalization= must be non-empty names")
            check_bits(bits)
        super().__init__()
        self.keyring = keyring
        self.aad = aad
        self.fernet_keyring = fernet_keyring
        self.fernet = fernet
        self.blind_index = blind_index
        self.normalization = normalization
        self.bits = bits

    def __repr__(self) -> str:
        args = repr(self.keyring) + (f", aad={self.aad!r}" if self.aad is not None else "")
        if self.fernet_keyring is not None:
            args += f", fernet_keyring={self.fernet_keyring!r}"
        if self.blind_index is not None:
            args += f", blind_index={self.blind_index!r}, normalization={self.normalization!r}, bits={self.bits!r}"
        return f"EncryptedText({args})"

    # -- reading: decrypt in SQL -------------------------------------------------

    def aad_column(self, col: Any) -> Any:
        """The AAD column beside `col` in the same FROM element (a table, an
        alias of it, the `excluded` row of an upsert, a subquery)."""
        return sibling(col, self.aad, "AAD")

    def decrypt_expression(self, col: Any) -> Any:
        aad = None if self.aad is None else cast(self.aad_column(col), Text)
        if self.fernet_keyring is None:
            if aad is None:
                return func.manna_crypt.decrypt_gcm(col, type_=Text)
            return func.manna_crypt.decrypt_gcm(col, aad, type_=Text)
        fk = literal(self.fernet_keyring, Text)
        # decrypt_any: a Fernet token as stored, or an mc1 value. The
        # plaintext of the latter may itself be a Fernet token that the
        # column's trigger sealed (written by a release that still wrote
        # Fernet after the column was protected): opened once more.
        first = func.manna_crypt.decrypt_any(col, aad if aad is not None else cast(null(), Text), fk, type_=Text)
        return case((func.manna_crypt.value_class(first) == "fernet", func.manna_crypt.decrypt_fernet(first, fk)),
                    else_=first)

    def column_expression(self, col: Any) -> Any:
        return self.decrypt_expression(col)

    # -- writing: the plaintext, which the column's trigger encrypts ------------

    def bind_processor(self, dialect: Any) -> Any:
        # The plaintext goes to the driver as it is. Only str: SQLAlchemy's
        # psycopg dialect casts parameters (`%(p)s::VARCHAR`), which would
        # turn bytes into their hex text and store that, encrypted.
        fernet = self.fernet

        def process(value: Any) -> Any:
            if value is None:
                return None
            if not isinstance(value, str):
                raise TypeError(f"EncryptedText takes str values, not {type(value).__name__}")
            if fernet is not None:
                return fernet.encrypt(value.encode("utf-8")).decode("ascii")
            return value

        return process

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        return None  # decrypt_gcm() already returns the text

    def copy(self, **kw: Any) -> "EncryptedText":
        return EncryptedText(self.keyring, self.aad, self.fernet_keyring, self.fernet, self.blind_index,
                             self.normalization, self.bits)

    # Alembic autogenerate: the database column is plain `text` (the
    # protection is a trigger and a CHECK, which autogenerate never compares).
    def compare_against_backend(self, dialect: Any, conn_type: Any) -> Optional[bool]:
        if isinstance(conn_type, Text):
            return True
        return None


def decrypted(col: Any) -> Any:
    """The plaintext of an EncryptedText column as an SQL expression (with
    the AAD column of the same FROM element), for places where SQLAlchemy
    applies no column_expression: a value copied by UPDATE ... SET or
    INSERT ... SELECT, a GROUP BY, an expression computed in SQL:

        update(Archive).values(token=decrypted(PlaidItem.access_token))...
        select(func.length(decrypted(PlaidItem.access_token)))

    (An upsert may write `excluded.access_token` as it is: the protected
    column's trigger re-binds it to the row it lands in.)"""
    typ = getattr(col, "type", None)
    if not isinstance(typ, EncryptedText):
        raise TypeError("decrypted() takes an EncryptedText column")
    return typ.decrypt_expression(col)


def health(conn: Any) -> dict:
    """manna_crypt.psycopg.health on a SQLAlchemy Connection or Session:
    manna_crypt.health() as a dict ({"ok": ..., "root_key_state": ...})."""
    return conn.execute(select(func.manna_crypt.health())).scalar()


def health_check(conn: Any, keyring: str) -> bool:
    """manna_crypt.psycopg.health_check on a SQLAlchemy Connection or Session:
    True when this role can encrypt under `keyring` and decrypt the result."""
    probe = "manna_crypt health check"
    sealed = func.manna_crypt.encrypt_gcm(literal(probe, Text), literal(keyring, Text), literal("health", Text))
    stmt = select(func.manna_crypt.decrypt_gcm(cast(sealed, Text), literal("health", Text)) == probe)
    return bool(conn.execute(stmt).scalar())
