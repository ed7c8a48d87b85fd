"""Key management as the review attacked it.

- revoke_key/destroy_key count a key's values without running any other
  role's code (RLS policies), across partitions, in encrypted_text columns
  nobody registered, and for Fernet keys by HMAC; the count and the
  revocation cannot be split by a writer.
- No key material, wrapped or not, reaches the server log, even with
  auto_explain printing every nested plan.
- Fernet keys import from a server file, never through SQL text.
- A wrapped key is bound to its key id, keyring and kind; 0.1.0's wraps are
  still read, and rewrap_keys() rewrites them.
- NULL arguments are 22023, a rotation period is bounded, an overlong
  keyring name is not echoed.
"""

import os
import uuid

import psycopg
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import connect, new_role as role, sqlstate
from mc_cluster import Cluster, new_root_key


def test_counting_runs_no_policy_of_another_role(fresh_db):
    with connect(fresh_db) as su:
        su.execute("SELECT manna_crypt.create_keyring('victim')")
        su.execute("SELECT manna_crypt.create_keyring('other')")
        su.execute("CREATE TABLE public.secrets (s text)")
        su.execute("INSERT INTO public.secrets VALUES (manna_crypt.encrypt_gcm('the secret', 'victim'))")
        mallory = role(su)
        su.execute(f'GRANT CREATE ON SCHEMA public TO "{mallory}"')
        with connect(fresh_db, user=mallory) as m:
            m.execute("CREATE TABLE public.m_items (id int, s text)")
            m.execute("INSERT INTO public.m_items VALUES (1, 'x')")
            m.execute("CREATE TABLE public.m_loot (who text, what text)")
            m.execute('GRANT INSERT ON public.m_loot TO PUBLIC')
            m.execute(
                """CREATE FUNCTION public.m_pol() RETURNS boolean LANGUAGE plpgsql AS $$
                BEGIN
                  INSERT INTO public.m_loot
                    SELECT current_user, manna_crypt.decrypt_gcm(s) FROM public.secrets;
                  RETURN true;
                EXCEPTION WHEN OTHERS THEN
                  INSERT INTO public.m_loot VALUES (current_user, NULL);
                  RETURN true;
                END $$"""
            )
            m.execute("ALTER TABLE public.m_items ENABLE ROW LEVEL SECURITY")
            m.execute("ALTER TABLE public.m_items FORCE ROW LEVEL SECURITY")
            m.execute("CREATE POLICY p ON public.m_items USING (public.m_pol())")
        # An admin once registered it (a migration does this).
        su.execute("SELECT manna_crypt.register_column('public.m_items', 's')")
        admin = role(su, "IN ROLE manna_crypt_admin")
        other_key = su.execute(
            "SELECT key_id FROM manna_crypt.keys WHERE keyring = 'other'"
        ).fetchone()[0]
        # The admin cannot read mallory's table: that must not block them.
        with connect(fresh_db, user=admin) as a:
            a.execute("SELECT manna_crypt.rotate_keyring('other')")
            a.execute("SELECT manna_crypt.revoke_key(%s)", (other_key,))
        # A superuser's revocation (0.1.0 counted as the caller: mallory's
        # policy then ran as the superuser and copied the plaintext).
        second = su.execute("SELECT manna_crypt.rotate_keyring('other')").fetchone()[0]
        su.execute("SELECT manna_crypt.rotate_keyring('other')")
        su.execute("SELECT manna_crypt.revoke_key(%s)", (second,))
        loot = su.execute("SELECT who, what FROM public.m_loot").fetchall()
        assert loot == [], "mallory's policy ran during the count"


def _table_with_value_under(conn, table, keyring, ddl):
    conn.execute(ddl)
    conn.execute(f"INSERT INTO {table} (s) VALUES (manna_crypt.encrypt_gcm('v', %s))", (keyring,))
    return conn.execute(
        "SELECT key_id FROM manna_crypt.keys WHERE keyring = %s AND status = 'active'", (keyring,)
    ).fetchone()[0]


