"""Blind indexes from the Python package against a real cluster:
EncryptedText(blind_index=...) lookups (== and in_(), normalization,
aliases and joins, refused operators), the plan of the compiled statement
(an index condition on a 20k-row table, in a custom and a generic plan),
truncated terms with collisions resolved by the recheck, lookups across rotate_index_key and
op.backfill_blind_index (with lookups running during the backfill), and
Alembic: autogenerate adding, changing and removing a blind index, up and
down, and offline SQL.

Assertion messages name ids and counts, never keys or plaintexts.
"""

import io
import sys
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import BigInteger, ForeignKey, Identity, LargeBinary, Text, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from manna_crypt.sqlalchemy import EncryptedComparisonError, EncryptedText

from conftest import HOST, PORT, connect, dsn

KEYRING = "pii"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    email: Mapped[str | None] = mapped_column(
        EncryptedText(KEYRING, aad="id", blind_index="email_bidx", normalization="email"))
    email_bidx: Mapped[bytes | None] = mapped_column(LargeBinary, index=True)
    # 8-bit terms: collisions are certain among a few hundred values
    code: Mapped[str | None] = mapped_column(
        EncryptedText(KEYRING, aad="id", blind_index="code_bidx", normalization="lower", bits=8))
    code_bidx: Mapped[bytes | None] = mapped_column(LargeBinary)


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))


def make_engine(db):
    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn(db)))


@pytest.fixture
def users(fresh_db):
    eng = make_engine(fresh_db)
    with eng.begin() as c:
        c.execute(text("SELECT manna_crypt.create_keyring(:k)"), {"k": KEYRING})
    Base.metadata.create_all(eng)
    with eng.begin() as c:
        c.execute(text("SELECT manna_crypt.protect_column('users', 'email', :k, 'id', "
                       "blind_index_column => 'email_bidx', normalization => 'email')"), {"k": KEYRING})
        c.execute(text("SELECT manna_crypt.protect_column('users', 'code', :k, 'id', "
                       "blind_index_column => 'code_bidx', normalization => 'lower', bits => 8)"), {"k": KEYRING})
    yield eng
    eng.dispose()


def ids(session, where):
    return sorted(session.scalars(select(User.id).where(where)).all())


def test_lookup_equality_normalized_aliases_joins_in(users):
    with Session(users) as s:
        s.add_all([User(email=e) for e in ("a@x.io", "b@x.io", "c@x.io", None)])
        s.commit()
        s.add(Order(user_id=2))
        s.commit()
        # normalization "email" (trim + lower) on both sides, in Rust
        assert ids(s, User.email == "  A@X.io ") == [1]
        assert ids(s, User.email == "a@x.io") == [1]
        assert ids(s, User.email == "nobody@x.io") == []
        assert s.scalars(select(User).where(User.email == "B@x.io")).one().email == "b@x.io"
        assert ids(s, User.email.in_(["A@x.io", " c@X.IO", "nobody@x.io", None])) == [1, 3]
        assert ids(s, User.email.in_([])) == []
        assert ids(s, User.email == None) == [4]  # noqa: E711
        # a bound parameter given at execution
        assert s.scalars(select(User.id).where(User.email == sa.bindparam("e")), {"e": "C@x.io"}).all() == [3]
        # an alias compares its own blind-index column; a join too
        u2 = aliased(User)
        stmt = select(User.id, u2.id).join(u2, u2.id == User.id + 1).where(u2.email == "b@x.io")
        assert "users_1.email_bidx = ANY" in str(stmt)
        assert s.execute(stmt).all() == [(1, 2)]
        joined = select(Order.id).join(User, User.id == Order.user_id).where(User.email == "B@X.IO")
        assert s.scalars(joined).all() == [1]
    # a write supplying the index column is overridden by the trigger
    with Session(users) as s:
        u = s.get(User, 1)
        u.email_bidx = b"\x00forged"
        s.commit()
        assert ids(s, User.email == "a@x.io") == [1]


