"""Protected columns (README "Protected columns"): plaintext written to the
column is encrypted by a trigger under the keyring, bound to the row's AAD
column; ciphertexts are kept on INSERT (restores) and must decrypt under the
row's AAD on UPDATE; malformed ciphertexts are refused; a change of the AAD
column re-binds the value; an upsert binds it to the row it lands in; a
bypassed trigger meets a CHECK that never prints the row.
"""

import subprocess
import uuid

import psycopg
import pytest

from conftest import connect, create_database, dsn, new_role, sqlstate

pytestmark = pytest.mark.all_versions

SECRET = "plaid-access-sandbox-4f1c"


@pytest.fixture
def items(conn):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    conn.execute(
        "CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "email text UNIQUE, token text)"
    )
    conn.execute("SELECT manna_crypt.protect_column('items', 'token', 'pii', 'id')")
    return conn


def plain(conn, id_):
    return conn.execute(
        "SELECT manna_crypt.decrypt_gcm(token, id::text) FROM items WHERE id = %s", (id_,)
    ).fetchone()[0]


def stored(conn, id_):
    return conn.execute("SELECT token FROM items WHERE id = %s", (id_,)).fetchone()[0]


def test_batched_inserts_with_identity_ids_are_encrypted_under_their_row(items):
    c = items
    with c.cursor() as cur:
        cur.executemany(
            "INSERT INTO items (email, token) VALUES (%s, %s)",
            [(f"u{i}@x", f"{SECRET}-{i}") for i in range(50)],
        )
    c.execute("INSERT INTO items (email, token) SELECT 'bulk' || g, 'bulk-' || g FROM generate_series(1, 20) g")
    rows = c.execute("SELECT id, email, token FROM items ORDER BY id").fetchall()
    assert len(rows) == 70
    for id_, email, token in rows:
        assert token.startswith("mc1:") and SECRET not in token
        want = f"{SECRET}-{int(email[1:-2])}" if email.startswith("u") else "bulk-" + email[4:]
        assert plain(c, id_) == want
        # Bound to its own row: another row's id does not open it.
        assert sqlstate(c, "SELECT manna_crypt.decrypt_gcm(%s, %s)", (token, str(id_ + 1))) == "39000"
    assert c.execute("SELECT count(*) FROM items WHERE token IS NULL").fetchone()[0] == 0
    c.execute("INSERT INTO items (email, token) VALUES ('n', NULL)")
    assert c.execute("SELECT token FROM items WHERE email = 'n'").fetchone()[0] is None


def test_ciphertext_kept_on_insert_and_malformed_refused(items):
    c = items
    c.execute("INSERT INTO items (email, token) VALUES ('a', %s)", (SECRET,))
    ct = stored(c, 1)
    # A restore or COPY writes the ciphertext back as it is.
    c.execute("DELETE FROM items")
    c.execute("INSERT INTO items (id, email, token) OVERRIDING SYSTEM VALUE VALUES (1, 'a', %s)", (ct,))
    assert stored(c, 1) == ct and plain(c, 1) == SECRET
    # `col || 'x'` is an error, never a ciphertext of the damaged value.
    e = sqlstate(c, "UPDATE items SET token = token || 'x' WHERE id = 1")
    assert e == "22P02"
    assert stored(c, 1) == ct
    assert sqlstate(c, "INSERT INTO items (email, token) VALUES ('b', 'mc1:not-base64!')") == "22P02"


def test_update_copying_another_rows_ciphertext_is_refused(items):
    c = items
    c.execute("INSERT INTO items (email, token) VALUES ('a', 'one'), ('b', 'two')")
    assert sqlstate(c, "UPDATE items SET token = (SELECT token FROM items WHERE id = 2) WHERE id = 1") == "39000"
    assert plain(c, 1) == "one"
    # Writing the plaintext works, and so does re-saving the same value.
    c.execute("UPDATE items SET token = 'two' WHERE id = 1")
    c.execute("UPDATE items SET token = token, email = 'a2' WHERE id = 1")
    assert plain(c, 1) == "two"


