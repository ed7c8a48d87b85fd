"""The root key (docs/DESIGN.md section 2): where it comes from, how a bad one is
refused (58P01 / 58030 / F0000), who may see or set it, and root-key
rotation with rewrap_keys(). Runs on a cluster of its own, since it changes
the server's configuration.
"""

import hashlib
import hmac
import uuid

import psycopg
import pytest

from mc_cluster import (
    Cluster,
    error_text,
    expect_error,
    key_forms,
    new_root_key,
    unwrap_data_key,
    wrapped_keys,
)

E = expect_error
ROOT_SETTINGS = (
    "manna_crypt.root_key_file",
    "manna_crypt.root_key_command",
    "manna_crypt.previous_root_key_file",
    "manna_crypt.previous_root_key_command",
    "session_preload_libraries",
)


def fingerprint(key_hex: str) -> str:
    mac = hmac.new(bytes.fromhex(key_hex), b"manna_crypt/root-key-fingerprint/v1", hashlib.sha256)
    return mac.hexdigest()[:16]


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


@pytest.fixture(scope="module")
def rk():
    """A cluster with no root key configured, and a second LOGIN role."""
    with Cluster("rootkey") as c:
        c.key_a = new_root_key()
        c.file_a = c.write_key_file("a.key", c.key_a + "\n")
        c.create_db_with_extension("base")  # creates the manna_crypt roles
        with c.connect() as x:
            x.execute("CREATE ROLE lowly LOGIN")
            x.execute("GRANT manna_crypt_user TO lowly")
        yield c


def set_root(c: Cluster, **settings):
    """Replaces every root key setting with `settings` (dotted names may be
    written with '__') and reloads; new sessions see the result."""
    c.configure(**{k: None for k in ROOT_SETTINGS})
    c.configure(**settings)
    c.reload()


@pytest.fixture
def db(rk):
    name = "r_" + uuid.uuid4().hex[:10]
    rk.create_db_with_extension(name)
    yield name
    with rk.connect() as x:
        x.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def refused(c, db, sqlstate, secret_texts=()):
    """A new session's first key operation fails with `sqlstate`; the error
    shows none of `secret_texts`. Returns the error."""
    with c.connect(db) as x:
        e = E(x, sqlstate, "SELECT manna_crypt.create_keyring('r')")
        text = error_text(e)
        for s in secret_texts:
            assert s not in text, "secret text in the error"
        return e


# ---- where the root key comes from ----------------------------------------------------


def test_not_configured(rk, db):
    set_root(rk)
    e = refused(rk, db, "58P01")
    assert "not configured" in e.diag.message_primary
    with rk.connect(db) as x:
        info = one(x, "SELECT manna_crypt.info()")
        assert info["root_key"]["configured"] is False
        E(x, "58P01", "SELECT manna_crypt.rewrap_keys()")
        # Raw-key functions need no root key.
        ct = one(x, "SELECT manna_crypt.encrypt_gcm('x'::text, %s::bytea)", (b"k" * 32,))
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text, %s::bytea)", (ct, b"k" * 32)) == "x"


def test_file_works(rk, db):
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        x.execute("SELECT manna_crypt.create_keyring('r')")
        ct = one(x, "SELECT manna_crypt.encrypt_gcm('ok'::text, 'r'::text)")
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "ok"
        root = one(x, "SELECT manna_crypt.info()")["root_key"]
    assert root["configured"] and root["source"] == "file"
    assert root["fingerprint"] == fingerprint(rk.key_a)
    assert root["matches_stored_keys"] is True and root["rotation_pending"] is False


def test_file_missing(rk, db):
    set_root(rk, manna_crypt__root_key_file=str(rk.keys / "nope.key"))
    e = refused(rk, db, "58P01")
    assert "does not exist" in e.diag.message_primary


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_file_permissions(rk, db, mode):
    path = rk.write_key_file(f"perm_{mode:o}.key", rk.key_a, mode=mode)
    set_root(rk, manna_crypt__root_key_file=str(path))
    e = refused(rk, db, "58030", key_forms(bytes.fromhex(rk.key_a)))
    assert "group or world" in e.diag.message_primary