def test_counting_covers_partitions_children_and_unregistered_encrypted_text(fresh_db):
    with connect(fresh_db) as c:
        for ring in ("p1", "p2", "p3"):
            c.execute("SELECT manna_crypt.create_keyring(%s)", (ring,))
        # A partitioned table registered at its root: the value is in a leaf.
        c.execute("CREATE TABLE parted (k int, s text) PARTITION BY RANGE (k)")
        c.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)")
        c.execute("INSERT INTO parted VALUES (1, manna_crypt.encrypt_gcm('v', 'p1'))")
        c.execute("SELECT manna_crypt.register_column('parted', 's')")
        # An inheritance child of a registered parent.
        c.execute("CREATE TABLE base (s text)")
        c.execute("CREATE TABLE child () INHERITS (base)")
        c.execute("INSERT INTO child VALUES (manna_crypt.encrypt_gcm('v', 'p2'))")
        c.execute("SELECT manna_crypt.register_column('base', 's')")
        # An encrypted_text column nobody registered.
        c.execute("CREATE TABLE typed (s manna_crypt.encrypted_text)")
        c.execute("INSERT INTO typed VALUES (manna_crypt.encrypt_gcm('v', 'p3'))")
        for ring in ("p1", "p2", "p3"):
            key = c.execute(
                "SELECT key_id FROM manna_crypt.keys WHERE keyring = %s", (ring,)
            ).fetchone()[0]
            c.execute("SELECT manna_crypt.rotate_keyring(%s)", (ring,))
            assert sqlstate(c, "SELECT manna_crypt.revoke_key(%s)", (key,)) == "55000", ring
            assert c.execute(
                "SELECT status FROM manna_crypt.keys WHERE key_id = %s", (key,)
            ).fetchone()[0] == "decrypt_only"


def test_fernet_keys_are_protected_by_the_tokens_they_sign(fresh_db):
    key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
    with connect(fresh_db) as c:
        ids = [
            c.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", (k.decode(),)).fetchone()[0]
            for k in (key_a, key_b)
        ]
        c.execute("CREATE TABLE items (id int, tok text)")
        c.execute("INSERT INTO items VALUES (1, %s)", (Fernet(key_a).encrypt(b"only a opens me").decode(),))
        c.execute("SELECT manna_crypt.register_column('items', 'tok')")
        # key b signed nothing here: it may go; key a may not.
        c.execute("SELECT manna_crypt.revoke_key(%s)", (ids[1],))
        assert sqlstate(c, "SELECT manna_crypt.revoke_key(%s)", (ids[0],)) == "55000"
        c.execute("SELECT manna_crypt.revoke_key(%s, force => true)", (ids[0],))
        # Destroying it still counts (a revoked key's material is still there).
        assert sqlstate(c, "SELECT manna_crypt.destroy_key(%s)", (ids[0],)) == "55000"
        assert c.execute(
            "SELECT status FROM manna_crypt.keys WHERE key_id = %s", (ids[0],)
        ).fetchone()[0] == "revoked"
        c.execute("SELECT manna_crypt.destroy_key(%s)", (ids[1],))


def test_a_writer_cannot_slip_a_value_between_count_and_revoke(fresh_db):
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.create_keyring('race')")
        c.execute("CREATE TABLE t (s text)")
        c.execute("SELECT manna_crypt.register_column('t', 's')")
        key = c.execute("SELECT key_id FROM manna_crypt.keys WHERE keyring = 'race'").fetchone()[0]
        writer = connect(fresh_db, autocommit=False)
        try:
            writer.execute("INSERT INTO t VALUES (manna_crypt.encrypt_gcm('late', 'race'))")
            # The revocation waits for the writer (SHARE lock on t) ...
            c.execute("SET lock_timeout = '300ms'")
            assert sqlstate(c, "SELECT manna_crypt.revoke_key(%s)", (key,)) == "55P03"
            writer.commit()
            # ... and then sees its value.
            c.execute("RESET lock_timeout")
            assert sqlstate(c, "SELECT manna_crypt.revoke_key(%s)", (key,)) == "55000"
        finally:
            writer.close()


def test_counting_fails_closed_when_the_owner_is_no_superuser(fresh_db):
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.create_keyring('fc')")
        key = c.execute("SELECT key_id FROM manna_crypt.keys WHERE keyring = 'fc'").fetchone()[0]
        owner = role(c, "SUPERUSER")
        c.execute('UPDATE pg_extension SET extowner = (SELECT oid FROM pg_roles WHERE rolname = %s) '
                  "WHERE extname = 'manna_crypt'", (owner,))
        c.execute(f'ALTER ROLE "{owner}" NOSUPERUSER')
        try:
            assert sqlstate(c, "SELECT manna_crypt.revoke_key(%s)", (key,)) == "55000"
        finally:
            c.execute(f'ALTER ROLE "{owner}" SUPERUSER')


@pytest.fixture(scope="module")
def explained():
    """A cluster that logs every nested statement's verbose plan."""
    settings = {
        "shared_preload_libraries": "manna_crypt,auto_explain",
        "auto_explain.log_min_duration": 0,
        "auto_explain.log_nested_statements": True,
        "auto_explain.log_verbose": True,
        "auto_explain.log_analyze": True,
        "log_statement": "all",
        "log_min_duration_statement": 0,
        "log_min_messages": "debug1",
    }
    with Cluster("explained", root_key=new_root_key(), settings=settings) as c:
        c.create_db_with_extension("app")
        yield c