def test_changing_the_aad_column_rebinds_the_value(items):
    c = items
    c.execute("CREATE TABLE accounts (id int PRIMARY KEY, secret text)")
    c.execute("CREATE TABLE sub (account int REFERENCES accounts ON UPDATE CASCADE, secret text)")
    c.execute("SELECT manna_crypt.protect_column('accounts', 'secret', 'pii', 'id')")
    c.execute("SELECT manna_crypt.protect_column('sub', 'secret', 'pii', 'account')")
    c.execute("INSERT INTO accounts VALUES (1, 'acct-secret')")
    c.execute("INSERT INTO sub VALUES (1, 'sub-secret')")
    c.execute("UPDATE accounts SET id = 7 WHERE id = 1")
    assert c.execute("SELECT manna_crypt.decrypt_gcm(secret, id::text) FROM accounts").fetchone()[0] == "acct-secret"
    # ON UPDATE CASCADE changed sub.account: its value was re-bound too.
    assert c.execute("SELECT account, manna_crypt.decrypt_gcm(secret, account::text) FROM sub").fetchone() == (7, "sub-secret")


def test_upsert_with_another_conflict_target_binds_to_the_target_row(items):
    c = items
    c.execute("INSERT INTO items (email, token) VALUES ('a@x', 'first')")
    c.execute(
        "INSERT INTO items (email, token) VALUES ('a@x', 'second') "
        "ON CONFLICT (email) DO UPDATE SET token = EXCLUDED.token"
    )
    # The proposed row used up id 2; the value landed in row 1, bound to 1.
    assert c.execute("SELECT id FROM items").fetchall() == [(1,)]
    assert plain(c, 1) == "second"
    with c.cursor() as cur:
        cur.executemany(
            "INSERT INTO items (email, token) VALUES (%s, %s) "
            "ON CONFLICT (email) DO UPDATE SET token = EXCLUDED.token",
            [("a@x", "third"), ("b@x", "bee"), ("b@x", "bee2")],
        )
    assert plain(c, 1) == "third"
    bid = c.execute("SELECT id FROM items WHERE email = 'b@x'").fetchone()[0]
    assert plain(c, bid) == "bee2"


def test_bypassed_trigger_meets_a_check_that_never_prints_the_row(items):
    c = items
    c.execute("SET session_replication_role = replica")
    try:
        c.execute("INSERT INTO items (email, token) VALUES ('a', %s)", (SECRET,))
    except psycopg.Error as e:
        assert e.sqlstate == "23514"
        text = " ".join(filter(None, [e.diag.message_primary, e.diag.message_detail, e.diag.message_hint]))
        assert SECRET not in text and "Failing row" not in text
        assert "token" in e.diag.message_primary
    else:
        raise AssertionError("plaintext stored with the trigger bypassed")
    finally:
        c.execute("RESET session_replication_role")
    c.execute("ALTER TABLE items DISABLE TRIGGER zz_manna_crypt_protect")
    assert sqlstate(c, "INSERT INTO items (email, token) VALUES ('a', %s)", (SECRET,)) == "23514"


def test_renamed_columns_fail_loudly_never_with_an_empty_aad(items):
    c = items
    c.execute("INSERT INTO items (email, token) VALUES ('a', 'x')")
    c.execute("ALTER TABLE items RENAME COLUMN id TO item_id")
    assert sqlstate(c, "INSERT INTO items (email, token) VALUES ('b', 'y')") == "42703"
    c.execute("ALTER TABLE items RENAME COLUMN item_id TO id")
    c.execute("ALTER TABLE items RENAME COLUMN token TO access_token")
    assert sqlstate(c, "INSERT INTO items (email, access_token) VALUES ('b', 'y')") == "42703"
    c.execute("SELECT manna_crypt.unprotect_column('items', 'token')")
    c.execute("SELECT manna_crypt.protect_column('items', 'access_token', 'pii', 'id')")
    c.execute("INSERT INTO items (email, access_token) VALUES ('b', 'y')")
    assert c.execute(
        "SELECT manna_crypt.decrypt_gcm(access_token, id::text) FROM items WHERE email = 'b'"
    ).fetchone()[0] == "y"


