"""The Python package in python/ (manna-crypt) against a real cluster:

* manna_crypt.sqlalchemy.EncryptedText on a column protected by
  manna_crypt.protect_column(): ORM inserts in insertmanyvalues batches with
  identity ids (statement count equal to a plain Text model's), reads
  (joined, selectin, deferred), updates, an update of the AAD column, an
  upsert whose conflict target is not the AAD column, Session.merge, and
  the comparison guard;
* the deploy order of a live Fernet migration (README);
* manna_crypt.psycopg: NOTICEs into logging, the health check;
* manna_crypt.mc1: raw-key interop with the database both ways;
* the package built and installed from a fresh clone into a fresh venv,
  offline.

The Alembic side is in test_python_alembic.py.

Assertion messages name ids and counts, never keys or plaintexts.
"""

import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy import BigInteger, ForeignKey, Identity, Text, create_engine, event, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    deferred,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    undefer,
)

import manna_crypt
from manna_crypt import mc1
from manna_crypt.psycopg import forward_notices, health, health_check, notices_forwarded
from manna_crypt.sqlalchemy import EncryptedComparisonError, EncryptedText, decrypted
from manna_crypt.sqlalchemy import health as sa_health
from manna_crypt.sqlalchemy import health_check as sa_health_check

from conftest import connect, dsn, new_role

MC_ROOT = Path(os.environ.get("MC_ROOT") or Path(__file__).resolve().parents[2])
KEYRING = "plaid_tokens"


def token(i):
    return f"access-sandbox-{i}-{uuid.uuid4()}"


# ---- models --------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "owners"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    items: Mapped[list["Item"]] = relationship(back_populates="owner", order_by="Item.id")


class Item(Base):
    __tablename__ = "plaid_items"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    item_id: Mapped[str] = mapped_column(Text, unique=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owners.id", onupdate="CASCADE"))
    access_token: Mapped[str | None] = mapped_column(EncryptedText(KEYRING, aad="id"))
    # deferred: loaded by its own SELECT on first access
    secret_note: Mapped[str | None] = deferred(mapped_column(EncryptedText(KEYRING, aad="item_id")))
    owner: Mapped[Owner | None] = relationship(back_populates="items")


class PlainItem(Base):
    """The same shape with a plain Text column: the statement-count baseline."""

    __tablename__ = "plain_items"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    item_id: Mapped[str] = mapped_column(Text, unique=True)
    access_token: Mapped[str | None] = mapped_column(Text)


@pytest.fixture
def engine(fresh_db):
    eng = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn(fresh_db)))
    with eng.begin() as c:
        c.execute(text("SELECT manna_crypt.create_keyring(:k)"), {"k": KEYRING})
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def protected(engine, fresh_db):
    """The engine, with plaid_items' two EncryptedText columns protected."""
    with engine.begin() as c:
        for col, aad in (("access_token", "id"), ("secret_note", "item_id")):
            c.execute(
                text("SELECT manna_crypt.protect_column('plaid_items', :c, :k, :a)"),
                {"c": col, "k": KEYRING, "a": aad},
            )
    return engine