def test_no_key_material_in_plans_or_logs(explained):
    with explained.connect("app") as c:
        c.execute("SELECT manna_crypt.create_keyring('logged')")
        c.execute("SELECT manna_crypt.rotate_keyring('logged')")
        c.execute("SELECT manna_crypt.import_fernet_key_file('lf', %s)",
                  (str(_key_file(explained, [Fernet.generate_key()])),))
        wrapped = [bytes(r[0]).hex() for r in c.execute(
            "SELECT wrapped FROM manna_crypt.data_keys WHERE wrapped IS NOT NULL").fetchall()]
        check = bytes(c.execute("SELECT check_value FROM manna_crypt.root_key_check").fetchone()[0]).hex()
    log = explained.log_text().lower()
    assert "_staged_secret()" in log, "auto_explain did not log the nested statements"
    for w in wrapped:
        assert w not in log and w[:24] not in log
    assert check not in log


def _key_file(cluster, keys, mode=0o600, name=None):
    path = cluster.write_key_file(name or f"fernet_{uuid.uuid4().hex[:6]}.keys",
                                  "# legacy keys, primary first\n"
                                  + "".join(k.decode() + "\n" for k in keys), mode=mode)
    return path


def test_fernet_keys_import_from_a_server_file(explained):
    primary, old = Fernet.generate_key(), Fernet.generate_key()
    path = _key_file(explained, [primary, old])
    with explained.connect("app") as c:
        rows = c.execute("SELECT line, key_id FROM manna_crypt.import_fernet_key_file('imp', %s)",
                         (str(path),)).fetchall()
        assert [r[0] for r in rows] == [2, 3]
        # The primary (first line) is the newest version: tried first.
        newest = c.execute("SELECT key_id FROM manna_crypt.keys WHERE keyring = 'imp' "
                           "ORDER BY version DESC LIMIT 1").fetchone()[0]
        assert newest == rows[0][1]
        for k in (primary, old):
            tok = Fernet(k).encrypt(b"legacy").decode()
            assert c.execute("SELECT manna_crypt.decrypt_fernet(%s, 'imp')", (tok,)).fetchone()[0] == "legacy"
        # Importing again changes nothing.
        again = c.execute("SELECT key_id FROM manna_crypt.import_fernet_key_file('imp', %s)",
                          (str(path),)).fetchall()
        assert [r[0] for r in again] == [r[1] for r in rows]
        assert sqlstate(c, "SELECT manna_crypt.import_fernet_key_file('imp', '/nonexistent/keys')") == "58P01"
        loose = _key_file(explained, [primary], mode=0o644)
        assert sqlstate(c, "SELECT manna_crypt.import_fernet_key_file('imp', %s)", (str(loose),)) == "58030"
        bad = explained.write_key_file("bad.keys", primary.decode() + "\nnot-a-key-at-all\n")
        try:
            c.execute("SELECT manna_crypt.import_fernet_key_file('imp', %s)", (str(bad),))
            raise AssertionError("a bad line was accepted")
        except psycopg.Error as e:
            assert e.sqlstate == "22023"
            assert "line 2" in e.diag.message_primary
            assert "not-a-key" not in str(e)
        admin = role(c, "IN ROLE manna_crypt_admin")
    with explained.connect("app", user=admin) as a:
        assert sqlstate(a, "SELECT manna_crypt.import_fernet_key_file('imp', %s)", (str(path),)) == "42501"
    log = explained.log_text()
    for k in (primary, old):
        assert k.decode() not in log


def _root_key_bytes():
    path = os.path.join(os.environ["MC_CLUSTER_DIR"], "keys", "root.key")
    return bytes.fromhex(open(path).read().strip())


def _v1_wrap(root, key_id, data_key):
    """A version-1 (0.1.0) wrap: AAD = envelope header(key id 0) || label || key id."""
    aad = b"\x01\x00\x00\x00\x00" + b"manna_crypt/data-key/v1" + key_id.to_bytes(4, "big")
    nonce = os.urandom(12)
    return b"\x01" + nonce + AESGCM(root).encrypt(nonce, data_key, aad)