def test_file_wrong_owner(rk, db):
    path = rk.write_key_file("rootowned.key", rk.key_a, owner_uid=0)
    set_root(rk, manna_crypt__root_key_file=str(path))
    e = refused(rk, db, "58030", key_forms(bytes.fromhex(rk.key_a)))
    assert "not owned" in e.diag.message_primary


def test_file_is_a_directory(rk, db):
    set_root(rk, manna_crypt__root_key_file=str(rk.keys))
    refused(rk, db, "58030")


@pytest.mark.parametrize(
    "content",
    [
        "",
        "zz" * 32,                      # not hex
        "ab" * 31 + "a",                # 63 characters
        "ab" * 33,                      # 66 characters
        "ab" * 16,                      # 16 bytes: AES-128, not a root key
        "ab" * 16 + " " + "ab" * 16,    # embedded space
        "0x" + "ab" * 32,
    ],
)
def test_file_bad_content(rk, db, content):
    path = rk.write_key_file("bad.key", content)
    set_root(rk, manna_crypt__root_key_file=str(path))
    e = refused(rk, db, "58030", [content] if len(content) >= 32 else [])
    assert "root key" in e.diag.message_primary


def test_both_file_and_command(rk, db):
    script = rk.write_script("ok.sh", f"echo {rk.key_a}\n")
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a), manna_crypt__root_key_command=str(script))
    e = refused(rk, db, "58030")
    assert "both" in e.diag.message_primary


def test_command_works(rk, db):
    script = rk.write_script("ok.sh", f"echo {rk.key_a}\n")
    set_root(rk, manna_crypt__root_key_command=str(script))
    with rk.connect(db) as x:
        kid = one(x, "SELECT manna_crypt.create_keyring('r')")
        ct = one(x, "SELECT manna_crypt.encrypt_gcm('cmd'::text, 'r'::text)")
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "cmd"
        root = one(x, "SELECT manna_crypt.info()")["root_key"]
        wrapped = wrapped_keys(x, kid)[kid]
    assert root["source"] == "command" and root["fingerprint"] == fingerprint(rk.key_a)
    # The command's key is the one the data key is wrapped under.
    assert len(unwrap_data_key(rk.key_a, kid, wrapped)) == 32
    # The same key from a file opens the same keys.
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "cmd"


@pytest.mark.parametrize(
    "body",
    [
        "echo {key} >&2\nexit 1\n",          # fails; the key on stderr must not surface
        "echo {key}\nexit 3\n",              # prints a key but fails
        "echo not-a-key\n",                  # succeeds with garbage
        "exit 0\n",                          # succeeds with nothing
    ],
)
def test_command_fails(rk, db, body):
    other = new_root_key()
    script = rk.write_script("bad.sh", body.format(key=other))
    set_root(rk, manna_crypt__root_key_command=str(script))
    refused(rk, db, "58030", key_forms(bytes.fromhex(other)))
    assert other not in rk.log_text()


def test_command_not_found(rk, db):
    set_root(rk, manna_crypt__root_key_command=str(rk.keys / "missing.sh"))
    refused(rk, db, "58030")


# ---- who sees and sets the settings -----------------------------------------------------


def test_non_superuser_cannot_set_or_see_settings(rk, db):
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db, user="lowly") as x:
        # Load the library in this session (a function PUBLIC may call), so
        # the settings are defined, then try them.
        assert one(x, "SELECT manna_crypt.is_encrypted('x')") is False
        for name in ROOT_SETTINGS[:4]:
            E(x, "42501", f"SET {name} = '/tmp/x'")
            E(x, "42501", f"SHOW {name}")
            E(x, "42501", "SELECT current_setting(%s)", (name,))
            E(x, "42501", "SELECT set_config(%s, '/tmp/x', false)", (name,))
        assert one(x, "SELECT count(*) FROM pg_settings WHERE name LIKE 'manna_crypt.%%'") == 0
        # Still working with the server's key.
        assert one(x, "SELECT manna_crypt.is_encrypted(manna_crypt.encrypt_gcm('x'::text, %s::bytea))",
                   (b"k" * 32,)) is True
    with rk.connect(db) as su:
        su.execute("SELECT manna_crypt.is_encrypted('x')")  # loads the library
        assert one(su, "SELECT setting FROM pg_settings WHERE name = 'manna_crypt.root_key_file'") \
            == str(rk.file_a)


