"""manna_crypt.alembic (the Python package in python/) against a real
cluster: the operations, the flow from a Fernet column to a protected
AES-256-GCM column in a real Alembic project (with NOTICEs in logging),
RowsLeftError, offline SQL, and autogenerate (an EncryptedText model
compares equal to its protected text column; a new EncryptedText column or
table, or an existing column the database does not protect as declared,
gets op.protect_column).

Assertion messages name ids and counts, never keys or plaintexts.
"""

import logging
import os
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from manna_crypt import RowsLeftError

from conftest import HOST, PORT, connect
# engine: the fixture (a fresh database with the package's test models)
from test_python_package import KEYRING, Base, engine, stored, token  # noqa: F401

# ---- Alembic -----------------------------------------------------------------------------------

MODELS_V1 = '''
from sqlalchemy import BigInteger, Identity, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from manna_crypt.sqlalchemy import EncryptedText


class Base(DeclarativeBase):
    pass


class PlaidItem(Base):
    __tablename__ = "plaid_items"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    item_id: Mapped[str | None] = mapped_column(Text, unique=True)
    access_token: Mapped[str | None] = mapped_column(EncryptedText("plaid_tokens", aad="id"))
'''

# V2 adds an encrypted column and a new table with one: autogenerate must
# protect both.
MODELS_V2 = MODELS_V1 + '''
    refresh_token: Mapped[str | None] = mapped_column(EncryptedText("plaid_tokens", aad="item_id"))


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    number: Mapped[str | None] = mapped_column(EncryptedText("plaid_tokens", aad="id"))
'''

ENV_PY = '''
import os, sys
sys.path.insert(0, os.path.dirname(__file__))
from alembic import context
from sqlalchemy import create_engine, pool
import manna_crypt.alembic  # noqa: F401  registers the operations and autogenerate hooks
import models

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=models.Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
'''

# Alembic's own template: ${imports} carries the rendered ops' imports.
SCRIPT_MAKO = '''"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""
from alembic import op
import sqlalchemy as sa
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''

REV_0001 = '''
"""legacy plaid_items with Fernet tokens; the Fernet key imported

Revision ID: 0001
Revises:
"""
import os
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.execute("CREATE EXTENSION IF NOT EXISTS manna_crypt")
    op.create_table(
        "plaid_items",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("item_id", sa.Text, unique=True),
        sa.Column("access_token", sa.Text),
    )
    op.execute(sa.text("SELECT manna_crypt.import_fernet_key('legacy_fernet', :k)")
               .bindparams(k=os.environ["MC_TEST_FERNET_KEY"]))