def stored(db, col="access_token", aad="id", table="plaid_items"):
    """{id: (is the stored value a ciphertext?, its plaintext opened in SQL with the row's AAD)}."""
    with connect(db) as c:
        rows = c.execute(
            f"SELECT id, manna_crypt.is_encrypted({col}), manna_crypt.decrypt_gcm({col}, {aad}::text) "
            f"FROM {table} ORDER BY id"
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


class StatementLog:
    def __init__(self, engine):
        self.statements = []
        event.listen(engine, "before_cursor_execute", self._on)

    def _on(self, conn, cursor, statement, parameters, context, executemany):
        self.statements.append(statement)

    def count(self, prefix):
        return sum(1 for s in self.statements if s.lstrip().upper().startswith(prefix))


# ---- SQLAlchemy: the read side (decrypt_gcm in SQL; works on any mc1 column) ------------


def test_reads_decrypt_in_sql_joined_selectin_deferred(engine, fresh_db):
    plain = {i: token(i) for i in range(1, 21)}
    with connect(fresh_db) as c:
        c.execute("INSERT INTO owners (name) VALUES ('o1')")
        for i, p in plain.items():
            c.execute(
                "INSERT INTO plaid_items (id, item_id, owner_id, access_token, secret_note) OVERRIDING SYSTEM VALUE "
                "VALUES (%s, %s, 1, manna_crypt.encrypt_gcm(%s, %s, %s::text), manna_crypt.encrypt_gcm(%s, %s, %s))",
                (i, f"item-{i}", p, KEYRING, i, "note " + p, KEYRING, f"item-{i}"),
            )
    log = StatementLog(engine)
    with Session(engine) as s:
        items = s.scalars(select(Item).order_by(Item.id)).all()
        assert {i.id: i.access_token for i in items} == plain
        assert log.count("SELECT") == 1
        # deferred: one more SELECT on first access, decrypted with its own AAD column
        assert items[0].secret_note == "note " + plain[1]
        assert log.count("SELECT") == 2
    for loader in (joinedload, selectinload):
        with Session(engine) as s:
            owner = s.scalars(select(Owner).options(loader(Owner.items))).unique().one()
            assert {i.id: i.access_token for i in owner.items} == plain
    with Session(engine) as s:
        got = s.scalars(select(Item).options(undefer(Item.secret_note)).where(Item.id == 2)).one()
        assert got.secret_note == "note " + plain[2]
        # a subquery: decrypted in the outer SELECT, with the subquery's AAD column
        sub = select(Item).where(Item.id <= 3).subquery()
        assert s.execute(select(sub.c.id, sub.c.access_token).order_by(sub.c.id)).all() == [
            (i, plain[i]) for i in (1, 2, 3)
        ]


def test_comparisons_raise_but_null_checks_work(engine, fresh_db):
    for expr in (
        lambda: Item.access_token == "x",
        lambda: Item.access_token != "x",
        lambda: "x" == Item.access_token,
        lambda: Item.access_token.in_(["x"]),
        lambda: Item.access_token.like("x%"),
        lambda: Item.access_token.startswith("x"),
        lambda: Item.access_token > "x",
        lambda: Item.access_token.desc(),
    ):
        with pytest.raises(EncryptedComparisonError, match="plaid_items.access_token"):
            expr()
    with connect(fresh_db) as c:
        c.execute("INSERT INTO plaid_items (item_id, access_token) VALUES ('a', NULL), "
                  "('b', manna_crypt.encrypt_gcm('t', 'plaid_tokens', '2'))")
    with Session(engine) as s:
        assert s.scalars(select(Item.item_id).where(Item.access_token == None)).all() == ["a"]  # noqa: E711
        assert s.scalars(select(Item.item_id).where(Item.access_token.is_not(None))).all() == ["b"]
        assert s.scalars(select(Item.access_token).where(Item.item_id == "b")).one() == "t"


def test_wrong_aad_is_an_error_never_a_wrong_value(engine, fresh_db):
    with connect(fresh_db) as c:
        # sealed for row 99 but stored in row 1: the AAD check refuses it
        c.execute("INSERT INTO plaid_items (id, item_id, access_token) OVERRIDING SYSTEM VALUE "
                  "VALUES (1, 'a', manna_crypt.encrypt_gcm('t', 'plaid_tokens', '99'))")
    with Session(engine) as s, pytest.raises(sa.exc.DBAPIError) as e:
        s.scalars(select(Item)).all()
    assert e.value.orig.sqlstate == "39000"


# ---- SQLAlchemy: writes through the protect_column trigger ------------------------------------


def test_orm_batched_inserts_identity_ids_same_statements_as_plain(protected, fresh_db):
    n = 2500
    plain = [token(i) for i in range(n)]
    log = StatementLog(protected)
    with Session(protected) as s:
        s.add_all(PlainItem(item_id=f"p{i}", access_token=p) for i, p in enumerate(plain))
        s.commit()
    plain_inserts, plain_total = log.count("INSERT"), len(log.statements)
    log.statements.clear()
    with Session(protected, expire_on_commit=False) as s:
        objs = [Item(item_id=f"i{i}", access_token=p) for i, p in enumerate(plain)]
        s.add_all(objs)
        s.commit()
    ids = [o.id for o in objs]  # the server-generated ids came back with the batches
    # insertmanyvalues: pages of 1000 rows, as for the plain model; nothing extra per row
    assert plain_inserts == 3
    assert log.count("INSERT") == plain_inserts
    assert len(log.statements) == plain_total
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == n
    got = stored(fresh_db)
    assert len(got) == n
    assert [i for i in ids if not got[i][0]] == []  # every stored value is a ciphertext
    want = dict(zip(ids, plain))
    assert [i for i in ids if got[i][1] != want[i]] == []  # bound to the server-generated id
    with Session(protected) as s:
        assert dict(s.execute(select(Item.id, Item.access_token)).tuples().all()) == want


def test_orm_update_and_update_of_the_aad_column(protected, fresh_db):
    with Session(protected) as s:
        item = Item(item_id="a", access_token="tok-1", secret_note="n-1")
        s.add(item)
        s.commit()
        item_id = item.id
        item.access_token = "tok-2"
        s.commit()
        assert stored(fresh_db)[item_id] == (True, "tok-2")
        assert item.access_token == "tok-2"  # expired on commit, reloaded decrypted
        # the AAD columns change, the encrypted values do not: the trigger re-seals them
        item.id = item_id + 1000
        item.item_id = "a-renamed"
        s.commit()
        assert stored(fresh_db) == {item_id + 1000: (True, "tok-2")}
        assert stored(fresh_db, "secret_note", "item_id") == {item_id + 1000: (True, "n-1")}
        assert (item.access_token, item.secret_note) == ("tok-2", "n-1")
        # both at once
        item.id, item.access_token = item_id + 2000, "tok-3"
        s.commit()
        assert stored(fresh_db) == {item_id + 2000: (True, "tok-3")}


def test_upsert_with_conflict_target_other_than_aad(protected, fresh_db):
    with Session(protected) as s:
        s.add_all([Item(item_id="a", access_token="old-a"), Item(item_id="b", access_token="old-b")])
        s.commit()
        ids = dict(s.execute(select(Item.item_id, Item.id)).tuples().all())
        # The proposed rows get new identity ids, and the INSERT trigger seals
        # their values for those ids; decrypted(excluded...) opens them so that
        # the UPDATE trigger seals them again for the row really updated.
        stmt = pg_insert(Item).values([{"item_id": "a", "access_token": "new-a"},
                                       {"item_id": "c", "access_token": "new-c"}])
        stmt = stmt.on_conflict_do_update(index_elements=["item_id"],
                                          set_={"access_token": decrypted(stmt.excluded.access_token)})
        s.execute(stmt)
        s.commit()
        got = dict(s.execute(select(Item.item_id, Item.access_token)).tuples().all())
    assert got == {"a": "new-a", "b": "old-b", "c": "new-c"}
    st = stored(fresh_db)
    assert st[ids["a"]] == (True, "new-a") and st[ids["b"]] == (True, "old-b")


def test_upsert_set_to_excluded(protected, fresh_db):
    """SET access_token = excluded.access_token hands the UPDATE trigger the
    ciphertext the INSERT trigger sealed for the proposed row's (discarded)
    id; the trigger re-binds it to the row it lands in."""
    with Session(protected) as s:
        s.add(Item(item_id="a", access_token="old-a"))
        s.commit()
        item_id = s.scalars(select(Item.id)).one()
        stmt = pg_insert(Item).values([{"item_id": "a", "access_token": "new-a"},
                                       {"item_id": "b", "access_token": "new-b"}])
        stmt = stmt.on_conflict_do_update(index_elements=["item_id"],
                                          set_={"access_token": stmt.excluded.access_token})
        s.execute(stmt)
        s.commit()
        got = dict(s.execute(select(Item.item_id, Item.access_token)).tuples().all())
    assert got == {"a": "new-a", "b": "new-b"}
    assert stored(fresh_db)[item_id] == (True, "new-a")


def test_session_merge(protected, fresh_db):
    with Session(protected) as s:
        s.add(Item(item_id="a", access_token="tok-1"))
        s.commit()
        item_id = s.scalars(select(Item.id)).one()
    log = StatementLog(protected)
    with Session(protected) as s:
        s.merge(Item(id=item_id, item_id="a", access_token="tok-1"))  # unchanged: no UPDATE
        s.commit()
    assert log.count("UPDATE") == 0
    with Session(protected) as s:
        merged = s.merge(Item(id=item_id, item_id="a", access_token="tok-2"))
        s.commit()
        assert merged.access_token == "tok-2"
    assert log.count("UPDATE") == 1
    assert stored(fresh_db)[item_id] == (True, "tok-2")


def test_uuid_aad_and_no_aad(engine, fresh_db):
    """A server-generated uuid as AAD (canonical text form, as the trigger
    binds it), and a column protected without an AAD column."""
    from sqlalchemy.dialects.postgresql import UUID

    md = sa.MetaData()
    t = sa.Table("uuid_items", md,
                 sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
                 sa.Column("tok", EncryptedText(KEYRING, aad="id")),
                 sa.Column("note", EncryptedText(KEYRING)))
    md.create_all(engine)
    with engine.begin() as c:
        c.execute(text("SELECT manna_crypt.protect_column('uuid_items', 'tok', :k, 'id')"), {"k": KEYRING})
        c.execute(text("SELECT manna_crypt.protect_column('uuid_items', 'note', :k)"), {"k": KEYRING})
        c.execute(sa.insert(t), [{"tok": f"t{i}", "note": f"n{i}"} for i in range(5)])
    with engine.connect() as c:
        assert sorted(c.execute(sa.select(t.c.tok, t.c.note)).tuples().all()) == [(f"t{i}", f"n{i}") for i in range(5)]
    with connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM uuid_items WHERE manna_crypt.decrypt_gcm(tok, id::text) LIKE 't_' "
                         "AND manna_crypt.decrypt_gcm(note) LIKE 'n_'").fetchone()[0] == 5