def test_refused_operators_name_the_column(users):
    for expr in (
        lambda: User.email != "a@x.io",
        lambda: User.email.not_in(["a@x.io"]),
        lambda: User.email.like("a%"),
        lambda: User.email > "a",
        lambda: User.email.desc(),
        lambda: User.email.in_(select(Order.id).scalar_subquery()),
        lambda: User.email == User.code,
    ):
        with pytest.raises(EncryptedComparisonError, match="users"):
            expr()
    with pytest.raises(TypeError):
        User.email == 5
    with pytest.raises(ValueError):
        EncryptedText(KEYRING, blind_index="x_bidx", bits=12)
    with pytest.raises(ValueError):
        EncryptedText(KEYRING, normalization="email")


def explain(conn, stmt):
    compiled = stmt.compile(dialect=conn.dialect)
    rows = conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params).all()
    return "\n".join(r[0] for r in rows)


def test_compiled_lookup_is_an_index_condition(users, fresh_db):
    with connect(fresh_db) as c:
        c.execute("INSERT INTO users (email) SELECT 'user' || i || '@x.io' FROM generate_series(1, 20000) i")
        c.execute("ANALYZE users")
    with users.connect() as c:
        for stmt in (select(User.id).where(User.email == "User77@x.io"),
                     select(User.id).where(User.email.in_(["user1@x.io", "user2@x.io", "user3@x.io"]))):
            plan = explain(c, stmt)
            assert "Index Cond: (email_bidx = ANY" in plan, plan
            assert "ix_users_email_bidx" in plan, plan
            assert "Seq Scan" not in plan, plan
        # a generic plan (what a prepared statement settles on) as well
        from sqlalchemy.dialects.postgresql import asyncpg  # compiles to $1 parameters; no driver needed

        stmt = select(User.id).where(User.email.in_(["user5@x.io", "User6@x.io"]))
        numbered = stmt.compile(dialect=asyncpg.dialect())
        c.exec_driver_sql("PREPARE lookup AS " + numbered.string)
        c.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        plan = "\n".join(r[0] for r in c.exec_driver_sql("EXPLAIN EXECUTE lookup('user5@x.io', 'User6@x.io')"))
        assert "Index Cond: (email_bidx = ANY" in plan and "$1" in plan, plan
        assert sorted(r[0] for r in c.exec_driver_sql("EXECUTE lookup('user5@x.io', 'User6@x.io')")) == [5, 6]
    with Session(users) as s:
        assert ids(s, User.email == "User77@x.io") == [77]
        assert ids(s, User.email.in_(["user1@x.io", "user2@x.io", "user3@x.io"])) == [1, 2, 3]


def test_truncated_terms_collide_and_the_recheck_resolves_them(users, fresh_db):
    with connect(fresh_db) as c:
        c.execute("INSERT INTO users (code) SELECT 'code-' || i FROM generate_series(1, 300) i")
        # two codes sharing an 8-bit term
        a, b = c.execute(
            "SELECT min(id), max(id) FROM users GROUP BY code_bidx HAVING count(*) > 1 LIMIT 1").fetchone()
        shared = c.execute("SELECT count(*) FROM users WHERE code_bidx = ANY ("
                           "manna_crypt.blind_index_all(%s, 'pii', 'lower', 8))", (f"code-{a}",)).fetchone()[0]
        assert shared >= 2  # the index alone would return both
    stmt = select(User.id).where(User.code == f"CODE-{a}")
    assert "manna_crypt.blind_normalize(manna_crypt.decrypt_gcm(users.code" in str(stmt)
    with Session(users) as s:
        assert ids(s, User.code == f"CODE-{a}") == [a]
        assert ids(s, User.code == f"code-{b}") == [b]
        assert ids(s, User.code.in_([f"code-{a}", f"Code-{b}", "code-9999"])) == [a, b]
    # full-length terms need no recheck: nothing is decrypted
    assert "decrypt_gcm" not in str(select(User.id).where(User.email == "x"))


def run_backfill(db, **kw):
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    import manna_crypt.alembic  # noqa: F401

    eng = create_engine(f"postgresql+psycopg:///{db}?host={HOST}&port={PORT}")
    try:
        with eng.connect() as conn:
            ctx = MigrationContext.configure(conn)
            with ctx.begin_transaction():
                return Operations(ctx).backfill_blind_index("users", "email", **kw)
    finally:
        eng.dispose()