def test_placeholder_set_before_load_is_discarded(rk, db):
    """A non-superuser cannot choose the root key command: with the library
    preloaded (required since 0.2.0) the settings exist from server start
    and SET is refused; without preloading, a placeholder SET before the
    library loads is thrown away when it loads (and no root key is used at
    all: see test_root_shared.py::test_not_preloaded_is_refused_with_a_hint)."""
    marker = rk.keys / "pwned"
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as su:
        su.execute("SELECT manna_crypt.create_keyring('r')")
        su.execute("SELECT manna_crypt.grant_keyring_access('r', 'lowly', 'all')")
    with rk.connect(db, user="lowly") as x:
        E(x, "42501", f"SET manna_crypt.root_key_command = 'touch {marker}; echo {new_root_key()}'")
        E(x, "42501", "SET manna_crypt.root_key_file = ''")
        ct = one(x, "SELECT manna_crypt.encrypt_gcm('x'::text, 'r'::text)")
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "x"
    assert not marker.exists()
    rk.configure(shared_preload_libraries="")
    rk.restart()
    try:
        with rk.connect(db, user="lowly") as x:
            x.execute(f"SET manna_crypt.root_key_command = 'touch {marker}; echo {new_root_key()}'")
            x.execute("SET manna_crypt.root_key_file = ''")
            E(x, "55000", "SELECT manna_crypt.encrypt_gcm('x'::text, 'r'::text)")
            # Loaded now: the settings are superuser-only again.
            E(x, "42501", "SHOW manna_crypt.root_key_command")
        assert not marker.exists()
    finally:
        rk.configure(shared_preload_libraries="manna_crypt")
        rk.restart()


def test_settings_hidden_with_preloaded_library(rk, db):
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a), session_preload_libraries="manna_crypt")
    try:
        with rk.connect(db, user="lowly") as x:
            E(x, "42501", "SHOW manna_crypt.root_key_file")
            E(x, "42501", "SHOW manna_crypt.root_key_command")
    finally:
        set_root(rk, manna_crypt__root_key_file=str(rk.file_a))


# ---- a wrong root key ------------------------------------------------------------------