def test_wraps_are_bound_to_their_keyring_and_old_wraps_still_open(fresh_db):
    root = _root_key_bytes()
    with connect(fresh_db) as c:
        c.execute("SELECT manna_crypt.create_keyring('ring_a')")
        c.execute("SELECT manna_crypt.create_keyring('ring_b')")
        ka = c.execute("SELECT key_id FROM manna_crypt.keys WHERE keyring = 'ring_a'").fetchone()[0]
        ct = c.execute("SELECT manna_crypt.encrypt_gcm('bound', 'ring_a')::text").fetchone()[0]
        # Moved to another keyring, the wrapped key no longer unwraps.
        c.execute("UPDATE manna_crypt.data_keys SET keyring_id = "
                  "(SELECT keyring_id FROM manna_crypt.keyrings WHERE name = 'ring_b'), version = 2, "
                  "status = 'decrypt_only' WHERE key_id = %s", (ka,))
        with connect(fresh_db) as fresh:
            assert sqlstate(fresh, "SELECT manna_crypt.decrypt_gcm(%s)", (ct,)) == "39000"
        c.execute("UPDATE manna_crypt.data_keys SET keyring_id = "
                  "(SELECT keyring_id FROM manna_crypt.keyrings WHERE name = 'ring_a'), version = 1, "
                  "status = 'active' WHERE key_id = %s", (ka,))
        # A 0.1.0 wrap of a known key: still read; rewrap_keys() rewrites it.
        data_key = os.urandom(32)
        c.execute("UPDATE manna_crypt.data_keys SET wrapped = %s WHERE key_id = %s",
                  (_v1_wrap(root, ka, data_key), ka))
        nonce = os.urandom(12)
        header = b"\x01" + ka.to_bytes(4, "big")
        env = header + nonce + AESGCM(data_key).encrypt(nonce, b"from 0.1.0", header)
        with connect(fresh_db) as fresh:
            assert fresh.execute("SELECT manna_crypt.decrypt_gcm(%s::bytea)", (env,)).fetchone()[0] == b"from 0.1.0"
        assert c.execute("SELECT manna_crypt.rewrap_keys()").fetchone()[0] == 1
        first = c.execute("SELECT get_byte(wrapped, 0) FROM manna_crypt.data_keys WHERE key_id = %s",
                          (ka,)).fetchone()[0]
        assert first == 2
        with connect(fresh_db) as fresh:
            assert fresh.execute("SELECT manna_crypt.decrypt_gcm(%s::bytea)", (env,)).fetchone()[0] == b"from 0.1.0"
        assert c.execute("SELECT manna_crypt.rewrap_keys()").fetchone()[0] == 0


@pytest.mark.parametrize("sql", [
    "SELECT manna_crypt.revoke_key(1, NULL)",
    "SELECT manna_crypt.revoke_key(NULL)",
    "SELECT manna_crypt.destroy_key(1, NULL)",
    "SELECT manna_crypt.reinstate_key(NULL)",
    "SELECT manna_crypt.rotate_keyring(NULL)",
    "SELECT manna_crypt.import_fernet_key('k', NULL)",
    "SELECT manna_crypt.import_fernet_key(NULL, 'x')",
    "SELECT manna_crypt.try_lock_xact(NULL)",
    "SELECT manna_crypt.try_lock_session(NULL)",
    "SELECT manna_crypt.unlock(NULL)",
    "SELECT manna_crypt.lock_holder(NULL)",
    "SELECT manna_crypt.set_rotation_period('k', '178000000 years')",
    "SELECT manna_crypt.set_rotation_period('k', '-1 day')",
    "SELECT manna_crypt.create_keyring('k2', '200 years')",
])
def test_bad_arguments_are_22023(conn, sql):
    conn.execute("SELECT manna_crypt.create_keyring('k')")
    assert sqlstate(conn, sql) == "22023"


def test_rotation_period_bound_keeps_rotate_due_working(conn):
    conn.execute("SELECT manna_crypt.create_keyring('k')")
    conn.execute("SELECT manna_crypt.set_rotation_period('k', '100 years')")
    assert conn.execute("SELECT count(*) FROM manna_crypt.rotate_due()").fetchone()[0] == 0
    assert conn.execute("SELECT manna_crypt.info() IS NOT NULL").fetchone()[0]


def test_an_overlong_keyring_name_is_not_echoed(conn):
    name = "a" * 100_000
    for sql in ("SELECT manna_crypt.rotate_keyring(%s)",
                "SELECT manna_crypt.set_rotation_period(%s, '1 day')",
                "SELECT manna_crypt.encrypt_gcm('x', %s)",
                "SELECT manna_crypt.create_keyring(%s)"):
        try:
            conn.execute(sql, (name,))
            raise AssertionError("accepted")
        except psycopg.Error as e:
            assert e.sqlstate == "22023", sql
            assert "aaaaaaaaaa" not in str(e) + (e.diag.message_detail or "") + (e.diag.message_hint or "")


def test_the_setting_prefix_is_reserved(conn):
    """A typo in a manna_crypt setting is refused, not kept as a placeholder."""
    assert sqlstate(conn, "SET manna_crypt.root_key_flie = '/tmp/x'") == "42602"


def test_trigger_function_called_directly_is_39P01(conn):
    """Not pgrx's XX000 "PgTrigger::from_fcinfo failed"."""
    assert sqlstate(conn, "SELECT manna_crypt.version_bump()") == "39P01"