def test_plaintext_lookalike_and_types(protected, fresh_db):
    with Session(protected) as s:
        s.add(Item(item_id="a", access_token="mc1:not-base64!"))
        with pytest.raises(sa.exc.DBAPIError) as e:
            s.commit()
        assert e.value.orig.sqlstate == "22P02"
    with pytest.raises(sa.exc.StatementError):
        with Session(protected) as s:
            s.add(Item(item_id="b", access_token=b"bytes"))
            s.commit()


def test_deploy_order_fernet_to_gcm_with_rolling_releases(engine, fresh_db):
    """README "Deploy order": release A reads everything in SQL and still
    writes Fernet tokens made in Python; the column is protected and
    migrated while A runs (A's later writes are sealed by the trigger as if
    plaintext, and A and B still read them); release B writes plaintext;
    the repair UPDATE and a second migrate_fernet leave only mc1 values of
    the real plaintexts, which release C reads with decrypt_gcm alone."""
    key = Fernet.generate_key()
    f = Fernet(key)
    with connect(fresh_db) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("SELECT manna_crypt.import_fernet_key('legacy_fernet', %s)", (key.decode(),))
        c.execute("CREATE TABLE legacy (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tok text)")
        c.execute("INSERT INTO legacy (tok) SELECT unnest(%s::text[])",
                  ([f.encrypt(b"old-%d" % i).decode() for i in range(1, 51)],))

    def table(**kw):
        return sa.Table("legacy", sa.MetaData(), sa.Column("id", BigInteger, Identity(), primary_key=True),
                        sa.Column("tok", EncryptedText(KEYRING, aad="id", **kw)))

    a = table(fernet_keyring="legacy_fernet", fernet=f)
    b = table(fernet_keyring="legacy_fernet")
    c_ = table()
    expected = {i: f"old-{i}" for i in range(1, 51)}

    def write(t, value):
        with engine.begin() as conn:
            new_id = conn.execute(sa.insert(t).values(tok=value).returning(t.c.id)).scalar()
        expected[new_id] = value

    def read(t):
        with engine.connect() as conn:
            return dict(conn.execute(sa.select(t.c.id, t.c.tok)).tuples().all())

    write(a, "a-before-protect")  # a Fernet token, as before
    assert read(a) == expected
    with engine.begin() as conn:
        conn.execute(text("SELECT manna_crypt.protect_column('legacy', 'tok', :k, 'id')"), {"k": KEYRING})
    write(a, "a-after-protect")  # the trigger seals the Fernet token itself
    with connect(fresh_db) as conn:
        conn.execute("SET client_min_messages = warning")
        conn.execute("CALL manna_crypt.migrate_fernet('legacy', 'tok', 'legacy_fernet', %s, aad_column => 'id')",
                     (KEYRING,))
    write(a, "a-after-migrate")
    write(b, "b-plaintext")
    assert read(a) == expected and read(b) == expected
    with connect(fresh_db) as conn:
        wrapped = conn.execute(
            "SELECT count(*) FROM legacy WHERE manna_crypt.value_class(manna_crypt.decrypt_gcm(tok, id::text)) = 'fernet'"
        ).fetchone()[0]
        assert wrapped == 2
        # the repair (README): open the sealed Fernet tokens; the trigger seals their plaintexts
        conn.execute(
            "UPDATE legacy SET tok = manna_crypt.decrypt_fernet(manna_crypt.decrypt_gcm(tok, id::text), 'legacy_fernet') "
            "WHERE manna_crypt.value_class(manna_crypt.decrypt_gcm(tok, id::text)) = 'fernet'")
        conn.execute("SET client_min_messages = warning")
        conn.execute("CALL manna_crypt.migrate_fernet('legacy', 'tok', 'legacy_fernet', %s, aad_column => 'id')",
                     (KEYRING,))
        assert conn.execute("SELECT category, sum(n)::int FROM manna_crypt.column_status('legacy', 'tok') "
                            "GROUP BY 1").fetchall() == [("mc1", len(expected))]
    assert read(c_) == expected