def test_wrong_root_key_after_keys_exist(rk, db):
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        x.execute("SELECT manna_crypt.create_keyring('r')")
        ct = one(x, "SELECT manna_crypt.encrypt_gcm('under a'::text, 'r'::text)")
    key_b = new_root_key()
    file_b = rk.write_key_file("b_wrong.key", key_b)
    rk.configure(**{"manna_crypt.root_key_file": str(file_b)})
    rk.restart()
    try:
        with rk.connect(db) as x:
            secrets_ = key_forms(bytes.fromhex(rk.key_a)) + key_forms(bytes.fromhex(key_b))
            for sql, params in [
                ("SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)),
                ("SELECT manna_crypt.encrypt_gcm('x'::text, 'r'::text)", None),
                ("SELECT manna_crypt.create_keyring('r2')", None),
                ("SELECT manna_crypt.rotate_keyring('r')", None),
                ("SELECT manna_crypt.rewrap_keys()", None),
            ]:
                e = E(x, "F0000", sql, params)
                assert e.diag.message_primary == "root key does not match"
                # The detail names both fingerprints, never a key.
                assert fingerprint(key_b) in e.diag.message_detail
                assert fingerprint(rk.key_a) in e.diag.message_detail
                text = error_text(e)
                assert not any(s in text for s in secrets_), "key material in the error"
            root = one(x, "SELECT manna_crypt.info()")["root_key"]
            assert root["matches_stored_keys"] is False and root["error"] == "root key does not match"
            # A wrong previous key does not help either.
            assert one(x, "SELECT count(*) FROM manna_crypt.keys") == 1
        assert rk.key_a not in rk.log_text() and key_b not in rk.log_text()
    finally:
        set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "under a"


# ---- root-key rotation ------------------------------------------------------------------


def test_root_key_rotation(rk, db):
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    values = {}
    with rk.connect(db) as x:
        x.execute("SELECT manna_crypt.create_keyring('r1')")
        x.execute("SELECT manna_crypt.create_keyring('r2')")
        for i in range(3):
            values[one(x, "SELECT manna_crypt.encrypt_gcm(%s::text, 'r1'::text)", (f"one-{i}",))] = f"one-{i}"
        old = one(x, "SELECT manna_crypt.rotate_keyring('r1')")
        values[one(x, "SELECT manna_crypt.encrypt_gcm('two'::text, 'r2'::text, 'aad')")] = "two"
        values[one(x, "SELECT manna_crypt.encrypt_gcm('new'::text, 'r1'::text)")] = "new"
        # A destroyed key has nothing to re-wrap.
        gone = one(x, "SELECT manna_crypt.create_keyring('r3')")
        x.execute("SELECT manna_crypt.revoke_key(%s)", (gone,))
        x.execute("SELECT manna_crypt.destroy_key(%s)", (gone,))
        n_keys = one(x, "SELECT count(*) FROM manna_crypt.data_keys WHERE wrapped IS NOT NULL")
        assert n_keys == 3 and old > 0
        before = wrapped_keys(x)
        rows_before = one(x, "SELECT count(*) FROM manna_crypt.audit_log")

    def check_all(conn):
        for ct, pt in values.items():
            aad = "aad" if pt == "two" else None
            assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text, %s)", (ct, aad)) == pt

    key_b = new_root_key()
    file_b = rk.write_key_file("b.key", key_b)
    # Step 1: the new key, with the old one as previous. Everything still works.
    set_root(rk, manna_crypt__root_key_file=str(file_b), manna_crypt__previous_root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        check_all(x)
        root = one(x, "SELECT manna_crypt.info()")["root_key"]
        assert root["fingerprint"] == fingerprint(key_b)
        assert root["previous_configured"] is True and root["rotation_pending"] is True
        assert one(x, "SELECT manna_crypt.rewrap_keys()") == n_keys
        check_all(x)
        root = one(x, "SELECT manna_crypt.info()")["root_key"]
        assert root["rotation_pending"] is False and root["matches_stored_keys"] is True
        fps = {r[0] for r in x.execute("SELECT root_fingerprint FROM manna_crypt.keys WHERE status <> 'destroyed'")}
        assert fps == {fingerprint(key_b)}
        after = wrapped_keys(x)
        entry = x.execute(
            "SELECT role_name, detail FROM manna_crypt.audit_log WHERE event = 'rewrap_keys' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        assert one(x, "SELECT count(*) FROM manna_crypt.audit_log") == rows_before + 1
    assert entry is not None
    assert entry[1]["keys"] == n_keys
    assert entry[1]["from_root"] == fingerprint(rk.key_a) and entry[1]["to_root"] == fingerprint(key_b)
    # Same data keys, new wrapping: open under B only.
    assert set(after) == set(before)
    for kid in before:
        assert bytes(after[kid]) != bytes(before[kid])
        assert unwrap_data_key(key_b, kid, after[kid]) == unwrap_data_key(rk.key_a, kid, before[kid])
        with pytest.raises(Exception):
            unwrap_data_key(rk.key_a, kid, after[kid])

    # Step 2: drop the previous key. Everything decrypts under B alone.
    set_root(rk, manna_crypt__root_key_file=str(file_b))
    with rk.connect(db) as x:
        check_all(x)
        assert one(x, "SELECT manna_crypt.rewrap_keys()") == 0
        # New keys are wrapped under B too.
        x.execute("SELECT manna_crypt.rotate_keyring('r2')")
        ct = one(x, "SELECT manna_crypt.encrypt_gcm('after'::text, 'r2'::text)")
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "after"
        assert one(x, "SELECT count(*) FROM manna_crypt.audit_log WHERE event = 'rewrap_keys'") == 1

    # The old key alone no longer matches.
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        E(x, "F0000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (next(iter(values)),))
    log = rk.log_text()
    assert rk.key_a not in log and key_b not in log


def test_rewrap_session_that_cached_keys_before_reload(rk, db):
    """A session that cached the old root key and data keys keeps working
    across the root key change and a rewrap done by another session."""
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    key_b = new_root_key()
    file_b = rk.write_key_file("b2.key", key_b)
    with rk.connect(db) as old_session:
        old_session.execute("SELECT manna_crypt.create_keyring('r')")
        ct = one(old_session, "SELECT manna_crypt.encrypt_gcm('kept'::text, 'r'::text)")
        assert one(old_session, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "kept"
        set_root(rk, manna_crypt__root_key_file=str(file_b), manna_crypt__previous_root_key_file=str(rk.file_a))
        with rk.connect(db) as y:
            assert one(y, "SELECT manna_crypt.rewrap_keys()") == 1
        set_root(rk, manna_crypt__root_key_file=str(file_b))
        # The old session, after the reload and the rewrap: new keys it
        # creates must be wrapped under B, and everything still decrypts.
        assert one(old_session, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "kept"
        old_session.execute("SELECT manna_crypt.rotate_keyring('r')")
        ct2 = one(old_session, "SELECT manna_crypt.encrypt_gcm('new'::text, 'r'::text)")
    with rk.connect(db) as z:
        assert one(z, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct2,)) == "new"
        fps = {r[0] for r in z.execute("SELECT root_fingerprint FROM manna_crypt.keys")}
        assert fps == {fingerprint(key_b)}


def test_key_created_concurrently_with_rewrap(rk, db):
    """A key created while rewrap_keys() runs must end up under the new root
    key: either the rewrap waits for it and re-wraps it, or its creation
    waits for the rewrap and wraps it under the new key."""
    import threading

    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        x.execute("SELECT manna_crypt.create_keyring('first')")
    key_b = new_root_key()
    file_b = rk.write_key_file("b3.key", key_b)
    set_root(rk, manna_crypt__root_key_file=str(file_b), manna_crypt__previous_root_key_file=str(rk.file_a))

    def in_thread(fn):
        out = {}

        def run():
            try:
                out["result"] = fn()
            except Exception as e:  # reported by the assertions below
                out["error"] = e
        t = threading.Thread(target=run)
        t.start()
        return t, out

    def rewrap():
        with rk.connect(db) as y:
            return one(y, "SELECT manna_crypt.rewrap_keys()")

    # 1. A key creation is open when the rewrap starts: the rewrap waits.
    with rk.connect(db, autocommit=False) as x:
        one(x, "SELECT manna_crypt.create_keyring('during')")
        ct = one(x, "SELECT manna_crypt.encrypt_gcm('early'::text, 'during'::text)")
        t, out = in_thread(rewrap)
        t.join(0.5)
        assert t.is_alive(), "rewrap_keys() did not wait for the open key creation"
        x.commit()
    t.join(30)
    assert out.get("result") == 2, out.get("error")

    # 2. A rewrap is open when a key is created: the creation waits and
    #    wraps under the new key.
    with rk.connect(db) as x:
        x.execute("SELECT manna_crypt.rotate_keyring('first')")  # wrapped under B now
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a), manna_crypt__previous_root_key_file=str(file_b))
    with rk.connect(db, autocommit=False) as y:
        assert one(y, "SELECT manna_crypt.rewrap_keys()") == 3  # B -> A, not committed

        def create():
            with rk.connect(db) as z:
                return one(z, "SELECT manna_crypt.create_keyring('waiting')")
        t, out = in_thread(create)
        t.join(0.5)
        assert t.is_alive(), "create_keyring() did not wait for the open rewrap"
        y.commit()
    t.join(30)
    assert isinstance(out.get("result"), int), out.get("error")

    # Only A now: every key, including both created concurrently, opens.
    set_root(rk, manna_crypt__root_key_file=str(rk.file_a))
    with rk.connect(db) as x:
        assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "early"
        for ring in ("first", "during", "waiting"):
            c2 = one(x, "SELECT manna_crypt.encrypt_gcm('ok'::text, %s::text)", (ring,))
            assert one(x, "SELECT manna_crypt.decrypt_gcm(%s::text)", (c2,)) == "ok"
        assert one(x, "SELECT manna_crypt.rewrap_keys()") == 0
        wrapped = wrapped_keys(x)
    for kid, w in wrapped.items():
        assert len(unwrap_data_key(rk.key_a, kid, w)) == 32
