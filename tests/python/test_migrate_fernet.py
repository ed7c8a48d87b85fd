"""decrypt_fernet and the in-place re-encryption procedures (docs/DESIGN.md
section 4), driven by a real client: tokens made by Python's `cryptography`
(Fernet / MultiFernet, as the applications being migrated made them).

Assertion messages never contain keys or plaintexts: they report ids and
counts only.
"""

import base64
import random
import re
import threading
import time

import psycopg
import pytest
from cryptography.fernet import Fernet, MultiFernet

from conftest import connect

LEGACY = "legacy_fernet"
TARGET = "app_tokens"


def random_text(rng, n):
    """Random Unicode text: ASCII, BMP and astral-plane characters; no NUL
    (a PostgreSQL text value cannot hold one) and no surrogates."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            cp = rng.randint(0x20, 0x7E)
        elif r < 0.7:
            cp = rng.randint(0xA0, 0xD7FF)
        elif r < 0.8:
            cp = rng.randint(0xE000, 0xFFFD)
        else:
            cp = rng.randint(0x10000, 0x10FFFF)
        out.append(chr(cp))
    return "".join(out)


class Notices:
    """Collects the NOTICE messages of a connection."""

    def __init__(self, conn):
        self.messages = []
        self._lock = threading.Lock()
        conn.add_notice_handler(self._on)

    def _on(self, diag):
        with self._lock:
            self.messages.append(diag.message_primary or "")

    def take(self):
        with self._lock:
            out, self.messages = self.messages, []
        return out


def snapshot(conn, table, col="tok"):
    return dict(conn.execute(f"SELECT id, {col} FROM {table} ORDER BY id").fetchall())


def last_run(conn, table):
    return conn.execute(
        "SELECT run_id, status, converted, failed, other_keyring, pass "
        "FROM manna_crypt.reencrypt_runs WHERE tbl = %s::regclass ORDER BY run_id DESC LIMIT 1",
        (table,),
    ).fetchone()


def status_counts(conn, table, col="tok"):
    """column_status as {(category, key_id): n}."""
    rows = conn.execute(
        "SELECT category, key_id, n FROM manna_crypt.column_status(%s, %s)", (table, col)
    ).fetchall()
    return {(c, k): n for c, k, n in rows}


@pytest.fixture
def keys():
    return Fernet.generate_key(), Fernet.generate_key()


@pytest.fixture
def legacy(conn, keys):
    old, new = keys
    conn.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, old.decode()))
    conn.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, new.decode()))
    target_v1 = conn.execute("SELECT manna_crypt.create_keyring(%s)", (TARGET,)).fetchone()[0]
    return target_v1


# ---------------------------------------------------------------------------
# decrypt_fernet
# ---------------------------------------------------------------------------


def test_decrypt_fernet_multifernet_exact(conn, keys, legacy):
    old, new = keys
    rng = random.Random(4)
    mf = MultiFernet([Fernet(new), Fernet(old)])
    plaintexts = [random_text(rng, rng.randint(1, 300)) for _ in range(60)]
    plaintexts += ["", "\U0001F511\U00010348\U0010FFFD", "x" * (1 << 20), random_text(rng, 300_000)]
    cases = []
    for i, p in enumerate(plaintexts):
        # old tokens under the old key, new ones (MultiFernet encrypts with
        # its first key) under the new key
        tok = Fernet(old).encrypt(p.encode()) if i % 2 else mf.encrypt(p.encode())
        cases.append((i, tok.decode(), p))
    wrong = []
    for i, tok, p in cases:
        got = conn.execute("SELECT manna_crypt.decrypt_fernet(%s, %s)", (tok, LEGACY)).fetchone()[0]
        if got != p:
            wrong.append(i)
    assert wrong == [], f"plaintext mismatch for cases {wrong}"
    # MultiFernet.rotate re-encrypts old tokens under the new key: still readable
    rotated = mf.rotate(cases[1][1].encode()).decode()
    got = conn.execute("SELECT manna_crypt.decrypt_fernet(%s, %s)", (rotated, LEGACY)).fetchone()[0]
    assert got == cases[1][2]


def test_decrypt_fernet_foreign_key_and_tampering(conn, keys, legacy):
    foreign = Fernet(Fernet.generate_key()).encrypt(b"foreign").decode()
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT manna_crypt.decrypt_fernet(%s, %s)", (foreign, LEGACY))
    assert e.value.sqlstate == "39000"
    good = Fernet(keys[0]).encrypt(b"tamper me").decode()
    raw = bytearray(base64.urlsafe_b64decode(good))
    raw[30] ^= 1
    bad = base64.urlsafe_b64encode(bytes(raw)).decode()
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT manna_crypt.decrypt_fernet(%s, %s)", (bad, LEGACY))
    assert e.value.sqlstate == "39000"


def test_decrypt_fernet_nul_plaintext_is_refused(conn, keys, legacy):
    # U+0000 is valid UTF-8 but no PostgreSQL text can hold it: returning the
    # prefix before it loses data silently. Expected an error instead.
    tok = Fernet(keys[0]).encrypt(b"a\x00b").decode()
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT manna_crypt.decrypt_fernet(%s, %s)", (tok, LEGACY)).fetchone()
    assert err.value.sqlstate == "22021"


def test_migrate_fernet_nul_plaintext_left_untouched(conn, keys, legacy):
    tok = Fernet(keys[0]).encrypt(b"a\x00b").decode()
    conn.execute("CREATE TABLE nul_t (id int PRIMARY KEY, tok text)")
    conn.execute("INSERT INTO nul_t VALUES (1, %s)", (tok,))
    conn.execute("SET client_min_messages = warning")
    conn.execute(f"CALL manna_crypt.migrate_fernet('nul_t', 'tok', '{LEGACY}', '{TARGET}')")
    assert conn.execute("SELECT tok FROM nul_t").fetchone()[0] == tok
    assert last_run(conn, "nul_t")[3] == 1


# ---------------------------------------------------------------------------
# migrate_fernet
# ---------------------------------------------------------------------------


def _populate_mixed(conn, keys, rng, n_tokens=40):
    """A table of every kind of value. Returns (expected plaintext by id for
    Fernet rows, ids of rows that must stay untouched and be recorded,
    ids of NULL rows, ids of mc1 rows)."""
    old, new = keys
    conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, tok text, other text DEFAULT 'x')")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('items')")
    expect, bad, nulls, mc1 = {}, set(), set(), {}
    rows = []
    i = 0
    for k in range(n_tokens):
        i += 1
        p = random_text(rng, rng.randint(0, 80)) if k % 5 else ""
        key = old if k % 2 else new
        rows.append((i, Fernet(key).encrypt(p.encode()).decode()))
        expect[i] = p
    big = "€" * (1 << 19)  # 1.5 MiB of UTF-8
    i += 1
    rows.append((i, Fernet(new).encrypt(big.encode()).decode()))
    expect[i] = big
    foreign = Fernet(Fernet.generate_key())
    for v in ["gAAAAAbroken", "gAAAAA" + "!" * 80, "just plaintext", "",
              foreign.encrypt(b"foreign secret").decode(),
              "mc1:not-base64!!", "mc1:" + "A" * 40]:
        i += 1
        rows.append((i, v))
        bad.add(i)
    for _ in range(3):
        i += 1
        rows.append((i, None))
        nulls.add(i)
    with conn.cursor().copy("COPY items (id, tok) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)
    for _ in range(3):
        i += 1
        p = random_text(rng, 20)
        conn.execute(
            "INSERT INTO items (id, tok) VALUES (%s, manna_crypt.encrypt_gcm(%s, %s, %s::text))",
            (i, p, TARGET, i),
        )
        mc1[i] = p
    conn.execute("ANALYZE items")
    return expect, bad, nulls, mc1


def test_migrate_fernet_converts_everything_convertible(conn, keys, legacy):
    rng = random.Random(7)
    expect, bad, nulls, mc1 = _populate_mixed(conn, keys, rng)
    before = snapshot(conn, "items")
    versions_before = dict(conn.execute("SELECT id, version FROM items").fetchall())
    notices = Notices(conn)

    conn.execute(
        f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', batch_size => 7, aad_column => 'id')"
    )
    msgs = notices.take()
    after = snapshot(conn, "items")

    # converted rows: mc1 under the target key, exact plaintext with AAD = id
    wrong = []
    for i, p in expect.items():
        got = conn.execute("SELECT manna_crypt.decrypt_gcm(tok, id::text) FROM items WHERE id = %s", (i,)).fetchone()[0]
        if got != p or not after[i].startswith("mc1:"):
            wrong.append(i)
    assert wrong == [], f"rows not converted exactly: {wrong}"
    # with another AAD they do not decrypt: the AAD really is the id
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT manna_crypt.decrypt_gcm(tok, (id + 1)::text) FROM items WHERE id = 1")
    assert e.value.sqlstate == "39000"
    # already mc1: skipped, byte for byte; NULLs stay NULL; bad rows untouched
    assert [i for i in mc1 if after[i] != before[i]] == []
    assert [i for i in nulls if after[i] is not None] == []
    assert [i for i in bad if after[i] != before[i]] == []
    # the optimistic-lock version is not bumped by re-encryption
    versions_after = dict(conn.execute("SELECT id, version FROM items").fetchall())
    assert versions_after == versions_before

    run_id, status, converted, failed, other_keyring, _ = last_run(conn, "items")
    assert (status, converted, failed, other_keyring) == ("done", len(expect), len(bad), 0)
    recorded = conn.execute(
        "SELECT row_key, value_class, value_length FROM manna_crypt.reencrypt_failures WHERE run_id = %s",
        (run_id,),
    ).fetchall()
    assert sorted(int(k) for k, _, _ in recorded) == sorted(bad)
    assert all(length == len(before[int(k)].encode()) for k, _, length in recorded)

    # progress: a start line, progress lines only every few seconds (not one
    # per batch: test_reencrypt_reporting.py), then a summary that adds up
    assert "run " in msgs[0] and "started" in msgs[0]
    summary = [m for m in msgs if " done in " in m]
    assert len(summary) == 1 and msgs[-1] == summary[0]
    assert f"{len(expect)} converted" in summary[0]
    assert f"{len(mc1)} already in target form" in summary[0]
    assert f"{len(bad)} left untouched" in summary[0]
    assert f"{len(nulls)} null" in summary[0]
    total = len(expect) + len(mc1) + len(bad) + len(nulls)
    assert f": {total} rows: " in summary[0]

    # column_status agrees
    st = status_counts(conn, "items")
    target_key = conn.execute(
        "SELECT key_id FROM manna_crypt.keys WHERE keyring = %s AND status = 'active'", (TARGET,)
    ).fetchone()[0]
    assert st[("mc1", target_key)] == len(expect) + len(mc1)
    assert st[("null", None)] == len(nulls)
    assert sum(n for (c, _), n in st.items() if c in ("fernet", "plaintext", "malformed")) == len(bad)

    # a rerun converts nothing and changes nothing
    conn.execute(f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', aad_column => 'id')")
    notices.take()
    assert last_run(conn, "items")[2] == 0
    assert snapshot(conn, "items") == after


def test_dry_run_writes_nothing(conn, keys, legacy):
    rng = random.Random(11)
    expect, bad, _, _ = _populate_mixed(conn, keys, rng, n_tokens=15)
    before = snapshot(conn, "items")
    runs_before = conn.execute("SELECT count(*) FROM manna_crypt.reencrypt_runs").fetchone()[0]
    fails_before = conn.execute("SELECT count(*) FROM manna_crypt.reencrypt_failures").fetchone()[0]
    size_before = conn.execute("SELECT pg_relation_size('items')").fetchone()[0]
    xmins_before = conn.execute("SELECT array_agg(xmin::text ORDER BY id) FROM items").fetchone()[0]
    notices = Notices(conn)
    conn.execute(
        f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', batch_size => 5, aad_column => 'id', dry_run => true)"
    )
    msgs = notices.take()
    assert snapshot(conn, "items") == before
    # not even a no-op rewrite of a tuple
    assert conn.execute("SELECT array_agg(xmin::text ORDER BY id) FROM items").fetchone()[0] == xmins_before
    assert conn.execute("SELECT pg_relation_size('items')").fetchone()[0] == size_before
    # the implementation records no run and no failure for a dry run
    assert conn.execute("SELECT count(*) FROM manna_crypt.reencrypt_runs").fetchone()[0] == runs_before
    assert conn.execute("SELECT count(*) FROM manna_crypt.reencrypt_failures").fetchone()[0] == fails_before
    # ... but reports what it would do
    final = msgs[-1]
    assert final.startswith("dry run:") and "nothing was written" in final
    assert f"would convert {len(expect)} values" in final
    assert f"{len(bad)} cannot be converted" in final
    assert all(m.startswith("dry run:") for m in msgs if "% of ~" in m)
    # and the advisory lock was released: a real run can start at once
    conn.execute("SET client_min_messages = warning")
    conn.execute(f"CALL manna_crypt.migrate_fernet('items', 'tok', '{LEGACY}', '{TARGET}', aad_column => 'id')")
    assert last_run(conn, "items")[2] == len(expect)


# ---------------------------------------------------------------------------
# progress visible to others; one run per column at a time
# ---------------------------------------------------------------------------


def test_progress_visible_and_one_run_per_column(fresh_db, keys):
    n = 20_000
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, keys[0].decode()))
        c.execute("SELECT manna_crypt.create_keyring(%s)", (TARGET,))
        c.execute("CREATE TABLE big (id int PRIMARY KEY, tok text, tok2 text)")
        f = Fernet(keys[0])
        with c.cursor().copy("COPY big (id, tok, tok2) FROM STDIN") as cp:
            for i in range(n):
                t = f.encrypt(b"access-sandbox-%d" % i).decode()
                cp.write_row((i, t, t))
        c.execute("ANALYZE big")

    result = {}

    def runner():
        try:
            with connect(fresh_db) as rc:
                rc.execute("SET client_min_messages = warning")
                result["pid"] = rc.info.backend_pid
                rc.execute(f"CALL manna_crypt.migrate_fernet('big', 'tok', '{LEGACY}', '{TARGET}', batch_size => 20)")
        except BaseException as e:  # reported by the main thread
            result["error"] = e

    th = threading.Thread(target=runner)
    th.start()
    seen = []
    try:
        with connect(fresh_db) as obs:
            deadline = time.time() + 60
            while time.time() < deadline and th.is_alive():
                row = obs.execute(
                    "SELECT status, converted, percent_of_pass, rows_per_second, pid "
                    "FROM manna_crypt.reencrypt_progress WHERE tbl = 'big'::regclass AND col = 'tok'"
                ).fetchone()
                if row and row[0] == "running" and row[1] > 0:
                    seen.append(row)
                    if len(seen) >= 3:
                        break
                time.sleep(0.05)
            assert len(seen) >= 3, "no running progress observed from another session"
            assert seen[0][4] == result.get("pid")
            assert seen[-1][1] >= seen[0][1] and seen[0][1] < n
            # a second run on the same column is refused while the first runs
            with pytest.raises(psycopg.Error) as e:
                obs.execute(f"CALL manna_crypt.migrate_fernet('big', 'tok', '{LEGACY}', '{TARGET}')")
            assert e.value.sqlstate == "55P03"
            with pytest.raises(psycopg.Error) as e:
                obs.execute(f"CALL manna_crypt.rewrap_column('big', 'tok', '{TARGET}')")
            assert e.value.sqlstate == "55P03"
            assert th.is_alive(), "the first run finished too early for the concurrency check"
            # another column of the same table is not blocked
            obs.execute("SET client_min_messages = warning")
            obs.execute(f"CALL manna_crypt.migrate_fernet('big', 'tok2', '{LEGACY}', '{TARGET}', batch_size => 5000)")
    finally:
        th.join(timeout=300)
    assert not th.is_alive()
    assert "error" not in result, f"first run failed: {type(result.get('error')).__name__}"
    with connect(fresh_db) as c:
        st = c.execute(
            "SELECT category, sum(n) FROM manna_crypt.column_status('big', 'tok') GROUP BY 1"
        ).fetchall()
        assert st == [("mc1", n)]
        assert c.execute(
            "SELECT category, sum(n) FROM manna_crypt.column_status('big', 'tok2') GROUP BY 1"
        ).fetchall() == [("mc1", n)]
        assert c.execute(
            "SELECT count(*) FROM big WHERE manna_crypt.decrypt_gcm(tok) <> 'access-sandbox-' || id"
        ).fetchone()[0] == 0
        done = c.execute(
            "SELECT status, converted FROM manna_crypt.reencrypt_runs WHERE tbl = 'big'::regclass AND col = 'tok' ORDER BY run_id"
        ).fetchall()
        assert done == [("done", n)]
        # rerun after completion converts 0
        c.execute("SET client_min_messages = warning")
        c.execute(f"CALL manna_crypt.migrate_fernet('big', 'tok', '{LEGACY}', '{TARGET}')")
        assert last_run(c, "big")[2] == 0


# ---------------------------------------------------------------------------
# optimistic locking, rewrap, key retirement
# ---------------------------------------------------------------------------


def test_reencryption_does_not_bump_version(conn, keys, legacy):
    f = Fernet(keys[1])
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, tok text, version bigint)")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('acct')")
    with conn.cursor().copy("COPY acct (id, tok, version) FROM STDIN") as cp:
        for i in range(50):
            cp.write_row((i, f.encrypt(b"v%d" % i).decode(), 7))
    conn.execute("SET client_min_messages = warning")
    conn.execute(f"CALL manna_crypt.migrate_fernet('acct', 'tok', '{LEGACY}', '{TARGET}', batch_size => 10)")
    assert conn.execute("SELECT count(*) FROM acct WHERE version <> 7").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM acct WHERE tok LIKE 'mc1:%'").fetchone()[0] == 50
    conn.execute("SELECT manna_crypt.rotate_keyring(%s)", (TARGET,))
    conn.execute(f"CALL manna_crypt.rewrap_column('acct', 'tok', '{TARGET}', 10)")
    assert conn.execute("SELECT count(*) FROM acct WHERE version <> 7").fetchone()[0] == 0
    assert conn.execute("SELECT last_run.converted FROM (SELECT converted FROM manna_crypt.reencrypt_runs "
                        "WHERE tbl = 'acct'::regclass ORDER BY run_id DESC LIMIT 1) last_run").fetchone()[0] == 50
    # a plain UPDATE does bump it
    conn.execute("UPDATE acct SET tok = manna_crypt.encrypt_gcm('new', %s) WHERE id = 3", (TARGET,))
    assert conn.execute("SELECT version FROM acct WHERE id = 3").fetchone()[0] == 8
    assert conn.execute("SELECT count(*) FROM acct WHERE version <> 7").fetchone()[0] == 1


def test_rewrap_then_revoke_and_destroy(conn, keys, legacy):
    v1 = legacy
    conn.execute("CREATE TABLE secrets (id int PRIMARY KEY, tok text)")
    conn.execute(
        "INSERT INTO secrets SELECT i, manna_crypt.encrypt_gcm('s' || i, %s, i::text) FROM generate_series(1, 30) i",
        (TARGET,),
    )
    conn.execute("INSERT INTO secrets VALUES (31, NULL), (32, 'plain')")
    conn.execute("SELECT manna_crypt.register_column('secrets', 'tok')")
    v2 = conn.execute("SELECT manna_crypt.rotate_keyring(%s)", (TARGET,)).fetchone()[0]
    conn.execute(
        "INSERT INTO secrets SELECT i, manna_crypt.encrypt_gcm('s' || i, %s, i::text) FROM generate_series(33, 40) i",
        (TARGET,),
    )
    assert status_counts(conn, "secrets") == {
        ("mc1", v1): 30, ("mc1", v2): 8, ("null", None): 1, ("plaintext", None): 1,
    }
    # v1 still in use: revoke and destroy refused without force
    for sql in ("SELECT manna_crypt.revoke_key(%s)",):
        with pytest.raises(psycopg.Error) as e:
            conn.execute(sql, (v1,))
        assert e.value.sqlstate == "55000"
    assert conn.execute("SELECT status FROM manna_crypt.keys WHERE key_id = %s", (v1,)).fetchone()[0] == "decrypt_only"

    before = snapshot(conn, "secrets")
    conn.execute("SET client_min_messages = warning")
    conn.execute(f"CALL manna_crypt.rewrap_column('secrets', 'tok', '{TARGET}', 7, 'id')")
    after = snapshot(conn, "secrets")
    assert status_counts(conn, "secrets") == {
        ("mc1", v2): 38, ("null", None): 1, ("plaintext", None): 1,
    }
    # values already under v2 were not rewritten; v1 values were
    assert [i for i in range(33, 41) if after[i] != before[i]] == []
    assert [i for i in range(1, 31) if after[i] == before[i]] == []
    assert after[32] == "plain" and after[31] is None
    assert conn.execute(
        "SELECT count(*) FROM secrets WHERE id <= 40 AND id NOT IN (31, 32) AND manna_crypt.decrypt_gcm(tok, id::text) <> 's' || id"
    ).fetchone()[0] == 0
    # now v1 can be revoked and destroyed without force
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (v1,))
    conn.execute("SELECT manna_crypt.destroy_key(%s)", (v1,))
    assert conn.execute("SELECT status FROM manna_crypt.keys WHERE key_id = %s", (v1,)).fetchone()[0] == "destroyed"
    # v2 is in use: refused unless forced, for revoke and then destroy
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT manna_crypt.revoke_key(%s)", (v2,))
    assert e.value.sqlstate == "55000"
    conn.execute("SELECT manna_crypt.revoke_key(%s, force => true)", (v2,))
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT manna_crypt.destroy_key(%s)", (v2,))
    assert e.value.sqlstate == "55000"
    assert conn.execute("SELECT status FROM manna_crypt.keys WHERE key_id = %s", (v2,)).fetchone()[0] == "revoked"
    conn.execute("SELECT manna_crypt.destroy_key(%s, true)", (v2,))
    assert conn.execute("SELECT status FROM manna_crypt.keys WHERE key_id = %s", (v2,)).fetchone()[0] == "destroyed"
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT manna_crypt.decrypt_gcm(tok, id::text) FROM secrets WHERE id = 1")
    assert e.value.sqlstate == "55000"


def test_procedure_in_transaction_block_fails(fresh_db, keys):
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, keys[0].decode()))
        c.execute("SELECT manna_crypt.create_keyring(%s)", (TARGET,))
        c.execute("CREATE TABLE t (id int, tok text)")
        tok = Fernet(keys[0]).encrypt(b"x").decode()
        c.execute("INSERT INTO t VALUES (1, %s)", (tok,))
    with connect(fresh_db, autocommit=False) as c:
        with pytest.raises(psycopg.Error) as e:
            c.execute(f"CALL manna_crypt.migrate_fernet('t', 'tok', '{LEGACY}', '{TARGET}')")
        assert e.value.sqlstate == "25001"
        c.rollback()
    with connect(fresh_db) as c:
        assert c.execute("SELECT tok FROM t").fetchone()[0] == tok
        assert c.execute("SELECT count(*) FROM manna_crypt.reencrypt_runs").fetchone()[0] == 0
