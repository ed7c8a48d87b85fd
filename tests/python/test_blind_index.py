"""Blind indexes (README "Blind indexes"): keyed HMAC-SHA256 terms of
normalized values under a keyring's index keys, kept by the protect trigger,
backfilled in place, rotated without a lookup ever missing a row, used by the
planner as index conditions, surviving pg_dump/restore.
"""

import hashlib
import hmac
import os
import threading
import time
from pathlib import Path

import psycopg
import pytest

from conftest import connect, new_role, sqlstate
from mc_cluster import Cluster, new_root_key, unwrap_data_key, wrapped_keys

pytestmark = pytest.mark.all_versions

DOMAIN_LABEL = b"manna_crypt/blind-index/v1"
TAGS = {"none": b"n1", "lower": b"l1", "email": b"e1", "digits": b"d1"}


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def reference_term(key: bytes, key_id: int, keyring: str, normalization: str, value: str, bits=256) -> bytes:
    """The term as README documents it, computed with Python's hmac."""
    name = keyring.encode()
    domain = (DOMAIN_LABEL + bytes([len(name)]) + name).ljust(128, b"\0")
    norm = {
        "none": value,
        "lower": value.lower(),
        "email": value.strip().lower(),
        "digits": "".join(ch for ch in value if ch in "0123456789"),
    }[normalization]
    mac = hmac.new(key, domain + TAGS[normalization] + norm.encode(), hashlib.sha256).digest()
    return b"\x01" + key_id.to_bytes(4, "big") + TAGS[normalization][:1] + mac[: bits // 8]


def root_key() -> str:
    return (Path(os.environ["MC_CLUSTER_DIR"]) / "keys" / "root.key").read_text().strip()


@pytest.fixture
def users(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    conn.execute("CREATE TABLE users (id bigint PRIMARY KEY, email text, email_bidx bytea)")
    conn.execute("CREATE INDEX ON users (email_bidx)")
    conn.execute(
        "SELECT manna_crypt.protect_column('users', 'email', 'pii', 'id', "
        "blind_index_column => 'email_bidx', normalization => 'email')"
    )
    return conn


def lookup(conn, value, normalization="email", bits=256):
    return sorted(
        r[0]
        for r in conn.execute(
            "SELECT id FROM users WHERE email_bidx = ANY(manna_crypt.blind_index_all(%s, 'pii', %s, %s))",
            (value, normalization, bits),
        )
    )


def test_terms_follow_the_documented_construction(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    key_id = one(conn, "SELECT manna_crypt.rotate_index_key('pii')")
    assert one(conn, "SELECT purpose FROM manna_crypt.keys WHERE key_id = %s", (key_id,)) == "index"
    key = unwrap_data_key(root_key(), key_id, wrapped_keys(conn, key_id)[key_id])
    samples = {
        "none": [" A@X.io ", "", "ünïcödé"],
        "lower": ["ÄÖÜ Straße", "MiXeD"],
        "email": ["  Alice@Example.COM\t", "bob@x.io"],
        "digits": ["123-45-6789", "+1 (555) 010-1234", "no digits"],
    }
    for normalization, values in samples.items():
        for v in values:
            got = bytes(one(conn, "SELECT manna_crypt.blind_index(%s, 'pii', %s)", (v, normalization)))
            assert got == reference_term(key, key_id, "pii", normalization, v), (normalization, v)
    got = bytes(one(conn, "SELECT manna_crypt.blind_index('x', 'pii', 'none', 32)"))
    assert got == reference_term(key, key_id, "pii", "none", "x", 32) and len(got) == 10
    # Normalized forms compare equal; the exact form does not.
    assert one(conn, "SELECT manna_crypt.blind_index(' A@x.IO', 'pii', 'email') = "
                     "manna_crypt.blind_index('a@x.io', 'pii', 'email')")
    assert not one(conn, "SELECT manna_crypt.blind_index('A', 'pii') = manna_crypt.blind_index('a', 'pii')")
    assert one(conn, "SELECT manna_crypt.blind_normalize('  A@X.io ', 'email')") == "a@x.io"
    assert one(conn, "SELECT manna_crypt.blind_index(NULL, 'pii')") is None


def test_bad_arguments_have_their_sqlstates(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    assert sqlstate(conn, "SELECT manna_crypt.blind_index('x', 'pii')") == "55000"  # no index key yet
    conn.execute("SELECT manna_crypt.rotate_index_key('pii')")
    assert sqlstate(conn, "SELECT manna_crypt.blind_index('x', 'pii', 'upper')") == "22023"
    for bits in (0, 12, 264, -8):
        assert sqlstate(conn, "SELECT manna_crypt.blind_index('x', 'pii', 'none', %s)", (bits,)) == "22023"
    assert sqlstate(conn, "SELECT manna_crypt.blind_index('x', 'nope')") == "42704"
    assert sqlstate(conn, "SELECT manna_crypt.blind_index('x', NULL)") == "22023"
    conn.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", ("A" * 43 + "=",))
    assert sqlstate(conn, "SELECT manna_crypt.rotate_index_key('legacy')") == "22023"


def test_keyrings_are_separate_domains_and_keys_separate_kinds(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    conn.execute("SELECT manna_crypt.create_keyring('pii2')")
    idx = one(conn, "SELECT manna_crypt.rotate_index_key('pii')")
    conn.execute("SELECT manna_crypt.rotate_index_key('pii2')")
    a = bytes(one(conn, "SELECT manna_crypt.blind_index('same', 'pii')"))
    b = bytes(one(conn, "SELECT manna_crypt.blind_index('same', 'pii2')"))
    assert a[6:] != b[6:]
    # An index key never decrypts: a ciphertext naming it is refused.
    ct = one(conn, "SELECT manna_crypt.encrypt_gcm('x'::text, 'pii'::text)::text")
    import base64

    env = bytearray(base64.b64decode(ct[4:]))
    env[1:5] = idx.to_bytes(4, "big")
    forged = "mc1:" + base64.b64encode(bytes(env)).decode()
    assert sqlstate(conn, "SELECT manna_crypt.decrypt_gcm(%s::manna_crypt.encrypted_text)", (forged,)) == "22023"
    # A data key never indexes: relabelled as an index key, it does not
    # unwrap (the wrap binds the kind).
    conn.execute("SELECT manna_crypt.create_keyring('k3')")
    conn.execute(
        "UPDATE manna_crypt.data_keys SET purpose = 'index' WHERE keyring_id = "
        "(SELECT keyring_id FROM manna_crypt.keyrings WHERE name = 'k3')"
    )
    assert sqlstate(conn, "SELECT manna_crypt.blind_index('x', 'k3')") == "39000"


def test_rotate_keyring_leaves_the_index_key_alone(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    idx = one(conn, "SELECT manna_crypt.rotate_index_key('pii')")
    before = bytes(one(conn, "SELECT manna_crypt.blind_index('v', 'pii')"))
    conn.execute("SELECT manna_crypt.rotate_keyring('pii')")
    assert bytes(one(conn, "SELECT manna_crypt.blind_index('v', 'pii')")) == before
    rows = conn.execute(
        "SELECT purpose, status, count(*) FROM manna_crypt.keys WHERE keyring = 'pii' "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    assert rows == [("data", "active", 1), ("data", "decrypt_only", 1), ("index", "active", 1)]
    assert one(conn, "SELECT status FROM manna_crypt.keys WHERE key_id = %s", (idx,)) == "active"


def test_trigger_keeps_the_index_column(users):
    c = users
    c.execute("INSERT INTO users VALUES (1, '  Alice@Example.com ', '\\xdeadbeef'), (2, NULL, '\\x00')")
    term = lambda v: bytes(one(c, "SELECT manna_crypt.blind_index(%s, 'pii', 'email')", (v,)))
    row = lambda i: c.execute("SELECT email, email_bidx FROM users WHERE id = %s", (i,)).fetchone()
    # The writer's value is replaced by the term of the plaintext.
    assert bytes(row(1)[1]) == term("alice@example.com") and row(1)[0].startswith("mc1:")
    assert row(2) == (None, None)
    assert lookup(c, "ALICE@example.com") == [1]
    # Editing the index column directly puts the right term back.
    c.execute("UPDATE users SET email_bidx = '\\x01' WHERE id = 1")
    assert bytes(row(1)[1]) == term("alice@example.com")
    # A new value, a NULL, a changed AAD (re-bound, same plaintext).
    c.execute("UPDATE users SET email = 'bob@x.io' WHERE id = 1")
    assert bytes(row(1)[1]) == term("bob@x.io")
    c.execute("UPDATE users SET id = 10 WHERE id = 1")
    assert bytes(row(10)[1]) == term("bob@x.io")
    assert one(c, "SELECT manna_crypt.decrypt_gcm(email::manna_crypt.encrypted_text, '10') FROM users WHERE id = 10") == "bob@x.io"
    c.execute("UPDATE users SET email = NULL WHERE id = 10")
    assert row(10) == (None, None)
    # A ciphertext written as it is (a restore, a copy bound to the same AAD
    # value) is decrypted to compute its term.
    ct = one(c, "SELECT manna_crypt.encrypt_gcm('carol@x.io'::text, 'pii'::text, '3')::text")
    c.execute("INSERT INTO users VALUES (3, %s, NULL)", (ct,))
    assert row(3) == (ct, term("carol@x.io"))
    # ... and one that does not decrypt under the row's AAD is refused.
    assert sqlstate(c, "INSERT INTO users VALUES (4, %s, NULL)", (ct,)) == "39000"
    # An upsert that lands on an existing row indexes the value it stores.
    c.execute("INSERT INTO users VALUES (3, 'dave@x.io', NULL) "
              "ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email")
    assert bytes(row(3)[1]) == term("dave@x.io")
    assert lookup(c, "dave@x.io") == [3] and lookup(c, "carol@x.io") == []


def test_protect_column_checks_the_index_column(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, email text, bidx text, b bytea)")
    base = "SELECT manna_crypt.protect_column('t', 'email', 'pii', 'id', blind_index_column => %s"
    assert sqlstate(conn, base + ")", ("bidx",)) == "42804"
    assert sqlstate(conn, base + ")", ("email",)) == "22023"
    assert sqlstate(conn, base + ")", ("nope",)) == "42703"
    assert sqlstate(conn, base + ", normalization => 'upper')", ("b",)) == "22023"
    assert sqlstate(conn, base + ", bits => 7)", ("b",)) == "22023"
    conn.execute(base + ", normalization => 'digits', bits => 64)", ("b",))
    got = conn.execute("SELECT col, keyring, aad_column, blind_index_column, normalization, bits "
                       "FROM manna_crypt.protected_columns()").fetchall()
    assert got == [("email", "pii", "id", "b", "digits", 64)]
    # The first blind index created the keyring's index key.
    assert one(conn, "SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'pii' AND purpose = 'index'") == 1


def fill(conn, n, start=1):
    conn.execute(
        "INSERT INTO users (id, email) SELECT g, 'user' || g || '@Example.com' "
        "FROM generate_series(%s::int8, %s::int8) g",
        (start, start + n - 1),
    )


def plan(conn, sql, params, mode):
    conn.execute(f"SET plan_cache_mode = {mode}")
    try:
        return "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))
    finally:
        conn.execute("RESET plan_cache_mode")


def test_equality_lookups_are_index_conditions(users):
    c = users
    fill(c, 20000)
    c.execute("ANALYZE users")
    with c.cursor() as cur:
        for sql in (
            "SELECT id FROM users WHERE email_bidx = manna_crypt.blind_index(%s, 'pii', 'email')",
            "SELECT id FROM users WHERE email_bidx = ANY(manna_crypt.blind_index_all(%s, 'pii', 'email'))",
        ):
            for mode in ("force_custom_plan", "force_generic_plan"):
                # A bind parameter (extended protocol), as drivers send it.
                text = plan(c, sql, ("user77@example.com",), mode)
                assert "Index Cond: (email_bidx = " in text, text
                assert "Seq Scan" not in text, text
            got = [r[0] for r in cur.execute(sql, ("USER77@example.com",), prepare=True)]
            assert got == [77]


def test_truncated_terms_collide_and_the_recheck_resolves_them(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    conn.execute("CREATE TABLE users (id bigint PRIMARY KEY, email text, email_bidx bytea)")
    conn.execute("SELECT manna_crypt.protect_column('users', 'email', 'pii', 'id', "
                 "blind_index_column => 'email_bidx', normalization => 'email', bits => 8)")
    fill(conn, 600)
    # 600 values in 256 buckets: collisions are certain.
    assert one(conn, "SELECT max(n) FROM (SELECT count(*) n FROM users GROUP BY email_bidx) s") > 1
    for i in (1, 99, 600):
        v = f"User{i}@example.com"
        candidates = lookup(conn, v, "email", 8)
        assert i in candidates
        exact = [r[0] for r in conn.execute(
            "SELECT id FROM users WHERE email_bidx = ANY(manna_crypt.blind_index_all(%s, 'pii', 'email', 8)) "
            "AND manna_crypt.blind_normalize(manna_crypt.decrypt_gcm(email::manna_crypt.encrypted_text, "
            "id::text), 'email') = manna_crypt.blind_normalize(%s, 'email')", (v, v))]
        assert exact == [i]


def old_terms(conn, key_id):
    prefix = b"\x01" + key_id.to_bytes(4, "big")
    return one(conn, "SELECT count(*) FROM users WHERE substr(email_bidx, 1, 5) = %s", (prefix,))


def test_rotation_never_misses_a_row_and_retiring_waits_for_the_backfill(users, fresh_db):
    c = users
    n = 3000
    fill(c, n)
    old = one(c, "SELECT key_id FROM manna_crypt.keys WHERE keyring = 'pii' AND purpose = 'index'")
    new = one(c, "SELECT manna_crypt.rotate_index_key('pii')")
    assert old_terms(c, old) == n
    # Retiring the old key is refused while rows still carry it.
    assert sqlstate(c, "SELECT manna_crypt.revoke_key(%s)", (old,)) == "55000"

    stop = threading.Event()
    misses, lookups, written = [], [0], []

    def reader():
        with connect(fresh_db) as r:
            i = 1000
            while not stop.is_set():
                # Rows 1000..n: the writer below never changes them.
                i = 1000 + (i - 1000 + 37) % (n - 1000)
                got = [x[0] for x in r.execute(
                    "SELECT id FROM users WHERE email_bidx = ANY(manna_crypt.blind_index_all(%s, 'pii', 'email'))",
                    (f"USER{i}@example.com",))]
                lookups[0] += 1
                if got != [i]:
                    misses.append((i, got))

    def writer():
        with connect(fresh_db) as w:
            k = n + 1
            while not stop.is_set():
                w.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (k, f"new{k}@x.io"))
                w.execute("UPDATE users SET email = %s WHERE id = %s", (f"moved{k}@x.io", k % 200 + 1))
                written.append(k)
                k += 1

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        c.execute("CALL manna_crypt.backfill_blind_index('users', 'email', batch_size => 100)")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert lookups[0] > 10 and written
    assert misses == []
    # Every row carries the new key's term; rows rewritten by the writer
    # during the backfill were indexed by the trigger.
    assert old_terms(c, old) == 0
    total = one(c, "SELECT count(*) FROM users")
    assert old_terms(c, new) == total
    for k in written:
        assert lookup(c, f"new{k}@x.io") == [k]
    last = written[-1]
    assert lookup(c, f"moved{last}@x.io") == [last % 200 + 1]
    # Now the old key can go, and lookups no longer need it.
    c.execute("SELECT manna_crypt.revoke_key(%s)", (old,))
    c.execute("SELECT manna_crypt.destroy_key(%s)", (old,))
    assert one(c, "SELECT cardinality(manna_crypt.blind_index_all('x', 'pii'))") == 1
    assert lookup(c, "user2500@example.com") == [2500]


def test_backfill_reports_progress_and_failures(users):
    c = users
    c.execute("ALTER TABLE users DISABLE TRIGGER zz_manna_crypt_protect")
    ct = one(c, "SELECT manna_crypt.encrypt_gcm('x@y.z'::text, 'pii'::text, '1')::text")
    c.execute("INSERT INTO users VALUES (1, %s, NULL), (2, %s, NULL)", (ct, ct))  # row 2: wrong AAD
    c.execute("ALTER TABLE users ENABLE TRIGGER zz_manna_crypt_protect")
    dry = one(c, "CALL manna_crypt.backfill_blind_index('users', 'email', dry_run => true)")
    assert one(c, "SELECT count(*) FROM users WHERE email_bidx IS NOT NULL") == 0
    run = one(c, "CALL manna_crypt.backfill_blind_index('users', 'email')")
    assert dry is None and run > 0
    assert lookup(c, "X@Y.Z") == [1]
    failures = c.execute("SELECT row_key, reason FROM manna_crypt.reencrypt_failures WHERE run_id = %s",
                         (run,)).fetchall()
    assert [f[0] for f in failures] == ["2"] and "x@y.z" not in failures[0][1]
    assert sqlstate(c, "CALL manna_crypt.backfill_blind_index('users', 'email', raise_on_failure => true)") == "22000"
    assert sqlstate(c, "CALL manna_crypt.backfill_blind_index('users', 'id')") == "22023"


def test_dump_and_restore_keeps_lookups_working(tmp_path):
    key = new_root_key()
    with Cluster("bidx_src", root_key=key) as src, Cluster("bidx_dst", root_key=key) as dst:
        src.create_db_with_extension("app")
        with src.connect("app") as c:
            c.execute("SELECT manna_crypt.create_keyring('pii')")
            c.execute("CREATE TABLE users (id bigint PRIMARY KEY, email text, email_bidx bytea)")
            c.execute("CREATE INDEX ON users (email_bidx)")
            c.execute("SELECT manna_crypt.protect_column('users', 'email', 'pii', 'id', "
                      "blind_index_column => 'email_bidx', normalization => 'email')")
            fill(c, 200)
        dump = tmp_path / "app.dump"
        src.pg_tool("pg_dump", "-Fc", "-f", str(dump), "app")
        with dst.connect() as c:
            c.execute("CREATE DATABASE app")
        dst.pg_tool("pg_restore", "--exit-on-error", "-d", "app", str(dump))
        with dst.connect("app") as c:
            assert lookup(c, "User150@EXAMPLE.com") == [150]
            c.execute("INSERT INTO users (id, email) VALUES (1000, 'after@restore.io')")
            assert lookup(c, "after@restore.io") == [1000]
            assert c.execute("SELECT blind_index_column FROM manna_crypt.protected_columns()").fetchone() == ("email_bidx",)


def test_retiring_waits_for_transactions_older_than_the_rotation(users, fresh_db):
    """A REPEATABLE READ transaction that began before the rotation still
    sees the old index key as active: were the key retired under it, the
    terms it writes would be unfindable. The retirement waits for it."""
    c = users
    fill(c, 10)
    old = one(c, "SELECT key_id FROM manna_crypt.keys WHERE keyring = 'pii' AND purpose = 'index'")
    with connect(fresh_db, autocommit=False) as long_tx:
        long_tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        long_tx.execute("SELECT count(*) FROM users").fetchone()
        c.execute("SELECT manna_crypt.rotate_index_key('pii')")
        c.execute("CALL manna_crypt.backfill_blind_index('users', 'email')")
        assert old_terms(c, old) == 0
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT manna_crypt.revoke_key(%s)", (old,))
        assert e.value.sqlstate == "55000" and "older than the rotation" in e.value.diag.message_primary
        # What it would have done: a term under the old key.
        long_tx.execute("INSERT INTO users (id, email) VALUES (99, 'late@x.io')")
        long_tx.commit()
    assert old_terms(c, old) == 1
    # Still in use now: the count refuses, a backfill fixes it, then it goes.
    assert sqlstate(c, "SELECT manna_crypt.revoke_key(%s)", (old,)) == "55000"
    c.execute("CALL manna_crypt.backfill_blind_index('users', 'email')")
    c.execute("SELECT manna_crypt.revoke_key(%s)", (old,))
    assert lookup(c, "late@x.io") == [99]


def test_blind_index_calls_are_counted_per_role(users, fresh_db):
    """The key_access view (README "Who used which key") counts terms
    computed: lookups, the trigger's and the backfill's."""
    c = users
    fill(c, 5)
    for i in range(7):
        lookup(c, f"user{i}@example.com")
    with connect(fresh_db) as other:  # a new transaction: the counts are handed over at its end
        rows = other.execute(
            "SELECT operation, sum(calls)::int FROM manna_crypt.key_access "
            "WHERE keyring = 'pii' GROUP BY 1 ORDER BY 1").fetchall()
    got = dict(rows)
    # 5 rows written by the trigger (one term each) and 7 lookups, each of
    # which the planner may evaluate once more to estimate its selectivity
    # (a custom plan folds a STABLE call with its parameter).
    assert 5 + 7 <= got.get("blind_index", 0) <= 5 + 2 * 7, got
    assert got.get("encrypt") == 5 and "decrypt" not in got, got


def test_blind_index_needs_its_keyring_privilege(users, fresh_db):
    """README "Keyring access": computing a term needs `blind_index` on the
    keyring — in a lookup, in a write the trigger indexes, in a backfill
    (checked for the caller, before the switch to the table's owner) and in
    a re-encryption of an indexed column."""
    c = users
    c.execute("SELECT manna_crypt.create_keyring('other')")
    c.execute("SELECT manna_crypt.rotate_index_key('other')")
    fill(c, 3)
    owner = new_role(c)
    c.execute(f'ALTER TABLE users OWNER TO "{owner}"')
    reader, writer, admin = new_role(c), new_role(c), new_role(c)
    for r in (reader, writer):
        c.execute(f'GRANT manna_crypt_user TO "{r}"')
        c.execute(f'GRANT SELECT, INSERT, UPDATE ON users TO "{r}"')
    c.execute(f'GRANT manna_crypt_user TO "{admin}"')
    c.execute(f'GRANT SELECT, UPDATE ON users TO "{admin}"')
    grant = "SELECT manna_crypt.grant_keyring_access(%s, %s, %s)"
    c.execute(grant, ("pii", reader, "decrypt"))
    c.execute(grant, ("pii", writer, "encrypt"))
    lookup_sql = "SELECT manna_crypt.blind_index_all('user1@example.com', 'pii', 'email')"
    with connect(fresh_db, user=reader) as r:
        e = sqlstate(r, lookup_sql)
        assert e == "42501"
        assert sqlstate(r, "SELECT manna_crypt.blind_index('x', 'pii')") == "42501"
        # An unknown keyring stays unknown; the value is never in the message.
        assert sqlstate(r, "SELECT manna_crypt.blind_index('x', 'nope')") == "42704"
        with pytest.raises(psycopg.Error) as err:
            r.execute("SELECT manna_crypt.blind_index('secret-value-77', 'pii')")
        assert "secret-value-77" not in str(err.value) and "blind_index" in str(err.value)
    c.execute(grant, ("pii", reader, "blind_index"))
    with connect(fresh_db, user=reader) as r:
        assert r.execute("SELECT id FROM users WHERE email_bidx = ANY("
                         "manna_crypt.blind_index_all('user1@example.com', 'pii', 'email'))").fetchall() == [(1,)]
        assert sqlstate(r, "SELECT manna_crypt.blind_index('x', 'other')") == "42501"
    # A write to the indexed column: encrypt alone is not enough.
    with connect(fresh_db, user=writer) as w:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            w.execute("INSERT INTO users (id, email) VALUES (50, 'w@x.io')")
        assert "no blind_index privilege on keyring" in str(err.value)
    c.execute(grant, ("pii", writer, "blind_index"))
    with connect(fresh_db, user=writer) as w:
        w.execute("INSERT INTO users (id, email) VALUES (50, 'w@x.io')")
    assert lookup(c, "w@x.io") == [50]
    # The backfill, by a role that may run it (EXECUTE granted) on a table it
    # does not own: the caller needs decrypt and blind_index; the owner none.
    for r in ("_reencrypt_run", "backfill_blind_index"):
        c.execute(f'GRANT EXECUTE ON PROCEDURE manna_crypt.{r} TO "{admin}"')
    for f in ("_reencrypt_start", "_reencrypt_step", "_reencrypt_finish", "_reencrypt_result"):
        c.execute(f'GRANT EXECUTE ON FUNCTION manna_crypt.{f} TO "{admin}"')
    c.execute("SELECT manna_crypt.rotate_index_key('pii')")
    backfill = "CALL manna_crypt.backfill_blind_index('users', 'email')"
    with connect(fresh_db, user=admin) as a:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            a.execute(backfill)
        assert "no decrypt privilege on keyring" in str(err.value)
    c.execute(grant, ("pii", admin, "decrypt"))
    with connect(fresh_db, user=admin) as a:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            a.execute(backfill)
        assert "no blind_index privilege on keyring" in str(err.value)
    c.execute(grant, ("pii", admin, "blind_index"))
    with connect(fresh_db, user=admin) as a:
        a.execute(backfill)
    new = one(c, "SELECT key_id FROM manna_crypt.keys WHERE keyring = 'pii' AND purpose = 'index' "
                 "AND status = 'active'")
    assert old_terms(c, new) == one(c, "SELECT count(*) FROM users")
    # A re-encryption of the indexed column: its writes are indexed for the
    # caller too.
    c.execute(f'GRANT EXECUTE ON PROCEDURE manna_crypt.rewrap_column('
              f'regclass, name, text, integer, name, boolean, bigint, boolean) TO "{admin}"')
    c.execute(grant, ("pii", admin, "encrypt"))
    c.execute("SELECT manna_crypt.revoke_keyring_access('pii', %s, 'blind_index')", (admin,))
    c.execute("SELECT manna_crypt.rotate_keyring('pii')")
    rewrap = "CALL manna_crypt.rewrap_column('users', 'email', 'pii')"
    with connect(fresh_db, user=admin) as a:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            a.execute(rewrap)
        assert "no blind_index privilege on keyring" in str(err.value)
    c.execute(grant, ("pii", admin, "blind_index"))
    with connect(fresh_db, user=admin) as a:
        a.execute(rewrap)
    assert lookup(c, "user2@example.com") == [2]
