""""Nothing is lost": migrate_fernet against a real cluster under concurrent
writers, a SIGKILL of its backend mid-run, and the Alembic path.

Assertion messages report ids and counts only, never keys or plaintexts.
"""

import os
import random
import signal
import threading
import time
import uuid
from argparse import Namespace
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import HOST, PORT, connect

LEGACY = "legacy_fernet"
TARGET = "plaid_tokens"
HERE = Path(__file__).resolve().parent


def copy_rows(conn, table, rows, cols="(id, tok)"):
    with conn.cursor().copy(f"COPY {table} {cols} FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)


def decrypt_all(conn, table, col="tok"):
    """{id: plaintext} for every mc1 row (AAD = id); raises on any failure."""
    return dict(
        conn.execute(
            f"SELECT id, manna_crypt.decrypt_gcm({col}, id::text) FROM {table} WHERE manna_crypt.is_encrypted({col})"
        ).fetchall()
    )


def categories(conn, table, col="tok"):
    return dict(
        conn.execute(
            "SELECT category, sum(n)::bigint FROM manna_crypt.column_status(%s, %s) GROUP BY 1", (table, col)
        ).fetchall()
    )


# ---------------------------------------------------------------------------
# (a) concurrent writers during the whole run
# ---------------------------------------------------------------------------


class Writer(threading.Thread):
    """Updates random rows of its own id partition (so each row's writes are
    ordered by one thread) until stopped; records every committed write."""

    def __init__(self, db, key, n_rows, k, n_writers, seed):
        super().__init__(daemon=True)
        self.db, self.fernet, self.n, self.k, self.nw = db, Fernet(key), n_rows, k, n_writers
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.last = {}  # id -> plaintext of its last committed write
        self.writes = 0
        self.writes_during_run = 0
        self.counting = threading.Event()
        self.error = None

    def run(self):
        try:
            with connect(self.db) as c:
                flip = False
                while not self.stop.is_set():
                    i = self.rng.randrange(self.n // self.nw) * self.nw + self.k
                    p = f"writer-{self.k}-{self.writes}-{uuid.uuid4()}"
                    if flip:
                        c.execute("UPDATE items SET tok = %s WHERE id = %s",
                                  (self.fernet.encrypt(p.encode()).decode(), i))
                    else:
                        c.execute(
                            "UPDATE items SET tok = manna_crypt.encrypt_gcm(%s, %s, id::text) WHERE id = %s",
                            (p, TARGET, i),
                        )
                    # autocommit: the UPDATE has committed when execute returns
                    self.last[i] = p
                    self.writes += 1
                    if self.counting.is_set():
                        self.writes_during_run += 1
                    flip = not flip
        except BaseException as e:  # reported by the test
            self.error = e


def test_concurrent_writers_lose_nothing(fresh_db):
    n = int(os.environ.get("MC_SAFETY_ROWS", "100000"))
    key = Fernet.generate_key()
    f = Fernet(key)
    originals = {i: f"access-sandbox-{uuid.uuid4()}" for i in range(n)}
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, key.decode()))
        c.execute("SELECT manna_crypt.create_keyring(%s)", (TARGET,))
        c.execute("CREATE TABLE items (id int PRIMARY KEY, tok text)")
        copy_rows(c, "items", ((i, f.encrypt(p.encode()).decode()) for i, p in originals.items()))
        c.execute("ANALYZE items")

    writers = [Writer(fresh_db, key, n, k, 3, seed=k) for k in range(3)]
    timings = {}
    try:
        for w in writers:
            w.start()
        while sum(w.writes for w in writers) < 30:  # writers are up and writing
            time.sleep(0.01)
            assert all(w.error is None for w in writers), "a writer failed before the run"
        for w in writers:
            w.counting.set()
        with connect(fresh_db) as c:
            c.execute("SET client_min_messages = warning")
            t0 = time.time()
            c.execute(
                f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', batch_size => 1000, aad_column => 'id')"
            )
            timings["run"] = time.time() - t0
            for w in writers:
                w.counting.clear()
            first = c.execute(
                "SELECT converted, failed, pass FROM manna_crypt.reencrypt_runs ORDER BY run_id DESC LIMIT 1"
            ).fetchone()
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(timeout=30)
    assert all(not w.is_alive() for w in writers)
    errors = [type(w.error).__name__ for w in writers if w.error is not None]
    assert errors == [], f"writers failed: {errors}"
    during = sum(w.writes_during_run for w in writers)
    assert during > 100, f"only {during} writes during the run ({timings['run']:.1f} s)"

    with connect(fresh_db) as c:
        c.execute("SET client_min_messages = warning")
        # the stragglers writers put back in Fernet form after the last pass
        c.execute(
            f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', batch_size => 1000, aad_column => 'id')"
        )
        second = c.execute(
            "SELECT converted, failed FROM manna_crypt.reencrypt_runs ORDER BY run_id DESC LIMIT 1"
        ).fetchone()
        assert categories(c, "items") == {"mc1": n}
        got = decrypt_all(c, "items")
    expected = dict(originals)
    for w in writers:
        expected.update(w.last)
    lost = [i for i in range(n) if got.get(i) != expected[i]]
    assert len(got) == n
    assert lost == [], f"{len(lost)} rows do not hold their last committed value, e.g. ids {lost[:10]}"
    # the first run converted the bulk; the second one only stragglers
    assert first[0] >= n - during and second[1] == 0
    print(f"\n{n} rows, {during} concurrent writes; run {timings['run']:.1f} s, "
          f"first run converted {first[0]} (failed {first[1]}, passes {first[2]}), second {second[0]}")


