"""Benchmark (scripts/bench.sh orm): SQLAlchemy ORM inserts through
manna_crypt.sqlalchemy.EncryptedText against the same model with a plain
Text column.

    bench_orm.py DSN [ROWS] [ROUNDS]

Each round, for each model in turn: a fresh table, ROWS (10,000)
`session.add()` of 51-character tokens, one `commit()` (SQLAlchemy's
insertmanyvalues sends them as INSERT ... VALUES pages of 1000 rows,
RETURNING the identity ids), timed from the first add to the end of the
commit. Best of ROUNDS (5) per model. Prints the times, rows/s, the
statements each sent, and the ratio (target <= 1.5: the crypto runs in the
database's trigger, and the ORM must not add round trips).
"""

import sys
import time
import uuid

import psycopg
from sqlalchemy import BigInteger, Identity, Text, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from manna_crypt.sqlalchemy import EncryptedText

DSN = sys.argv[1]
ROWS = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 5


class Base(DeclarativeBase):
    pass


class PlainItem(Base):
    __tablename__ = "orm_plain"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    access_token: Mapped[str] = mapped_column(Text)


class EncryptedItem(Base):
    __tablename__ = "orm_encrypted"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    access_token: Mapped[str] = mapped_column(EncryptedText("bench_orm", aad="id"))


def main():
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(DSN))
    statements = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with engine.begin() as c:
        c.execute(text("SET client_min_messages = warning"))
        c.execute(text("SELECT manna_crypt.create_keyring('bench_orm') WHERE NOT EXISTS "
                       "(SELECT FROM manna_crypt.keys WHERE keyring = 'bench_orm')"))
    tokens = ["access-sandbox-" + str(uuid.uuid4()) for _ in range(ROWS)]
    best = {}
    counts = {}
    for rnd in range(ROUNDS):
        for model in (PlainItem, EncryptedItem):
            with engine.begin() as c:
                model.__table__.drop(c, checkfirst=True)
                model.__table__.create(c)
                if model is EncryptedItem:
                    c.execute(text("SELECT manna_crypt.protect_column('orm_encrypted', 'access_token', "
                                   "'bench_orm', 'id')"))
            statements.clear()
            t0 = time.perf_counter()
            with Session(engine) as s:
                for tok in tokens:
                    s.add(model(access_token=tok))
                s.commit()
            elapsed = time.perf_counter() - t0
            best[model] = min(best.get(model, elapsed), elapsed)
            counts[model] = (sum(1 for st in statements if st.lstrip().upper().startswith("INSERT")),
                             len(statements))
        print(f"round {rnd + 1} of {ROUNDS} done", file=sys.stderr)
    # the encrypted rows really are ciphertexts that decrypt to the tokens
    with engine.connect() as c:
        ok = c.execute(text(
            "SELECT count(*) FROM orm_encrypted WHERE manna_crypt.is_encrypted(access_token) "
            "AND manna_crypt.decrypt_gcm(access_token, id::text) LIKE 'access-sandbox-%'")).scalar()
    assert ok == ROWS, f"only {ok} of {ROWS} rows are decryptable ciphertexts"
    engine.dispose()

    print(f"== orm: {ROWS} session.add() + one commit (insertmanyvalues), best of {ROUNDS} rounds ==")
    print(f"{'model':<28}{'ms (best)':>12}{'rows/s':>12}{'INSERTs':>10}{'statements':>12}")
    for model, label in ((PlainItem, "plain Text"), (EncryptedItem, "EncryptedText (protected)")):
        ins, total = counts[model]
        print(f"{label:<28}{best[model] * 1000:>12.0f}{ROWS / best[model]:>12,.0f}{ins:>10}{total:>12}")
    ratio = best[EncryptedItem] / best[PlainItem]
    same = counts[EncryptedItem] == counts[PlainItem]
    print(f"ratio EncryptedText / plain Text: {ratio:.2f} (target <= 1.5: {'yes' if ratio <= 1.5 else 'NO'}); "
          f"same statements: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
