"""How the re-encryption procedures report (issue 11, item 3): the run id
handed back through INOUT run_id, raise_on_failure (SQLSTATE 22000 after the
last COMMIT), 0.1.0's argument lists still working, progress NOTICEs a
person can read (at most one every few seconds, counters that add up), and
a migration run from Alembic that fails when it leaves rows unconverted.

Assertion messages report ids and counts only, never keys or plaintexts.
"""

import re
import threading
import time
import uuid
from argparse import Namespace
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import HOST, PORT, connect

pytestmark = pytest.mark.all_versions

LEGACY = "legacy_fernet"
TARGET = "app_tokens"
HERE = Path(__file__).resolve().parent
# The shortest time between two progress NOTICEs (src/reencrypt/progress.rs).
NOTICE_EVERY = 5.0


class Notices:
    """The NOTICEs of a connection, with the time each arrived."""

    def __init__(self, conn):
        self.items = []
        self._lock = threading.Lock()
        conn.add_notice_handler(self._on)

    def _on(self, diag):
        with self._lock:
            self.items.append((time.monotonic(), diag.message_primary or ""))

    def take(self):
        with self._lock:
            out, self.items = self.items, []
        return out


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def copy_rows(conn, table, rows):
    with conn.cursor().copy(f"COPY {table} (id, tok) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)


@pytest.fixture
def fernet(conn):
    key = Fernet.generate_key()
    conn.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, key.decode()))
    conn.execute("SELECT manna_crypt.create_keyring(%s)", (TARGET,))
    return Fernet(key)


def mixed_table(conn, f, name="items", n_tokens=1900, n_mc1=50, n_bad=30, n_null=20):
    """A table of n rows: Fernet tokens, values already mc1, tokens under a
    foreign key (left untouched), NULLs — in that order of ids."""
    conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, tok text)")
    foreign = Fernet(Fernet.generate_key())
    rows, i = [], 0
    for _ in range(n_tokens):
        i += 1
        rows.append((i, f.encrypt(b"tok-%d" % i).decode()))
    first_mc1 = i + 1
    i += n_mc1
    for _ in range(n_bad):
        i += 1
        rows.append((i, foreign.encrypt(b"bad-%d" % i).decode()))
    for _ in range(n_null):
        i += 1
        rows.append((i, None))
    copy_rows(conn, name, rows)
    conn.execute(
        f"INSERT INTO {name} SELECT g, manna_crypt.encrypt_gcm('mc1-' || g, %s, g::text) "
        "FROM generate_series(%s::int, %s::int) g",
        (TARGET, first_mc1, first_mc1 + n_mc1 - 1),
    )
    conn.execute(f"ANALYZE {name}")
    return i


def run_row(conn, run_id):
    return conn.execute(
        "SELECT status, scanned, converted, already, failed, nulls, other_keyring "
        "FROM manna_crypt.reencrypt_runs WHERE run_id = %s",
        (run_id,),
    ).fetchone()


# ---------------------------------------------------------------------------
# counters that add up; NOTICEs a person can read
# ---------------------------------------------------------------------------


def test_counters_add_up_on_a_2000_row_table(conn, fernet):
    n = mixed_table(conn, fernet)
    assert n == 2000
    notices = Notices(conn)
    run_id = one(conn, f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', "
                       "batch_size => 100, aad_column => 'id')")
    msgs = [m for _, m in notices.take()]
    # the run's own counters: every row once, its own conversions never
    # counted again (as "seen" or as "already in target form")
    status, scanned, converted, already, failed, nulls, other = run_row(conn, run_id)
    assert (status, converted, already, failed, nulls, other) == ("done", 1900, 50, 30, 20, 0)
    assert scanned == converted + already + failed + other == 1980
    summary = msgs[-1]
    assert f"run {run_id} done in " in summary
    assert ("2000 rows: 1900 converted, 50 already in target form, 30 left untouched, "
            "20 null, 0 under other keyrings") in summary, summary
    assert f"reencrypt_failures WHERE run_id = {run_id}" in summary
    # every progress line that was sent adds up and stays within the table
    for m in msgs:
        seen = re.search(r"(\d+) seen: (\d+) converted, (\d+) already in target form, "
                         r"(\d+) left untouched, (\d+) under other keyrings", m)
        if seen and "pass 1" in m:
            total, *parts = map(int, seen.groups())
            assert total == sum(parts) and total <= 1980, m

    # a second run converts nothing: everything is already in target form or
    # left untouched, and its counters say so
    run2 = one(conn, f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', "
                     "aad_column => 'id')")
    assert run2 != run_id
    assert run_row(conn, run2) == ("done", 1980, 0, 1950, 30, 20, 0)