def test_setup_refuses_what_would_not_work(conn):
    c = conn
    c.execute("SELECT manna_crypt.create_keyring('pii')")
    c.execute("SELECT manna_crypt.import_fernet_key('legacy', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=')")
    c.execute(
        "CREATE TABLE t (id int PRIMARY KEY, at timestamptz, f float8, g int GENERATED ALWAYS AS (id * 2) STORED, "
        "u uuid, v varchar(10), e manna_crypt.encrypted_text, s text)"
    )
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', 'pii', 'at')") == "42804"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', 'pii', 'f')") == "42804"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', 'pii', 'g')") == "22023"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', 'pii', 's')") == "22023"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', 'pii', 'nope')") == "42703"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 'v', 'pii', 'id')") == "42804"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 'e', 'pii', 'id')") == "42804"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', 'nokeyring', 'id')") == "42704"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', 'legacy', 'id')") == "22023"
    assert sqlstate(c, "SELECT manna_crypt.protect_column('t', 's', NULL, 'id')") == "22023"
    assert sqlstate(c, "SELECT manna_crypt._protect()") == "39P01"
    # uuid AAD works, in its canonical text form.
    c.execute("SELECT manna_crypt.protect_column('t', 's', 'pii', 'u')")
    c.execute("INSERT INTO t (id, u, s) VALUES (1, 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 'x')")
    assert c.execute("SELECT manna_crypt.decrypt_gcm(s, u::text) FROM t").fetchone()[0] == "x"
    assert sqlstate(c, "INSERT INTO t (id, s) VALUES (2, 'y')") == "22004"


def test_owner_only_and_idempotent(items, fresh_db):
    c = items
    other = new_role(c)
    c.execute(f'GRANT manna_crypt_user TO "{other}"')
    c.execute(f'GRANT ALL ON items TO "{other}"')
    with connect(fresh_db, user=other) as o:
        assert sqlstate(o, "SELECT manna_crypt.protect_column('items', 'email', 'pii', 'id')") == "42501"
        assert sqlstate(o, "SELECT manna_crypt.unprotect_column('items', 'token')") == "42501"
        # A writer needs encrypt on the column's keyring (README "Keyring
        # access"), and no EXECUTE on any manna_crypt function.
        assert sqlstate(o, "INSERT INTO items (email, token) VALUES ('o', 'from other')") == "42501"
        c.execute(f"SELECT manna_crypt.grant_keyring_access('pii', '{other}', 'encrypt')")
        c.execute(f'REVOKE manna_crypt_user FROM "{other}"')
        o.execute("INSERT INTO items (email, token) VALUES ('o', 'from other')")
    args = lambda: c.execute(
        "SELECT tgargs FROM pg_trigger WHERE tgrelid = 'items'::regclass"
    ).fetchall()
    before = args()
    c.execute("SELECT manna_crypt.protect_column('items', 'token', 'pii', 'id')")
    assert args() == before
    assert c.execute(
        "SELECT count(*) FROM manna_crypt.registered_columns WHERE col = 'token'"
    ).fetchone()[0] == 1
    c.execute("SELECT manna_crypt.unprotect_column('items', 'token')")
    assert args() == []
    assert c.execute(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'items'::regclass AND contype = 'c'"
    ).fetchone()[0] == 0
    c.execute("INSERT INTO items (email, token) VALUES ('p', 'plain now')")
    assert stored(c, c.execute("SELECT id FROM items WHERE email = 'p'").fetchone()[0]) == "plain now"


def test_user_triggers_named_before_ours_run_first(items):
    c = items
    c.execute(
        "CREATE FUNCTION fill() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN NEW.token := coalesce(NEW.token, 'filled-' || NEW.email); RETURN NEW; END $$"
    )
    c.execute("CREATE TRIGGER fill_token BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION fill()")
    c.execute("INSERT INTO items (email) VALUES ('q')")
    assert stored(c, 1).startswith("mc1:") and plain(c, 1) == "filled-q"