def test_backfill_recomputes_terms_after_a_normalization_change(users, fresh_db):
    with Session(users) as s:
        s.add(User(email=" B@x.io"))
        s.commit()
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.protect_column('users', 'email', 'pii', 'id', "
                  "blind_index_column => 'email_bidx', normalization => 'lower')")
    run_backfill(fresh_db)
    with connect(fresh_db) as c:
        found = c.execute("SELECT id FROM users WHERE email_bidx = ANY ("
                          "manna_crypt.blind_index_all(' b@X.io', 'pii', 'lower', 256))").fetchall()
    assert found == [(1,)]


def test_lookups_find_every_row_across_index_key_rotation_and_backfill(users, fresh_db):
    n = 2000
    with connect(fresh_db) as c:
        c.execute("INSERT INTO users (email) SELECT 'p' || i || '@x.io' FROM generate_series(1, %s) i", (n,))
        old_key = c.execute("SELECT DISTINCT substr(email_bidx, 2, 4) FROM users").fetchall()
        assert len(old_key) == 1
        c.execute("SELECT manna_crypt.rotate_index_key('pii')")

    def misses(session, sample):
        found = set(session.scalars(select(User.id).where(User.email.in_([f"P{i}@x.io" for i in sample]))))
        return sorted(set(sample) - found)

    with Session(users) as s:
        s.add(User(email="new@x.io"))  # under the new key
        s.commit()
        assert misses(s, range(1, n + 1)) == []
        assert ids(s, User.email == "NEW@x.io") == [n + 1]
    stop, seen, mixed = threading.Event(), [], []
    under_old = text("SELECT count(*) FROM users WHERE substr(email_bidx, 2, 4) = :k").bindparams(k=old_key[0][0])

    def lookups():
        with Session(users) as s:
            while not stop.is_set():
                seen.append(misses(s, range(1, n + 1, 7)))
                # some rows, not all, still under the old key: this lookup ran mid-backfill
                mixed.append(0 < s.execute(under_old).scalar() < n)
                s.rollback()

    t = threading.Thread(target=lookups)
    t.start()
    try:
        run = run_backfill(fresh_db, batch_size=1)  # one block per batch: ~20 commits
    finally:
        stop.set()
        t.join()
    assert isinstance(run, int)
    assert len(seen) >= 2 and all(m == [] for m in seen), [len(m) for m in seen if m]
    assert any(mixed), len(mixed)
    with connect(fresh_db) as c:
        keys = c.execute("SELECT DISTINCT substr(email_bidx, 2, 4) FROM users").fetchall()
        assert len(keys) == 1 and keys != old_key
    with Session(users) as s:
        assert misses(s, range(1, n + 1)) == []


# ---- Alembic ------------------------------------------------------------------------------------

MODELS = '''
from sqlalchemy import BigInteger, Identity, LargeBinary, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from manna_crypt.sqlalchemy import EncryptedText


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    email: Mapped[str | None] = mapped_column(EncryptedText("pii", aad="id"{index}))
{extra}'''
BIDX_COLUMN = "    email_bidx: Mapped[bytes | None] = mapped_column(LargeBinary)\n"

REV_0001 = '''
"""users with a protected email, no blind index

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op
import manna_crypt.alembic  # noqa: F401

revision = "0001"
down_revision = None


def upgrade():
    op.execute("CREATE EXTENSION IF NOT EXISTS manna_crypt")
    op.create_keyring("pii")
    op.create_table("users", sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
                    sa.Column("email", sa.Text))
    op.protect_column("users", "email", "pii", aad_column="id")
'''