# ---------------------------------------------------------------------------
# (b) SIGKILL of the migrating backend, then resume
# ---------------------------------------------------------------------------


def test_sigkill_mid_run_then_resume():
    from mc_cluster import Cluster, new_root_key

    n = 50_000
    key = Fernet.generate_key()
    f = Fernet(key)
    originals = {i: f"access-sandbox-{uuid.uuid4()}" for i in range(n)}
    garbage = {n + 1: "gAAAAAbroken", n + 2: "not a token"}
    nulls = [n + 3, n + 4]
    with Cluster("h4_sigkill", root_key=new_root_key()) as cl:
        db = cl.create_db_with_extension("app")
        with cl.connect(db) as c:
            c.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, key.decode()))
            c.execute("SELECT manna_crypt.create_keyring(%s)", (TARGET,))
            c.execute("CREATE TABLE items (id int PRIMARY KEY, tok text)")
            copy_rows(c, "items", ((i, f.encrypt(p.encode()).decode()) for i, p in originals.items()))
            copy_rows(c, "items", list(garbage.items()) + [(i, None) for i in nulls])
            c.execute("ANALYZE items")

        outcome = {}

        def runner():
            try:
                with cl.connect(db) as rc:
                    rc.execute("SET client_min_messages = warning")
                    rc.execute(
                        f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', batch_size => 100, aad_column => 'id')"
                    )
                outcome["finished"] = True
            except psycopg.Error as e:
                outcome["error"] = e

        th = threading.Thread(target=runner, daemon=True)
        th.start()
        try:
            pid = None
            with cl.connect(db) as obs:
                deadline = time.time() + 60
                while time.time() < deadline:
                    row = obs.execute(
                        "SELECT pid, converted FROM manna_crypt.reencrypt_progress WHERE status = 'running'"
                    ).fetchone()
                    if row and row[1] > 0:
                        pid = row[0]
                        break
                    time.sleep(0.02)
            assert pid is not None, "no progress observed"
            os.kill(pid, signal.SIGKILL)
        finally:
            th.join(timeout=120)
        assert not th.is_alive()
        assert "finished" not in outcome, "the run finished before it could be killed"

        # the postmaster restarts after a backend crash: wait until it accepts connections
        deadline = time.time() + 60
        while True:
            try:
                with cl.connect(db) as c:
                    c.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

        with cl.connect(db) as c:
            crashed = c.execute(
                "SELECT run_id, status, next_block, converted FROM manna_crypt.reencrypt_runs"
            ).fetchall()
            assert len(crashed) == 1 and crashed[0][1] == "running"
            half = categories(c, "items")
            assert 0 < half.get("mc1", 0) < n, "the kill did not land mid-run"
            # whatever was committed is readable and exact
            partial = decrypt_all(c, "items")
            assert [i for i, p in partial.items() if originals.get(i) != p] == []

            notices = []
            c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            c.execute(
                f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', batch_size => 1000, aad_column => 'id')"
            )
            resumed = [m for m in notices if "resuming run" in m]
            assert len(resumed) == 1 and f"run {crashed[0][0]}" in resumed[0]
            runs = c.execute("SELECT run_id, status FROM manna_crypt.reencrypt_runs ORDER BY run_id").fetchall()
            assert runs == [(crashed[0][0], "done")]

            assert categories(c, "items") == {"mc1": n, "malformed": 1, "plaintext": 1, "null": 2}
            got = decrypt_all(c, "items")
            assert len(got) == n
            assert [i for i in range(n) if got.get(i) != originals[i]] == []
            left = dict(c.execute("SELECT id, tok FROM items WHERE id > %s", (n,)).fetchall())
            assert left == {**garbage, **{i: None for i in nulls}}