def test_existing_plaintext_then_encrypt_column_then_validate(conn):
    c = conn
    c.execute("SELECT manna_crypt.create_keyring('pii')")
    c.execute("CREATE TABLE legacy (id int PRIMARY KEY, token text)")
    c.execute("INSERT INTO legacy SELECT g, 'old-' || g FROM generate_series(1, 300) g")
    notices = []
    c.add_notice_handler(lambda d: notices.append(d.message_primary))
    c.execute("SELECT manna_crypt.protect_column('legacy', 'token', 'pii', 'id')")
    assert any("still holds values that are not ciphertexts" in n for n in notices)
    assert c.execute(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = 'legacy'::regclass AND contype = 'c'"
    ).fetchone()[0] is False
    c.execute("INSERT INTO legacy VALUES (301, 'new')")
    # The procedure uses the protected column's AAD without being told.
    c.execute("CALL manna_crypt.encrypt_column('legacy', 'token', 'pii')")
    c.execute("ALTER TABLE legacy VALIDATE CONSTRAINT manna_crypt_protected_token")
    rows = c.execute("SELECT id, manna_crypt.decrypt_gcm(token, id::text) FROM legacy ORDER BY id").fetchall()
    assert rows[0] == (1, "old-1") and rows[-1] == (301, "new") and len(rows) == 301
    assert sqlstate(c, "CALL manna_crypt.rewrap_column('legacy', 'token', 'pii', aad_column => 'token')") == "22023"


def _dump(db, *args):
    from conftest import HOST, PORT
    import os

    bindir = os.environ.get("MC_PG_BIN", "")
    cmd = [os.path.join(bindir, "pg_dump") if bindir else "pg_dump", "-h", HOST, "-p", PORT, "-d", db, *args]
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def _restore(db, sql: bytes):
    from conftest import HOST, PORT
    import os

    bindir = os.environ.get("MC_PG_BIN", "")
    cmd = [os.path.join(bindir, "psql") if bindir else "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
           "-h", HOST, "-p", PORT, "-d", db]
    r = subprocess.run(cmd, input=sql, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]


def test_dump_and_restore_never_encrypt_twice(items, fresh_db):
    c = items
    c.execute("INSERT INTO items (email, token) VALUES ('a', 'alpha'), ('b', 'beta')")
    # A value under a key that is later destroyed must survive a restore.
    c.execute("SELECT manna_crypt.rotate_keyring('pii')")
    c.execute("UPDATE items SET token = 'beta2' WHERE id = 2")
    c.execute("INSERT INTO items (email, token) VALUES ('c', 'gamma')")
    old_key = c.execute("SELECT manna_crypt.key_id(token) FROM items WHERE id = 1").fetchone()[0]
    c.execute("SELECT manna_crypt.revoke_key(%s, force => true)", (old_key,))
    c.execute("SELECT manna_crypt.destroy_key(%s, force => true)", (old_key,))
    before = c.execute("SELECT id, token FROM items ORDER BY id").fetchall()
    # Full restore: the trigger is created after the data.
    full = "r_" + uuid.uuid4().hex[:10]
    with connect("postgres") as p:
        p.execute(f'CREATE DATABASE "{full}"')
    try:
        _restore(full, _dump(fresh_db))
        with connect(full) as r:
            assert r.execute("SELECT id, token FROM items ORDER BY id").fetchall() == before
            assert [x[0] for x in r.execute(
                "SELECT manna_crypt.decrypt_gcm(token, id::text) FROM items WHERE id > 1 ORDER BY id"
            )] == ["beta2", "gamma"]
            # Row 1 is under the destroyed key: kept, and refused as before.
            assert sqlstate(r, "SELECT manna_crypt.decrypt_gcm(token, id::text) FROM items WHERE id = 1") == "55000"
    finally:
        with connect("postgres") as p:
            p.execute(f'DROP DATABASE IF EXISTS "{full}" WITH (FORCE)')
    # Data-only restore into the schema (trigger present, fires on COPY),
    # the table loaded before the key tables.
    data_db = "d_" + uuid.uuid4().hex[:10]
    create_database(data_db)
    try:
        _restore(data_db, _dump(fresh_db, "--schema-only", "--exclude-schema=manna_crypt"))
        data = _dump(fresh_db, "--data-only", "-t", "public.items")
        _restore(data_db, data)
        with connect(data_db) as r:
            assert r.execute("SELECT id, token FROM items ORDER BY id").fetchall() == before
    finally:
        with connect("postgres") as p:
            p.execute(f'DROP DATABASE IF EXISTS "{data_db}" WITH (FORCE)')