'''

REV_0002 = '''
"""Fernet -> AES-256-GCM, then protect the column

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import manna_crypt.alembic  # noqa: F401

revision = "0002"
down_revision = "0001"


def upgrade():
    # as in the README ("Alembic migrations")
    op.create_keyring("plaid_tokens", rotation_period="90 days")
    op.protect_column("plaid_items", "access_token", "plaid_tokens", aad_column="id")
    op.migrate_fernet("plaid_items", "access_token", "legacy_fernet", "plaid_tokens",
                      batch_size=500, aad_column="id")
    op.execute("ALTER TABLE plaid_items VALIDATE CONSTRAINT manna_crypt_protected_access_token")
'''


@pytest.fixture
def alembic_db():
    name = "t_alembic_pkg_" + uuid.uuid4().hex[:8]
    with connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield name
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic_project(tmp_path, db, models=MODELS_V1):
    from alembic.config import Config

    proj = tmp_path / "proj"
    (proj / "versions").mkdir(parents=True, exist_ok=True)
    (proj / "env.py").write_text(ENV_PY)
    (proj / "models.py").write_text(models)
    (proj / "script.py.mako").write_text(SCRIPT_MAKO)
    (proj / "versions/0001_legacy.py").write_text(REV_0001)
    (proj / "versions/0002_protect.py").write_text(REV_0002)
    for mod in ("models", "env"):
        sys.modules.pop(mod, None)
    cfg = Config()
    cfg.set_main_option("script_location", str(proj))
    cfg.set_main_option("sqlalchemy.url", f"postgresql+psycopg:///{db}?host={HOST}&port={PORT}")
    return cfg, proj


def compare(db, metadata):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    eng = create_engine(f"postgresql+psycopg:///{db}?host={HOST}&port={PORT}")
    try:
        with eng.connect() as c:
            return compare_metadata(MigrationContext.configure(c), metadata)
    finally:
        eng.dispose()


def test_alembic_operations_registered():
    import manna_crypt.alembic  # noqa: F401
    from alembic.operations import Operations

    for name in ("create_keyring", "protect_column", "unprotect_column", "migrate_fernet",
                 "rewrap_column", "encrypt_column", "backfill_blind_index"):
        assert hasattr(Operations, name), name


def test_alembic_flow_fernet_to_protected_gcm(tmp_path, alembic_db, monkeypatch, caplog):
    from alembic import command

    key = Fernet.generate_key()
    f = Fernet(key)
    monkeypatch.setenv("MC_TEST_FERNET_KEY", key.decode())
    cfg, proj = alembic_project(tmp_path, alembic_db)
    command.upgrade(cfg, "0001")
    plain = {i: token(i) for i in range(1, 1201)}
    with connect(alembic_db) as c:
        with c.cursor().copy("COPY plaid_items (id, item_id, access_token) FROM STDIN") as cp:
            for i, p in plain.items():
                cp.write_row((i, f"item-{i}", f.encrypt(p.encode()).decode()))
        c.execute("SELECT setval(pg_get_serial_sequence('plaid_items', 'id'), 1200)")
    caplog.set_level(logging.INFO, logger="manna_crypt")
    command.upgrade(cfg, "head")
    # progress NOTICEs of migrate_fernet reached logging, and no secret did
    msgs = [r.getMessage() for r in caplog.records if r.name == "manna_crypt"]
    assert any(" done in " in m for m in msgs), msgs
    assert not any(key.decode() in m or "access-sandbox" in m for m in msgs)
    with connect(alembic_db) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0002"
        assert c.execute("SELECT convalidated FROM pg_constraint "
                         "WHERE conname = 'manna_crypt_protected_access_token'").fetchone()[0] is True
    got = stored(alembic_db)
    assert [i for i, p in plain.items() if got[i] != (True, p)] == []

    # the application's model reads and writes the protected column
    sys.path.insert(0, str(proj))
    try:
        import models
    finally:
        sys.path.remove(str(proj))
    eng = create_engine(f"postgresql+psycopg:///{alembic_db}?host={HOST}&port={PORT}")
    try:
        with Session(eng) as s:
            s.add(models.PlaidItem(item_id="new", access_token="tok-new"))
            s.commit()
            assert s.scalars(select(models.PlaidItem).where(models.PlaidItem.id == 7)).one().access_token == plain[7]
            assert s.scalars(select(models.PlaidItem.access_token).where(models.PlaidItem.item_id == "new")).one() \
                == "tok-new"
    finally:
        eng.dispose()
    assert stored(alembic_db)[1201] == (True, "tok-new")

    # autogenerate: the model with EncryptedText equals the database
    assert compare(alembic_db, models.Base.metadata) == []

    # a new EncryptedText column and a new table: rendered as text, then protected
    (proj / "models.py").write_text(MODELS_V2)
    sys.modules.pop("models", None)
    script = command.revision(cfg, message="more secrets", autogenerate=True, rev_id="0003")
    src = Path(script.path).read_text()
    assert "import manna_crypt.alembic" in src
    assert "op.add_column('plaid_items', sa.Column('refresh_token', sa.Text(), nullable=True))" in src
    assert "op.protect_column('plaid_items', 'refresh_token', 'plaid_tokens', aad_column='item_id')" in src
    assert "op.protect_column('accounts', 'number', 'plaid_tokens', aad_column='id')" in src
    assert src.index("op.create_table('accounts'") < src.index("op.protect_column('accounts'")
    assert "EncryptedText" not in src
    assert "op.unprotect_column('plaid_items', 'refresh_token')" in src
    command.upgrade(cfg, "head")
    with connect(alembic_db) as c:
        c.execute("INSERT INTO plaid_items (item_id, access_token, refresh_token) VALUES ('x', 'a', 'r')")
        c.execute("INSERT INTO accounts (number) VALUES ('12345678')")
    assert stored(alembic_db, "refresh_token", "item_id")[1202] == (True, "r")
    assert stored(alembic_db, "number", "id", "accounts") == {1: (True, "12345678")}
    sys.path.insert(0, str(proj))
    try:
        import models as models_v2
    finally:
        sys.path.remove(str(proj))
        sys.modules.pop("models", None)
    assert compare(alembic_db, models_v2.Base.metadata) == []
    # and back down
    command.downgrade(cfg, "0002")
    with connect(alembic_db) as c:
        assert c.execute("SELECT to_regclass('accounts')").fetchone()[0] is None


def test_autogenerate_protects_existing_columns_the_model_encrypts(engine, fresh_db):
    """Text columns the model declares EncryptedText, but which the database
    does not protect (or protects under another keyring or AAD column), get
    op.protect_column; protected as declared, the diff is empty."""
    from alembic.autogenerate import produce_migrations, render_python_code
    from alembic.migration import MigrationContext

    import manna_crypt.alembic  # noqa: F401

    want = {("protect_column", None, "plaid_items", "access_token", KEYRING, "id", None, None, None),
            ("protect_column", None, "plaid_items", "secret_note", KEYRING, "item_id", None, None, None)}
    assert set(compare(fresh_db, Base.metadata)) == want
    with engine.connect() as c:
        code = render_python_code(produce_migrations(MigrationContext.configure(c), Base.metadata).upgrade_ops)
    assert "op.protect_column('plaid_items', 'access_token', 'plaid_tokens', aad_column='id')" in code
    with engine.begin() as c:
        c.execute(text("SELECT manna_crypt.protect_column('plaid_items', 'access_token', :k, 'id')"), {"k": KEYRING})
        c.execute(text("SELECT manna_crypt.protect_column('plaid_items', 'secret_note', :k, 'id')"), {"k": KEYRING})
    assert compare(fresh_db, Base.metadata) == [
        ("protect_column", None, "plaid_items", "secret_note", KEYRING, "item_id", None, None, None)]
    with engine.begin() as c:
        c.execute(text("SELECT manna_crypt.protect_column('plaid_items', 'secret_note', :k, 'item_id')"),
                  {"k": KEYRING})
    assert compare(fresh_db, Base.metadata) == []


def test_alembic_reencrypt_ops_raise_when_rows_are_left(tmp_path, alembic_db, monkeypatch, caplog):
    """op.migrate_fernet in a revision: a token it cannot convert makes the
    revision fail with RowsLeftError (every other row converted and
    committed); raise_on_failure=False accepts it. Also: already inside an
    autocommit block works, and rewrap/encrypt run the same way."""
    from alembic import command

    key = Fernet.generate_key()
    monkeypatch.setenv("MC_TEST_FERNET_KEY", key.decode())
    cfg, proj = alembic_project(tmp_path, alembic_db)
    (proj / "versions/0002_protect.py").write_text(textwrap.dedent('''
        """Revision ID: 0002"""
        import os
        from alembic import op
        import manna_crypt.alembic  # noqa: F401

        revision = "0002"
        down_revision = "0001"


        def upgrade():
            op.create_keyring("plaid_tokens")
            op.create_keyring("plaid_tokens")  # if_not_exists
            op.migrate_fernet("plaid_items", "access_token", "legacy_fernet", "plaid_tokens",
                              aad_column="id", raise_on_failure=os.environ["MC_TEST_RAISE"] == "1")
    '''))
    command.upgrade(cfg, "0001")
    f = Fernet(key)
    with connect(alembic_db) as c:
        c.execute("INSERT INTO plaid_items (id, item_id, access_token) OVERRIDING SYSTEM VALUE VALUES "
                  "(1, 'a', %s), (2, 'b', %s), (3, 'c', 'not a token')",
                  (f.encrypt(b"t1").decode(), f.encrypt(b"t2").decode()))
    monkeypatch.setenv("MC_TEST_RAISE", "1")
    with pytest.raises(RowsLeftError) as e:
        command.upgrade(cfg, "head")
    assert e.value.run_id is not None and e.value.failed == 1
    # raised by the procedure itself (raise_on_failure => true), after its last COMMIT
    assert e.value.__cause__.orig.sqlstate == "22000"
    with connect(alembic_db) as c:
        # the revision is not recorded; the convertible rows are converted
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"
        assert c.execute("SELECT count(*) FROM plaid_items WHERE manna_crypt.is_encrypted(access_token)"
                         ).fetchone()[0] == 2
        assert c.execute("SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'plaid_tokens'").fetchone()[0] == 1
    monkeypatch.setenv("MC_TEST_RAISE", "0")
    command.upgrade(cfg, "head")
    with connect(alembic_db) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0002"

    # The operations from a MigrationContext directly, already in autocommit
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    eng = create_engine(f"postgresql+psycopg:///{alembic_db}?host={HOST}&port={PORT}")
    try:
        with eng.connect() as conn:
            ctx = MigrationContext.configure(conn)
            op = Operations(ctx)
            with ctx.begin_transaction():
                with ctx.autocommit_block():
                    run = op.rewrap_column("plaid_items", "access_token", "plaid_tokens", aad_column="id",
                                           raise_on_failure=False)
                    assert isinstance(run, int)
                conn.execute(text("CREATE TABLE users (id int PRIMARY KEY, ssn text)"))
                conn.execute(text("INSERT INTO users VALUES (1, '123-45-6789'), (2, NULL)"))
                op.create_keyring("pii")
                run2 = op.encrypt_column("users", "ssn", "pii", aad_column="id", batch_size=10)
                assert run2 > run
    finally:
        eng.dispose()
    with connect(alembic_db) as c:
        assert c.execute("SELECT manna_crypt.decrypt_gcm(ssn, id::text) FROM users ORDER BY id").fetchall() == [
            ("123-45-6789",), (None,)]


def test_alembic_offline_sql(tmp_path, alembic_db):
    """--sql mode writes the statements (CALLs after a COMMIT) instead of running them."""
    import io

    from alembic import command

    cfg, proj = alembic_project(tmp_path, alembic_db)
    (proj / "env.py").write_text(textwrap.dedent('''
        from alembic import context
        import manna_crypt.alembic  # noqa: F401
        context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
    '''))
    buf = io.StringIO()
    cfg.output_buffer = buf
    os.environ.setdefault("MC_TEST_FERNET_KEY", "unused-in-offline-mode")
    command.upgrade(cfg, "0001:0002", sql=True)
    out = buf.getvalue()
    assert ("SELECT manna_crypt.create_keyring(CAST('plaid_tokens' AS text), CAST('90 days' AS interval), "
            "if_not_exists => true)") in out
    assert "COMMIT;" in out
    assert ("CALL manna_crypt.migrate_fernet(CAST('plaid_items' AS regclass), CAST('access_token' AS name), "
            "CAST('legacy_fernet' AS text), CAST('plaid_tokens' AS text), batch_size => CAST(500 AS integer)") in out
    assert "SELECT manna_crypt.protect_column(CAST('plaid_items' AS regclass)" in out