# ---------------------------------------------------------------------------
# (c) the Alembic path
# ---------------------------------------------------------------------------


def _alembic_config(db, fernet_key, extra_versions=False):
    from alembic.config import Config

    project = HERE / "alembic_project"
    cfg = Config(str(project / "alembic.ini"),
                 cmd_opts=Namespace(x=[f"fernet_key={fernet_key}"]))
    cfg.set_main_option("sqlalchemy.url", f"postgresql+psycopg:///{db}?host={HOST}&port={PORT}")
    if extra_versions:
        cfg.set_main_option(
            "version_locations", f"{project / 'versions'} {project / 'versions_no_autocommit'}"
        )
    return cfg


@pytest.fixture
def alembic_db():
    name = "t_alembic_" + uuid.uuid4().hex[:8]
    with connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield name
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_alembic_upgrade_migrates_tokens(alembic_db):
    from alembic import command

    key = Fernet.generate_key()
    f = Fernet(key)
    cfg = _alembic_config(alembic_db, key.decode())
    command.upgrade(cfg, "0001")
    plain = {i: f"access-sandbox-{uuid.uuid4()}" for i in range(1, 2501)}
    with connect(alembic_db) as c:
        copy_rows(c, "plaid_items", ((i, f.encrypt(p.encode()).decode()) for i, p in plain.items()),
                  cols="(id, access_token)")
        # the key was imported, wrapped: its text is nowhere in the key table
        dumped = c.execute("SELECT string_agg(t::text, '') FROM manna_crypt.data_keys t").fetchone()[0]
        assert key.decode() not in dumped
    command.upgrade(cfg, "head")
    with connect(alembic_db) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0002"
        assert categories(c, "plaid_items", "access_token") == {"mc1": len(plain)}
        got = decrypt_all(c, "plaid_items", "access_token")
        assert len(got) == len(plain)
        assert [i for i, p in plain.items() if got.get(i) != p] == []
    # a second upgrade is a no-op; rerunning the CALL by hand converts nothing
    command.upgrade(cfg, "head")
    with connect(alembic_db) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CALL manna_crypt.migrate_fernet('plaid_items', 'access_token', 'legacy_fernet', 'plaid_tokens', aad_column => 'id')")
        assert c.execute(
            "SELECT converted FROM manna_crypt.reencrypt_runs ORDER BY run_id DESC LIMIT 1"
        ).fetchone()[0] == 0


def test_alembic_without_autocommit_block_fails_cleanly(alembic_db):
    from alembic import command
    from sqlalchemy.exc import DBAPIError

    key = Fernet.generate_key()
    f = Fernet(key)
    cfg = _alembic_config(alembic_db, key.decode(), extra_versions=True)
    command.upgrade(cfg, "0001")
    with connect(alembic_db) as c:
        copy_rows(c, "plaid_items", ((i, f.encrypt(b"tok-%d" % i).decode()) for i in range(1, 101)),
                  cols="(id, access_token)")
        before = c.execute("SELECT id, access_token FROM plaid_items ORDER BY id").fetchall()

    with pytest.raises(DBAPIError) as e:
        command.upgrade(cfg, "0002_wrong")
    assert e.value.orig.sqlstate in ("25001", "2D000")

    with connect(alembic_db) as c:
        # nothing half-done: rows, version table, keyrings, runs all as before
        assert c.execute("SELECT id, access_token FROM plaid_items ORDER BY id").fetchall() == before
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"
        assert c.execute(
            "SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'plaid_tokens_wrong'"
        ).fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM manna_crypt.reencrypt_runs").fetchone()[0] == 0
    # the correct revision then works from the same state
    command.upgrade(cfg, "0002")
    with connect(alembic_db) as c:
        assert categories(c, "plaid_items", "access_token") == {"mc1": 100}
        assert c.execute(
            "SELECT count(*) FROM plaid_items WHERE manna_crypt.decrypt_gcm(access_token, id::text) <> 'tok-' || id"
        ).fetchone()[0] == 0