# ---- health checks -----------------------------------------------------------------------------


def test_health_check_as_application_role(engine, fresh_db):
    with connect(fresh_db) as c:
        app = new_role(c)
        c.execute(f'GRANT manna_crypt_user TO "{app}"')
        c.execute("SELECT manna_crypt.grant_keyring_access(%s, %s, 'all')", (KEYRING, app))
        nobody = new_role(c)
    with connect(fresh_db, user=app) as c:
        h = health(c)
        assert (h["ok"], h["root_key_state"], h["version"]) == (True, "loaded", manna_crypt.__version__)
        assert health_check(c, KEYRING) is True
        with pytest.raises(psycopg.Error) as e:
            health_check(c, "no_such_keyring")
        assert e.value.sqlstate == "42704"
    with connect(fresh_db, user=nobody) as c, pytest.raises(psycopg.Error) as e:
        health_check(c, KEYRING)
    assert e.value.sqlstate == "42501"
    with engine.connect() as c:
        assert sa_health(c)["ok"] is True
        assert sa_health_check(c, KEYRING) is True
    with Session(engine) as s:
        assert sa_health_check(s, KEYRING) is True


# ---- psycopg: NOTICEs into logging ---------------------------------------------------------------


def test_notices_forwarded_to_logging(conn, caplog):
    caplog.set_level(logging.DEBUG, logger="manna_crypt")
    handler = forward_notices(conn)
    conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42 USING DETAIL = 'd', HINT = 'h'; "
                 "RAISE WARNING 'careful'; END $$")
    conn.remove_notice_handler(handler)
    conn.execute("DO $$ BEGIN RAISE NOTICE 'not forwarded'; END $$")
    recs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "manna_crypt"]
    assert recs == [
        (logging.INFO, "NOTICE: hello 42 (DETAIL: d) (HINT: h)"),
        (logging.WARNING, "WARNING: careful"),
    ]