def test_rewrap_counts_its_conversions_once(conn, fernet):
    # rewrap_column has no cheap prefix filter in its re-check pass: it looks
    # at every value again, and must not report its own work as "already"
    conn.execute("CREATE TABLE r (id int PRIMARY KEY, tok text)")
    conn.execute("SELECT manna_crypt.create_keyring('other_ring')")
    conn.execute(f"INSERT INTO r SELECT g, manna_crypt.encrypt_gcm('v' || g, '{TARGET}', g::text) "
                 "FROM generate_series(1, 900) g")
    conn.execute("INSERT INTO r SELECT g, manna_crypt.encrypt_gcm('o' || g, 'other_ring', g::text) "
                 "FROM generate_series(901, 950) g")
    conn.execute(f"SELECT manna_crypt.rotate_keyring('{TARGET}')")
    conn.execute(f"INSERT INTO r SELECT g, manna_crypt.encrypt_gcm('n' || g, '{TARGET}', g::text) "
                 "FROM generate_series(951, 1000) g")
    notices = Notices(conn)
    run_id = one(conn, f"CALL manna_crypt.rewrap_column('r', 'tok', '{TARGET}', 50, 'id')")
    summary = notices.take()[-1][1]
    assert run_row(conn, run_id) == ("done", 1000, 900, 50, 0, 0, 50)
    assert "1000 rows: 900 converted, 50 already in target form, 0 left untouched, 0 null, " \
           "50 under other keyrings" in summary, summary


def test_progress_notices_at_most_one_every_few_seconds(conn, fernet):
    # 400 rows in batches of 4: 100 batches, each slowed down by a trigger
    # (the table owner's, run inside the batch) so the run takes ~8 s
    conn.execute("CREATE TABLE slow (id int PRIMARY KEY, tok text)")
    copy_rows(conn, "slow", ((i, fernet.encrypt(b"s-%d" % i).decode()) for i in range(1, 401)))
    conn.execute("""
        CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_catalog.pg_sleep(0.02); RETURN NEW; END $$""")
    conn.execute("CREATE TRIGGER slow BEFORE UPDATE ON slow FOR EACH ROW EXECUTE FUNCTION public.slow_down()")
    conn.execute("ANALYZE slow")
    notices = Notices(conn)
    started = time.monotonic()
    conn.execute(f"CALL manna_crypt.migrate_fernet('slow', 'tok', '{LEGACY}', '{TARGET}', batch_size => 4)")
    elapsed = time.monotonic() - started
    got = notices.take()
    progress = [(t, m) for t, m in got if re.search(r"pass \d+.*% of ~", m)]
    assert elapsed > NOTICE_EVERY + 1, f"the run took only {elapsed:.1f} s"
    # at least one progress line in a run this long, and never two within
    # NOTICE_EVERY seconds (0.1.0 sent one per batch: 100 here)
    assert 1 <= len(progress) <= elapsed / NOTICE_EVERY + 1, [m for _, m in progress]
    gaps = [b[0] - a[0] for a, b in zip(progress, progress[1:])]
    assert all(g >= NOTICE_EVERY - 0.5 for g in gaps), gaps
    # a start line, the progress lines, the summary: nothing per batch
    assert len(got) <= len(progress) + 3, [m for _, m in got]
    assert re.search(r"started", got[0][1]) and " done in " in got[-1][1]
    for _, m in progress:
        seen = re.search(r"(\d+) seen: (\d+) converted, (\d+) already in target form, "
                         r"(\d+) left untouched, (\d+) under other keyrings", m)
        assert seen, m
        total, *parts = map(int, seen.groups())
        assert total == sum(parts) and 0 < total <= 400, m
        assert re.search(r"[\d.]+ rows/s", m) and re.search(r"ETA [\d.]+ s", m), m


# ---------------------------------------------------------------------------
# run_id and raise_on_failure
# ---------------------------------------------------------------------------