def test_concurrent_writers_during_migrate_fernet_on_a_protected_column(fresh_db):
    """The Fernet → GCM switch on a live table: the new application writes
    plaintext to the protected column while migrate_fernet converts the old
    tokens in batches. Every row ends up a ciphertext bound to its id that
    decrypts to the last value written (by the migration or a writer)."""
    import random
    import threading

    from cryptography.fernet import Fernet

    fkey = Fernet.generate_key()
    f = Fernet(fkey)
    n = 3000
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.create_keyring('tokens')")
        c.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", (fkey.decode(),))
        c.execute("CREATE TABLE plaid (id int PRIMARY KEY, token text)")
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO plaid VALUES (%s, %s)",
                [(i, f.encrypt(f"orig-{i}".encode()).decode()) for i in range(1, n + 1)],
            )
        c.execute("SELECT manna_crypt.protect_column('plaid', 'token', 'tokens', 'id')")
    expected = {i: f"orig-{i}" for i in range(1, n + 1)}
    done = threading.Event()
    errors, writes = [], []

    def writer(seed):
        rnd = random.Random(seed)
        try:
            with connect(fresh_db) as w:
                k = 0
                while not done.is_set():
                    i = rnd.randrange(seed, n + 1, 2)
                    value = f"new-{seed}-{k}"
                    w.execute("UPDATE plaid SET token = %s WHERE id = %s", (value, i))
                    expected[i] = value
                    k += 1
                    writes.append(1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    # Each writer owns its rows' final value only through `expected`, so give
    # each writer disjoint rows: seed-parity picks even or odd ids.
    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    try:
        with connect(fresh_db) as m:
            m.execute("CALL manna_crypt.migrate_fernet('plaid', 'token', 'legacy', 'tokens', batch_size => 200)")
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    with connect(fresh_db) as c:
        rows = dict(c.execute("SELECT id, manna_crypt.decrypt_gcm(token, id::text) FROM plaid").fetchall())
        failures = c.execute("SELECT count(*) FROM manna_crypt.reencrypt_failures").fetchone()[0]
        c.execute("ALTER TABLE plaid VALIDATE CONSTRAINT manna_crypt_protected_token")
    assert failures == 0
    assert len(writes) > 20, "the writers did not overlap the migration"
    assert rows == expected


def test_non_ascii_column_names_survive_a_second_protect(conn):
    """The trigger's arguments are read back when another column is
    protected; names outside ASCII must come back as they were."""
    c = conn
    c.execute("SELECT manna_crypt.create_keyring('pii')")
    c.execute('CREATE TABLE kunden (nr int PRIMARY KEY, "straße" text, "e-mail\\\\x" text)')
    c.execute("""SELECT manna_crypt.protect_column('kunden', 'straße', 'pii', 'nr')""")
    c.execute("""SELECT manna_crypt.protect_column('kunden', 'e-mail\\\\x', 'pii', 'nr')""")
    c.execute("""INSERT INTO kunden VALUES (1, 'Hauptstraße 1', 'a@x')""")
    row = c.execute(
        """SELECT manna_crypt.decrypt_gcm("straße", nr::text), manna_crypt.decrypt_gcm("e-mail\\\\x", nr::text)
             FROM kunden"""
    ).fetchone()
    assert row == ("Hauptstraße 1", "a@x")
    c.execute("""SELECT manna_crypt.unprotect_column('kunden', 'straße')""")
    c.execute("""INSERT INTO kunden VALUES (2, 'plain street', 'b@x')""")
    assert c.execute("""SELECT "straße" FROM kunden WHERE nr = 2""").fetchone()[0] == "plain street"
    assert c.execute("""SELECT manna_crypt.decrypt_gcm("e-mail\\\\x", nr::text) FROM kunden WHERE nr = 2""").fetchone()[0] == "b@x"