def test_migrate_fernet_progress_reaches_logging(conn, caplog):
    key = Fernet.generate_key()
    f = Fernet(key)
    conn.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", (key.decode(),))
    conn.execute("SELECT manna_crypt.create_keyring('target')")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, tok text)")
    with conn.cursor().copy("COPY t FROM STDIN") as cp:
        for i in range(1, 301):
            cp.write_row((i, f.encrypt(b"tok-%d" % i).decode()))
    caplog.set_level(logging.INFO, logger="manna_crypt")
    with notices_forwarded(conn):
        conn.execute("CALL manna_crypt.migrate_fernet('t', 'tok', 'legacy', 'target', batch_size => 100, "
                     "aad_column => 'id')")
    msgs = [r.getMessage() for r in caplog.records if r.name == "manna_crypt"]
    assert any(" done in " in m for m in msgs), msgs  # the summary, at least
    assert all(m.startswith(("NOTICE: ", "WARNING: ", "INFO: ")) for m in msgs)
    assert not any(key.decode() in m or "tok-" in m for m in msgs)


# ---- mc1: raw-key interop ----------------------------------------------------------------------


@pytest.mark.parametrize("aad", [None, "", "42", "ctx é🔐"])
def test_mc1_interop_both_ways(conn, aad):
    key = os.urandom(32)
    for plain in ["", "access-sandbox-123", "é🔐" * 100]:
        c = mc1.mc1_encrypt(key, plain, aad)
        assert mc1.key_id(c) == 0
        assert conn.execute("SELECT manna_crypt.decrypt_gcm(%s, %s::bytea, %s)", (c, key, aad)).fetchone()[0] == plain
        back = conn.execute("SELECT manna_crypt.encrypt_gcm(%s, %s::bytea, %s)::text", (plain, key, aad)).fetchone()[0]
        assert mc1.mc1_decrypt(key, back, aad) == plain
        env = conn.execute("SELECT manna_crypt.encrypt_gcm(%s::bytea, %s::bytea, %s)",
                           (plain.encode(), key, aad)).fetchone()[0]
        assert mc1.mc1_decrypt_bytes(key, env, aad) == plain.encode()
        assert conn.execute("SELECT manna_crypt.decrypt_gcm(%s::bytea, %s::bytea, %s)",
                            (mc1.mc1_encrypt_bytes(key, plain, aad), key, aad)).fetchone()[0] == plain.encode()