def project(tmp_path, db):
    from alembic.config import Config

    from test_python_alembic import ENV_PY, SCRIPT_MAKO

    proj = tmp_path / "proj"
    (proj / "versions").mkdir(parents=True)
    (proj / "env.py").write_text(ENV_PY)
    (proj / "script.py.mako").write_text(SCRIPT_MAKO)
    (proj / "versions/0001_users.py").write_text(REV_0001)
    cfg = Config()
    cfg.set_main_option("script_location", str(proj))
    cfg.set_main_option("sqlalchemy.url", f"postgresql+psycopg:///{db}?host={HOST}&port={PORT}")
    return cfg, proj


def set_models(proj, index="", extra=""):
    (proj / "models.py").write_text(MODELS.format(index=index, extra=extra))
    for mod in ("models", "env"):
        sys.modules.pop(mod, None)


def protection(db):
    with connect(db) as c:
        return c.execute("SELECT keyring, aad_column, blind_index_column, normalization, bits "
                         "FROM manna_crypt.protected_columns() WHERE table_name = 'users'").fetchall()


def revise(cfg, rev_id):
    from alembic import command

    script = command.revision(cfg, message=rev_id, autogenerate=True, rev_id=rev_id)
    return Path(script.path).read_text()


def drop_revision(proj, rev_id):
    for f in (proj / "versions").glob(f"{rev_id}_*.py"):
        f.unlink()


def lookup(db, value):
    with connect(db) as c:
        return [r[0] for r in c.execute(
            "SELECT id FROM users WHERE email_bidx = ANY (manna_crypt.blind_index_all(%s, 'pii', 'email', 256))",
            (value,))]


@pytest.fixture
def alembic_db():
    name = "t_bidx_alembic_" + uuid.uuid4().hex[:8]
    with connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield name
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_autogenerate_adds_changes_and_removes_a_blind_index(tmp_path, alembic_db):
    from alembic import command

    cfg, proj = project(tmp_path, alembic_db)
    set_models(proj)
    command.upgrade(cfg, "head")
    with connect(alembic_db) as c:
        c.execute("INSERT INTO users (email) VALUES ('a@x.io'), ('B@x.io')")
    assert "protect_column" not in revise(cfg, "0002")  # protected as declared: no diff
    drop_revision(proj, "0002")

    # added: the column, then the protection with the index, then the backfill of existing rows
    set_models(proj, index=', blind_index="email_bidx", normalization="lower"', extra=BIDX_COLUMN)
    src = revise(cfg, "0002")
    add = src.index("op.add_column('users', sa.Column('email_bidx', sa.LargeBinary(), nullable=True))")
    protect = src.index("op.protect_column('users', 'email', 'pii', aad_column='id', "
                        "blind_index_column='email_bidx', normalization='lower')")
    backfill = src.index("op.backfill_blind_index('users', 'email')")
    assert add < protect < backfill
    # the downgrade restores the protection without the index before dropping the column
    assert src.index("op.protect_column('users', 'email', 'pii', aad_column='id')") < src.index(
        "op.drop_column('users', 'email_bidx')")
    command.upgrade(cfg, "head")
    assert protection(alembic_db) == [("pii", "id", "email_bidx", "lower", 256)]
    with connect(alembic_db) as c:
        found = c.execute("SELECT count(*) FROM users WHERE email_bidx = ANY ("
                          "manna_crypt.blind_index_all(' b@x.io', 'pii', 'lower', 256))").fetchone()[0]
        assert found == 0  # 'lower' keeps the space
        assert c.execute("SELECT id FROM users WHERE email_bidx = ANY ("
                         "manna_crypt.blind_index_all('b@x.io', 'pii', 'lower', 256))").fetchall() == [(2,)]
    assert "protect_column" not in revise(cfg, "0003")
    drop_revision(proj, "0003")

    # changed normalization: protect again and backfill; down restores 'lower' and backfills
    set_models(proj, index=', blind_index="email_bidx", normalization="email"', extra=BIDX_COLUMN)
    src = revise(cfg, "0003")
    assert "normalization='email')\n    op.backfill_blind_index('users', 'email')" in src
    assert "normalization='lower')\n    op.backfill_blind_index('users', 'email')" in src
    command.upgrade(cfg, "head")
    assert protection(alembic_db) == [("pii", "id", "email_bidx", "email", 256)]
    with connect(alembic_db) as c:
        c.execute("INSERT INTO users (email) VALUES ('D@x.io')")
    assert lookup(alembic_db, " d@X.io") == [3]
    # (rows 1 and 2 keep their 'lower' terms: test_backfill_recomputes_terms_after_a_normalization_change)
    command.downgrade(cfg, "0002")
    assert protection(alembic_db) == [("pii", "id", "email_bidx", "lower", 256)]
    command.upgrade(cfg, "head")

    # removed with its column: the protection changes before the DROP
    set_models(proj)
    src = revise(cfg, "0004")
    up = src[src.index("def upgrade"):src.index("def downgrade")]
    assert up.index("op.protect_column('users', 'email', 'pii', aad_column='id')") < up.index(
        "op.drop_column('users', 'email_bidx')")
    assert "backfill" not in up
    command.upgrade(cfg, "head")
    assert protection(alembic_db) == [("pii", "id", None, None, None)]
    with connect(alembic_db) as c:
        c.execute("INSERT INTO users (email) VALUES ('c@x.io')")  # the trigger no longer names email_bidx
    command.downgrade(cfg, "0003")
    assert protection(alembic_db) == [("pii", "id", "email_bidx", "email", 256)]
    assert lookup(alembic_db, "C@x.io") == [4]  # backfilled by the downgrade