def test_run_id_and_raise_on_failure(conn, fernet):
    mixed_table(conn, fernet, n_tokens=300, n_mc1=5, n_bad=7, n_null=3)
    conn.execute("SET client_min_messages = warning")
    with pytest.raises(psycopg.Error) as e:
        conn.execute(f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', "
                     "batch_size => 50, aad_column => 'id', raise_on_failure => true)")
    err = e.value
    assert err.sqlstate == "22000"
    run_id = one(conn, "SELECT max(run_id) FROM manna_crypt.reencrypt_runs")
    assert "7 rows" in err.diag.message_primary and "unconverted" in err.diag.message_primary
    assert f"run {run_id}" in err.diag.message_detail and "converted 300 rows" in err.diag.message_detail
    assert f"reencrypt_failures WHERE run_id = {run_id}" in err.diag.message_hint
    # raised after the last COMMIT: the run is closed, every row that could
    # be converted is, and the failures are recorded
    assert run_row(conn, run_id)[0] == "done"
    assert one(conn, "SELECT count(*) FROM items WHERE tok LIKE 'mc1:%'") == 305
    assert one(conn, "SELECT count(*) FROM manna_crypt.reencrypt_failures WHERE run_id = %s", (run_id,)) == 7
    assert one(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                     "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())") == 0
    # the session goes on; the default does not raise and hands back the id
    run2 = one(conn, f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', aad_column => 'id')")
    assert run2 == run_id + 1 and run_row(conn, run2)[4] == 7
    # once the bad rows are gone, raise_on_failure => true passes
    conn.execute("DELETE FROM items WHERE tok NOT LIKE 'mc1:%'")
    run3 = one(conn, f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', "
                     "aad_column => 'id', raise_on_failure => true)")
    assert run_row(conn, run3)[4] == 0
    # a dry run has no run id; with raise_on_failure it raises for what it
    # would leave, having written nothing
    conn.execute("UPDATE items SET tok = 'plain text' WHERE id = 1")
    assert one(conn, f"CALL manna_crypt.encrypt_column('items', 'tok', '{TARGET}', dry_run => true)") is None
    with pytest.raises(psycopg.Error) as e:
        conn.execute(f"CALL manna_crypt.rewrap_column('items', 'tok', '{TARGET}', dry_run => true, "
                     "raise_on_failure => true)")
    assert e.value.sqlstate == "22000" and "dry run" in e.value.diag.message_primary
    assert one(conn, "SELECT tok FROM items WHERE id = 1") == "plain text"
    # the value passed in as run_id is ignored
    run4 = one(conn, f"CALL manna_crypt.encrypt_column('items', 'tok', '{TARGET}', run_id => 12345)")
    assert run4 not in (None, 12345) and run_row(conn, run4)[2] == 1


def test_0_1_0_argument_lists_still_work(conn, fernet):
    conn.execute("SET client_min_messages = warning")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, tok text, note text)")
    copy_rows(conn, "t", ((i, fernet.encrypt(b"x-%d" % i).decode()) for i in range(1, 21)))
    calls = [
        # positional, every 0.1.0 argument
        f"CALL manna_crypt.migrate_fernet('t', 'tok', '{LEGACY}', '{TARGET}', 5, 'id', false)",
        f"CALL manna_crypt.migrate_fernet('t', 'tok', '{LEGACY}', '{TARGET}', 5, 'id')",
        f"CALL manna_crypt.migrate_fernet('t', 'tok', '{LEGACY}', '{TARGET}')",
        # named, in and out of order
        f"CALL manna_crypt.migrate_fernet(tbl => 't', col => 'tok', fernet_keyring => '{LEGACY}', "
        f"target_keyring => '{TARGET}', aad_column => 'id', dry_run => true, batch_size => 7)",
        f"CALL manna_crypt.rewrap_column('t', 'tok', '{TARGET}', 5, 'id', false)",
        f"CALL manna_crypt.rewrap_column('t', 'tok', '{TARGET}')",
        f"CALL manna_crypt.rewrap_column(keyring => '{TARGET}', col => 'tok', tbl => 't', aad_column => 'id')",
        f"CALL manna_crypt.encrypt_column('t', 'note', '{TARGET}', 5, 'id', false)",
        f"CALL manna_crypt.encrypt_column('t', 'note', '{TARGET}')",
        f"CALL manna_crypt.encrypt_column(tbl => 't', col => 'note', keyring => '{TARGET}', dry_run => true)",
        # the 0.2.0 parameters positionally, after the 0.1.0 ones
        f"CALL manna_crypt.encrypt_column('t', 'note', '{TARGET}', 5, 'id', false, NULL, true)",
    ]
    for sql in calls:
        rows = conn.execute(sql).fetchall()
        assert len(rows) == 1 and len(rows[0]) == 1, sql   # the run_id column
    assert one(conn, "SELECT count(*) FROM t WHERE manna_crypt.decrypt_gcm(tok, id::text) = 'x-' || id") == 20
    # the signatures: every 0.1.0 parameter in its place, the new ones last
    sigs = dict(conn.execute("""
        SELECT proname, pg_get_function_arguments(oid) FROM pg_proc
         WHERE pronamespace = 'manna_crypt'::regnamespace
           AND proname IN ('migrate_fernet', 'rewrap_column', 'encrypt_column')""").fetchall())
    # (with an INOUT parameter PostgreSQL spells out every mode)
    tail = ", INOUT run_id bigint DEFAULT NULL::bigint, IN raise_on_failure boolean DEFAULT false"
    assert sigs == {
        "migrate_fernet": "IN tbl regclass, IN col name, IN fernet_keyring text, IN target_keyring text, "
                          "IN batch_size integer DEFAULT 1000, IN aad_column name DEFAULT NULL::name, "
                          "IN dry_run boolean DEFAULT false" + tail,
        "rewrap_column": "IN tbl regclass, IN col name, IN keyring text, IN batch_size integer DEFAULT 1000, "
                         "IN aad_column name DEFAULT NULL::name, IN dry_run boolean DEFAULT false" + tail,
        "encrypt_column": "IN tbl regclass, IN col name, IN keyring text, IN batch_size integer DEFAULT 1000, "
                          "IN aad_column name DEFAULT NULL::name, IN dry_run boolean DEFAULT false" + tail,
    }