def test_mc1_errors(conn):
    key = os.urandom(32)
    c = mc1.mc1_encrypt(key, "x", "1")
    with pytest.raises(mc1.DecryptionFailed):
        mc1.mc1_decrypt(key, c, "2")
    with pytest.raises(mc1.DecryptionFailed):
        mc1.mc1_decrypt(os.urandom(32), c, "1")
    for bad in ["x", "mc1:@@", "mc1:" + "AAAA" * 3, "mc1:" + "Ag" + "A" * 58 + "=="]:
        with pytest.raises(mc1.MalformedCiphertext):
            mc1.mc1_decrypt(key, bad)
    with pytest.raises(ValueError, match="32 bytes"):
        mc1.mc1_encrypt(b"short", "x")
    # a keyring value names its key id; the database reads it the same way
    kc = conn.execute("SELECT manna_crypt.create_keyring('k'), manna_crypt.encrypt_gcm('x', 'k')::text").fetchone()
    assert mc1.key_id(kc[1]) == kc[0]


# ---- the package from a fresh clone --------------------------------------------------------------


def test_package_installs_from_fresh_clone(tmp_path):
    """`pip install ./python` in a fresh clone into a fresh venv, offline:
    the build backend and SQLAlchemy come from target/wheelhouse
    (scripts/common.sh ensure_venv), nothing from the network."""
    wheelhouse = MC_ROOT / "target" / "wheelhouse"
    assert (wheelhouse / ".done").exists(), "no target/wheelhouse: run the tests with scripts/test.sh"
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(MC_ROOT), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(clone / "python")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    check = textwrap.dedent('''
        import manna_crypt, manna_crypt.sqlalchemy, importlib.util, sys
        from sqlalchemy import BigInteger, Column, MetaData, Table, select
        from sqlalchemy.dialects import postgresql
        assert manna_crypt.__version__ == "0.2.0"
        assert manna_crypt.__file__.startswith(sys.prefix), manna_crypt.__file__
        for m in ("alembic", "psycopg", "mc1"):
            assert importlib.util.find_spec("manna_crypt." + m) is not None, m
        t = Table("t", MetaData(), Column("id", BigInteger, primary_key=True),
                  Column("tok", manna_crypt.sqlalchemy.EncryptedText("kr", aad="id")))
        print(select(t).compile(dialect=postgresql.dialect()))
    ''')
    r = subprocess.run([str(py), "-c", check], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "manna_crypt.decrypt_gcm(t.tok, CAST(t.id AS TEXT))" in r.stdout


def test_package_version_matches_extension(conn):
    assert manna_crypt.__version__ == conn.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'manna_crypt'").fetchone()[0]