def test_backfill_offline_sql():
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    import manna_crypt.alembic  # noqa: F401

    buf = io.StringIO()
    ctx = MigrationContext.configure(dialect_name="postgresql",
                                     opts={"as_sql": True, "output_buffer": buf, "literal_binds": True})
    op = Operations(ctx)
    op.protect_column("users", "email", "pii", aad_column="id", blind_index_column="email_bidx",
                      normalization="email", bits=64)
    op.backfill_blind_index("users", "email", batch_size=500)
    out = buf.getvalue()
    assert ("SELECT manna_crypt.protect_column(CAST('users' AS regclass), CAST('email' AS text), "
            "CAST('pii' AS text), CAST('id' AS text), blind_index_column => CAST('email_bidx' AS text), "
            "normalization => CAST('email' AS text), bits => CAST(64 AS integer))") in out
    assert ("CALL manna_crypt.backfill_blind_index(CAST('users' AS regclass), CAST('email' AS name), "
            "batch_size => CAST(500 AS integer), dry_run => CAST(false AS boolean), "
            "raise_on_failure => CAST(true AS boolean))") in out


PHONE = '''    phone: Mapped[str | None] = mapped_column(
        EncryptedText("pii", aad="id", blind_index="phone_bidx", normalization="digits", bits=64))
    phone_bidx: Mapped[bytes | None] = mapped_column(LargeBinary)
'''


def test_autogenerate_new_column_with_a_blind_index(tmp_path, alembic_db):
    """A new EncryptedText column with a blind index, its index column
    declared after it: protected once both exist, nothing to backfill."""
    from alembic import command

    cfg, proj = project(tmp_path, alembic_db)
    set_models(proj)
    command.upgrade(cfg, "head")
    set_models(proj, extra=PHONE)
    src = revise(cfg, "0002")
    up = src[src.index("def upgrade"):src.index("def downgrade")]
    assert up.index("op.add_column('users', sa.Column('phone', sa.Text()") < up.index(
        "op.add_column('users', sa.Column('phone_bidx'") < up.index(
        "op.protect_column('users', 'phone', 'pii', aad_column='id', blind_index_column='phone_bidx', "
        "normalization='digits', bits=64)")
    assert "backfill" not in up
    command.upgrade(cfg, "head")
    assert ("pii", "id", "phone_bidx", "digits", 64) in protection(alembic_db)
    with connect(alembic_db) as c:
        c.execute("INSERT INTO users (phone) VALUES ('+1 (555) 010-9999')")
        assert c.execute("SELECT id FROM users WHERE phone_bidx = ANY ("
                         "manna_crypt.blind_index_all('15550109999', 'pii', 'digits', 64))").fetchall() == [(1,)]
    assert "protect_column" not in revise(cfg, "0003")