# ---------------------------------------------------------------------------
# Alembic: a migration that leaves rows unconverted fails
# ---------------------------------------------------------------------------


@pytest.fixture
def alembic_db():
    name = "t_alembic_" + uuid.uuid4().hex[:8]
    with connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield name
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_alembic_migration_fails_when_rows_are_left(alembic_db):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.exc import DBAPIError

    key = Fernet.generate_key()
    f = Fernet(key)
    project = HERE / "alembic_project"
    cfg = Config(str(project / "alembic.ini"), cmd_opts=Namespace(x=[f"fernet_key={key.decode()}"]))
    cfg.set_main_option("sqlalchemy.url", f"postgresql+psycopg:///{alembic_db}?host={HOST}&port={PORT}")
    command.upgrade(cfg, "0001")
    foreign = Fernet(Fernet.generate_key())
    with connect(alembic_db) as c:
        with c.cursor().copy("COPY plaid_items (id, access_token) FROM STDIN") as cp:
            for i in range(1, 501):
                cp.write_row((i, f.encrypt(b"tok-%d" % i).decode()))
            cp.write_row((501, foreign.encrypt(b"from another app").decode()))
    # 0.1.0's CALL succeeded here and Alembic recorded the revision: the
    # NOTICE saying one row was left is invisible to it
    with pytest.raises(DBAPIError) as e:
        command.upgrade(cfg, "head")
    assert e.value.orig.sqlstate == "22000"
    assert "1 row" in e.value.orig.diag.message_primary
    with connect(alembic_db) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"
        # the rows that could be converted are, and committed
        assert c.execute("SELECT count(*) FROM plaid_items WHERE access_token LIKE 'mc1:%'").fetchone()[0] == 500
        row_key = c.execute("SELECT row_key FROM manna_crypt.reencrypt_failures").fetchone()[0]
        assert row_key == "501"
        c.execute("DELETE FROM plaid_items WHERE id = 501")
    # fixed: the same migration, run again, creates nothing twice and passes
    command.upgrade(cfg, "head")
    with connect(alembic_db) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0002"
        assert c.execute("SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'plaid_tokens'").fetchone()[0] == 1
        assert c.execute(
            "SELECT count(*) FROM plaid_items WHERE manna_crypt.decrypt_gcm(access_token, id::text) = 'tok-' || id"
        ).fetchone()[0] == 500
