"""Envelope key management against the shared cluster (docs/DESIGN.md sections 2,
3 and 6): the keyring lifecycle, keyring encryption, error codes, two real
sessions seeing revocations and rotations, privileges, and that no key
material leaks into info(), the keys view or the audit log.
"""

import json
import os
import uuid
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import connect
from mc_cluster import (
    envelope_of,
    error_text,
    expect_error,
    key_forms,
    open_envelope,
    seal,
    text_of,
    unwrap_data_key,
    wrapped_keys,
)

E = expect_error


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def shared_root_key() -> str:
    path = Path(os.environ["MC_CLUSTER_DIR"]) / "keys" / "root.key"
    return path.read_text().strip()


def data_keys(conn) -> dict[int, bytes]:
    """Every stored data key, unwrapped in Python with the shared root key."""
    root = shared_root_key()
    return {kid: unwrap_data_key(root, kid, w) for kid, w in wrapped_keys(conn).items()}


def status_of(conn, key_id):
    return one(conn, "SELECT status FROM manna_crypt.keys WHERE key_id = %s", (key_id,))


# ---- the lifecycle -----------------------------------------------------------------


def test_create_encrypt_decrypt_text_and_bytea(conn):
    k1 = one(conn, "SELECT manna_crypt.create_keyring('pii')")
    assert isinstance(k1, int) and k1 > 0
    ct = one(conn, "SELECT manna_crypt.encrypt_gcm('alice@example.com'::text, 'pii'::text)")
    assert ct.startswith("mc1:")
    assert one(conn, "SELECT manna_crypt.key_id(%s::text)", (ct,)) == k1
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "alice@example.com"
    # The result type is the domain, so it fits an encrypted_text column.
    assert one(conn, "SELECT pg_typeof(manna_crypt.encrypt_gcm('x'::text, 'pii'::text))::text") \
        == "manna_crypt.encrypted_text"

    # With AAD: the right AAD opens it, a wrong or missing one gives 39000.
    ct_aad = one(conn, "SELECT manna_crypt.encrypt_gcm('secret'::text, 'pii'::text, 'user:7')")
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text, 'user:7')", (ct_aad,)) == "secret"
    E(conn, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text, 'user:8')", (ct_aad,))
    E(conn, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct_aad,))

    # bytea forms: binary in, binary envelope out.
    blob = bytes(range(256)) + b"\x00\xff"
    env = one(conn, "SELECT manna_crypt.encrypt_gcm(%s::bytea, 'pii'::text)", (blob,))
    env = bytes(env)
    assert env[0] == 1 and int.from_bytes(env[1:5], "big") == k1
    assert len(env) == 1 + 4 + 12 + len(blob) + 16
    assert bytes(one(conn, "SELECT manna_crypt.decrypt_gcm(%s::bytea)", (env,))) == blob
    env_aad = bytes(one(conn, "SELECT manna_crypt.encrypt_gcm(%s::bytea, 'pii'::text, 'a')", (blob,)))
    assert bytes(one(conn, "SELECT manna_crypt.decrypt_gcm(%s::bytea, 'a')", (env_aad,))) == blob
    E(conn, "39000", "SELECT manna_crypt.decrypt_gcm(%s::bytea, 'b')", (env_aad,))

    # NULL plaintext/ciphertext give NULL; empty plaintext is valid.
    assert one(conn, "SELECT manna_crypt.encrypt_gcm(NULL::text, 'pii'::text)") is None
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(NULL::text)") is None
    ct_empty = one(conn, "SELECT manna_crypt.encrypt_gcm(''::text, 'pii'::text)")
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct_empty,)) == ""
    # A NULL keyring is an error, never a silent NULL.
    E(conn, "22023", "SELECT manna_crypt.encrypt_gcm('x'::text, NULL::text)")

    # Every encryption draws a fresh nonce.
    a, b = conn.execute(
        "SELECT manna_crypt.encrypt_gcm('same'::text, 'pii'::text), manna_crypt.encrypt_gcm('same'::text, 'pii'::text)"
    ).fetchone()
    assert a != b


def test_wrapped_keys_open_in_python_and_decrypt_values(conn):
    """The stored wrap format is the documented one, and the unwrapped data
    key really is the key of the envelope: Python decrypts a keyring value
    and the extension decrypts a value Python sealed under that key id."""
    k1 = one(conn, "SELECT manna_crypt.create_keyring('interop')")
    ct = one(conn, "SELECT manna_crypt.encrypt_gcm('from sql'::text, 'interop'::text, 'ctx')")
    keys = data_keys(conn)
    assert set(keys) == {k1}
    assert open_envelope(keys[k1], envelope_of(ct), b"ctx") == b"from sql"
    mine = text_of(seal(keys[k1], k1, b"from python", b"ctx"))
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text, 'ctx')", (mine,)) == "from python"
    # The key id is bound to the wrapped key: moving a wrapped key to another
    # row (another key id) does not unwrap there.
    wrapped = wrapped_keys(conn, k1)[k1]
    with pytest.raises(Exception):
        unwrap_data_key(shared_root_key(), k1 + 1, wrapped)
    # So are its keyring and kind (version-2 wraps).
    with pytest.raises(Exception):
        unwrap_data_key(shared_root_key(), k1, bytes(wrapped), keyring="other", kind="gcm")
    with pytest.raises(Exception):
        unwrap_data_key(shared_root_key(), k1, bytes(wrapped), keyring="interop", kind="fernet")


def test_rotation_keeps_old_versions_readable(conn):
    k1 = one(conn, "SELECT manna_crypt.create_keyring('pay')")
    ct1 = one(conn, "SELECT manna_crypt.encrypt_gcm('v1 data'::text, 'pay'::text)")
    k2 = one(conn, "SELECT manna_crypt.rotate_keyring('pay')")
    assert k2 != k1
    ct2 = one(conn, "SELECT manna_crypt.encrypt_gcm('v2 data'::text, 'pay'::text)")
    assert one(conn, "SELECT manna_crypt.key_id(%s::text)", (ct2,)) == k2
    k3 = one(conn, "SELECT manna_crypt.rotate_keyring('pay')")
    rows = conn.execute(
        "SELECT key_id, version, status FROM manna_crypt.keys WHERE keyring = 'pay' ORDER BY version"
    ).fetchall()
    assert rows == [(k1, 1, "decrypt_only"), (k2, 2, "decrypt_only"), (k3, 3, "active")]
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct1,)) == "v1 data"
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct2,)) == "v2 data"
    info = one(conn, "SELECT manna_crypt.info()")
    ring = next(r for r in info["keyrings"] if r["name"] == "pay")
    assert ring["active_key_id"] == k3 and ring["active_version"] == 3 and ring["versions"] == 3


def test_revoke_reinstate_destroy(conn):
    k1 = one(conn, "SELECT manna_crypt.create_keyring('ssn')")
    ct1 = one(conn, "SELECT manna_crypt.encrypt_gcm('123-45-6789'::text, 'ssn'::text)")
    env1 = bytes(one(conn, "SELECT manna_crypt.encrypt_gcm('\\x0102'::bytea, 'ssn'::text)"))
    k2 = one(conn, "SELECT manna_crypt.rotate_keyring('ssn')")
    ct2 = one(conn, "SELECT manna_crypt.encrypt_gcm('987'::text, 'ssn'::text)")

    # Destroy requires revoke first.
    e = E(conn, "55000", "SELECT manna_crypt.destroy_key(%s)", (k1,))
    assert "revoke" in (e.diag.message_hint or "")
    E(conn, "55000", "SELECT manna_crypt.destroy_key(%s)", (k2,))
    E(conn, "55000", "SELECT manna_crypt.reinstate_key(%s)", (k1,))

    conn.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))
    assert status_of(conn, k1) == "revoked"
    e = E(conn, "55000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct1,))
    assert "revoked" in e.diag.message_primary
    E(conn, "55000", "SELECT manna_crypt.decrypt_gcm(%s::bytea)", (env1,))
    # Other versions are unaffected.
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct2,)) == "987"
    # Revoking twice is a no-op with a notice, not an error.
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))

    conn.execute("SELECT manna_crypt.reinstate_key(%s)", (k1,))
    assert status_of(conn, k1) == "decrypt_only"
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct1,)) == "123-45-6789"

    conn.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))
    conn.execute("SELECT manna_crypt.destroy_key(%s)", (k1,))
    assert status_of(conn, k1) == "destroyed"
    assert one(conn, "SELECT wrapped FROM manna_crypt.data_keys WHERE key_id = %s", (k1,)) is None
    e = E(conn, "55000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct1,))
    assert "destroyed" in e.diag.message_primary
    E(conn, "55000", "SELECT manna_crypt.reinstate_key(%s)", (k1,))
    E(conn, "55000", "SELECT manna_crypt.revoke_key(%s)", (k1,))
    conn.execute("SELECT manna_crypt.destroy_key(%s)", (k1,))  # idempotent
    assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct2,)) == "987"

    # Revoking the active key leaves the keyring without one: 55000 on
    # encrypt until the next rotation.
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (k2,))
    e = E(conn, "55000", "SELECT manna_crypt.encrypt_gcm('x'::text, 'ssn'::text)")
    assert "no active key" in e.diag.message_primary
    k3 = one(conn, "SELECT manna_crypt.rotate_keyring('ssn')")
    ct3 = one(conn, "SELECT manna_crypt.encrypt_gcm('x'::text, 'ssn'::text)")
    assert one(conn, "SELECT manna_crypt.key_id(%s::text)", (ct3,)) == k3

    by_status = one(conn, "SELECT manna_crypt.info()")["keys_by_status"]
    assert by_status == {"active": 1, "decrypt_only": 0, "revoked": 1, "destroyed": 1}


def test_rolled_back_key_changes_leave_no_trace_in_the_cache(conn):
    """A rotation rolled back (whole transaction or to a savepoint) must not
    leave its never-committed key cached as the active one."""
    k1 = one(conn, "SELECT manna_crypt.create_keyring('rb')")
    conn.autocommit = False
    for how in ("ROLLBACK", "ROLLBACK TO SAVEPOINT s"):
        conn.execute("SAVEPOINT s")
        k_tmp = one(conn, "SELECT manna_crypt.rotate_keyring('rb')")
        ct = one(conn, "SELECT manna_crypt.encrypt_gcm('x'::text, 'rb'::text)")
        assert one(conn, "SELECT manna_crypt.key_id(%s::text)", (ct,)) == k_tmp
        conn.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))
        conn.execute(how)
        ct = one(conn, "SELECT manna_crypt.encrypt_gcm('y'::text, 'rb'::text)")
        assert one(conn, "SELECT manna_crypt.key_id(%s::text)", (ct,)) == k1, how
        assert one(conn, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "y"
        conn.commit()
    conn.autocommit = True


def test_registered_column_protects_its_keys(conn):
    k1 = one(conn, "SELECT manna_crypt.create_keyring('cols')")
    conn.execute("CREATE TABLE t (id int, secret manna_crypt.encrypted_text)")
    conn.execute("INSERT INTO t VALUES (1, manna_crypt.encrypt_gcm('x'::text, 'cols'::text))")
    conn.execute("SELECT manna_crypt.register_column('t', 'secret')")
    conn.execute("SELECT manna_crypt.rotate_keyring('cols')")
    e = E(conn, "55000", "SELECT manna_crypt.revoke_key(%s)", (k1,))
    assert "t.secret" in (e.diag.message_detail or "")
    assert status_of(conn, k1) == "decrypt_only"
    conn.execute("SELECT manna_crypt.revoke_key(%s, force => true)", (k1,))
    assert status_of(conn, k1) == "revoked"
    E(conn, "55000", "SELECT manna_crypt.destroy_key(%s)", (k1,))
    conn.execute("SELECT manna_crypt.destroy_key(%s, force => true)", (k1,))
    assert status_of(conn, k1) == "destroyed"


def test_rotate_due_and_rotation_period(conn):
    due = one(conn, "SELECT manna_crypt.create_keyring('due_ring', interval '1 hour')")
    later = one(conn, "SELECT manna_crypt.create_keyring('later_ring', interval '30 days')")
    never = one(conn, "SELECT manna_crypt.create_keyring('never_ring')")
    tiny = one(conn, "SELECT manna_crypt.create_keyring('tiny_ring')")
    assert conn.execute("SELECT * FROM manna_crypt.rotate_due()").fetchall() == []

    # Age 'due_ring' past its period (as superuser, directly), and give
    # 'tiny_ring' a tiny period and let it elapse.
    conn.execute(
        "UPDATE manna_crypt.keyrings SET created_at = now() - interval '2 hours' WHERE name = 'due_ring'"
    )
    conn.execute("SELECT manna_crypt.set_rotation_period('tiny_ring', interval '10 milliseconds')")
    conn.execute("SELECT pg_sleep(0.05)")
    info = one(conn, "SELECT manna_crypt.info()")
    flags = {r["name"]: r["rotation_due"] for r in info["keyrings"]}
    assert flags == {"due_ring": True, "later_ring": False, "never_ring": False, "tiny_ring": True}

    rotated = dict(conn.execute("SELECT keyring, key_id FROM manna_crypt.rotate_due()").fetchall())
    assert set(rotated) == {"due_ring", "tiny_ring"}
    active = dict(conn.execute(
        "SELECT keyring, key_id FROM manna_crypt.keys WHERE status = 'active'"
    ).fetchall())
    assert active["due_ring"] == rotated["due_ring"] != due
    assert active["tiny_ring"] == rotated["tiny_ring"] != tiny
    assert active["later_ring"] == later and active["never_ring"] == never
    # Just rotated: nothing is due any more (the tiny period is cleared first).
    conn.execute("SELECT manna_crypt.set_rotation_period('tiny_ring', NULL)")
    assert conn.execute("SELECT * FROM manna_crypt.rotate_due()").fetchall() == []
    assert one(conn, "SELECT rotation_period FROM manna_crypt.keyrings WHERE name = 'tiny_ring'") is None

    reasons = conn.execute(
        "SELECT keyring, detail->>'reason' FROM manna_crypt.audit_log WHERE event = 'rotate_keyring' ORDER BY id"
    ).fetchall()
    assert sorted(reasons) == [("due_ring", "rotation period elapsed"), ("tiny_ring", "rotation period elapsed")]
    E(conn, "42704", "SELECT manna_crypt.set_rotation_period('nope', interval '1 day')")
    # A zero or negative period is refused by the table constraint.
    with pytest.raises(psycopg.Error):
        conn.execute("SELECT manna_crypt.set_rotation_period('later_ring', interval '-1 day')")


def test_import_fernet_key(conn):
    fkey = Fernet.generate_key().decode()
    kid = one(conn, "SELECT manna_crypt.import_fernet_key('legacy', %s)", (fkey,))
    assert status_of(conn, kid) == "decrypt_only"
    assert one(conn, "SELECT kind FROM manna_crypt.keys WHERE key_id = %s", (kid,)) == "fernet"
    # The same key again is the same key id, not a new version.
    assert one(conn, "SELECT manna_crypt.import_fernet_key('legacy', %s)", (fkey,)) == kid
    kid2 = one(conn, "SELECT manna_crypt.import_fernet_key('legacy', %s)", (Fernet.generate_key().decode(),))
    assert kid2 != kid
    assert one(conn, "SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'legacy'") == 2

    # The stored material is the Fernet key (signing key | encryption key).
    import base64
    assert data_keys(conn)[kid] == base64.urlsafe_b64decode(fkey)

    E(conn, "22023", "SELECT manna_crypt.import_fernet_key('legacy', 'not a key')")
    E(conn, "22023", "SELECT manna_crypt.import_fernet_key('legacy', %s)", (fkey[:-4],))
    # Fernet keyrings read legacy tokens; they never encrypt or rotate.
    e = E(conn, "22023", "SELECT manna_crypt.encrypt_gcm('x'::text, 'legacy'::text)")
    assert "fernet" in e.diag.message_primary.lower()
    E(conn, "22023", "SELECT manna_crypt.rotate_keyring('legacy')")
    # A GCM envelope naming a Fernet key id is refused, not tried.
    fake = text_of(seal(os.urandom(32), kid, b"x"))
    E(conn, "22023", "SELECT manna_crypt.decrypt_gcm(%s::text)", (fake,))
    # A Fernet key cannot go into an AES-GCM keyring.
    conn.execute("SELECT manna_crypt.create_keyring('gcm_ring')")
    E(conn, "22023", "SELECT manna_crypt.import_fernet_key('gcm_ring', %s)", (fkey,))
    info = one(conn, "SELECT manna_crypt.info()")
    legacy = next(r for r in info["keyrings"] if r["name"] == "legacy")
    assert legacy["kind"] == "fernet" and legacy["versions"] == 2


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "A", "x" * 100, "bad name", "x'; drop", "1abc", "pii-data", "é"])
def test_bad_keyring_names(conn, name):
    E(conn, "22023", "SELECT manna_crypt.create_keyring(%s)", (name,))
    E(conn, "22023", "SELECT manna_crypt.import_fernet_key(%s, %s)", (name, Fernet.generate_key().decode()))
    assert one(conn, "SELECT count(*) FROM manna_crypt.keyrings") == 0


def test_unknown_and_duplicate_objects(conn):
    k1 = one(conn, "SELECT manna_crypt.create_keyring('dup')")
    e = E(conn, "42710", "SELECT manna_crypt.create_keyring('dup')")
    assert "dup" in e.diag.message_primary
    assert one(conn, "SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'dup'") == 1

    E(conn, "42704", "SELECT manna_crypt.encrypt_gcm('x'::text, 'nope'::text)")
    E(conn, "42704", "SELECT manna_crypt.encrypt_gcm('x'::bytea, 'nope'::text)")
    E(conn, "42704", "SELECT manna_crypt.rotate_keyring('nope')")
    for fn in ("revoke_key", "reinstate_key", "destroy_key"):
        E(conn, "42704", f"SELECT manna_crypt.{fn}(999999)")

    # A ciphertext whose key id does not exist: change the header's key id.
    ct = one(conn, "SELECT manna_crypt.encrypt_gcm('x'::text, 'dup'::text)")
    env = bytearray(envelope_of(ct))
    assert int.from_bytes(env[1:5], "big") == k1
    env[1:5] = (999999).to_bytes(4, "big")
    e = E(conn, "42704", "SELECT manna_crypt.decrypt_gcm(%s::text)", (text_of(bytes(env)),))
    assert "999999" in e.diag.message_primary
    E(conn, "42704", "SELECT manna_crypt.decrypt_gcm(%s::bytea)", (bytes(env),))
    # The largest key id is unknown too, not an overflow.
    env[1:5] = b"\xff\xff\xff\xff"
    E(conn, "42704", "SELECT manna_crypt.decrypt_gcm(%s::text)", (text_of(bytes(env)),))
    # A key id of an existing key, swapped in: the header is authenticated.
    k2 = one(conn, "SELECT manna_crypt.rotate_keyring('dup')")
    env[1:5] = k2.to_bytes(4, "big")
    E(conn, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (text_of(bytes(env)),))

    # Key id 0 (a raw-key value) through keyring decryption: 42704.
    raw = one(conn, "SELECT manna_crypt.encrypt_gcm('x'::text, %s::bytea)", (os.urandom(32),))
    assert one(conn, "SELECT manna_crypt.key_id(%s::text)", (raw,)) == 0
    e = E(conn, "42704", "SELECT manna_crypt.decrypt_gcm(%s::text)", (raw,))
    assert "raw key" in e.diag.message_primary
    # Malformed text: 22P02.
    E(conn, "22P02", "SELECT manna_crypt.decrypt_gcm('mc1:!!!'::text)")


# ---- two sessions --------------------------------------------------------------------


def test_revocation_seen_by_another_session_next_transaction(fresh_db):
    with connect(fresh_db) as a, connect(fresh_db) as b:
        k1 = one(a, "SELECT manna_crypt.create_keyring('shared')")
        ct = one(a, "SELECT manna_crypt.encrypt_gcm('cached'::text, 'shared'::text)")
        assert one(b, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "cached"  # B caches k1

        # An uncommitted revocation changes nothing for B.
        a.autocommit = False
        a.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))
        assert one(b, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "cached"
        a.commit()
        a.autocommit = True

        # B's next transaction refuses the key.
        E(b, "55000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,))
        E(a, "55000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,))
        # Reinstating is seen the same way.
        a.execute("SELECT manna_crypt.reinstate_key(%s)", (k1,))
        assert one(b, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "cached"


def test_revocation_inside_open_repeatable_read_transaction(fresh_db):
    """Documents the guarantee's edge: a transaction that is already open
    (REPEATABLE READ) keeps its view; the revocation applies from its next
    transaction on ("no later than its next transaction")."""
    with connect(fresh_db) as a, connect(fresh_db, autocommit=False) as b:
        k1 = one(a, "SELECT manna_crypt.create_keyring('rr')")
        ct = one(a, "SELECT manna_crypt.encrypt_gcm('snap'::text, 'rr'::text)")
        a.execute("CREATE TABLE rr_other (x int)")
        b.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert one(b, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "snap"
        a.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))
        # Same transaction: still readable, also after touching a relation
        # (which processes the pending invalidation and reloads the key under
        # the transaction's snapshot, taken before the revocation).
        assert one(b, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "snap"
        assert one(b, "SELECT count(*) FROM rr_other") == 0
        assert one(b, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "snap"
        b.commit()
        with pytest.raises(psycopg.Error) as ei:
            b.execute("SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,))
        assert ei.value.sqlstate == "55000"
        b.rollback()


def test_rotation_seen_by_another_session(fresh_db):
    with connect(fresh_db) as a, connect(fresh_db) as b:
        k1 = one(a, "SELECT manna_crypt.create_keyring('rot')")
        ct_b1 = one(b, "SELECT manna_crypt.encrypt_gcm('x'::text, 'rot'::text)")
        assert one(b, "SELECT manna_crypt.key_id(%s::text)", (ct_b1,)) == k1  # B caches the active key
        k2 = one(a, "SELECT manna_crypt.rotate_keyring('rot')")
        ct_b2 = one(b, "SELECT manna_crypt.encrypt_gcm('y'::text, 'rot'::text)")
        assert one(b, "SELECT manna_crypt.key_id(%s::text)", (ct_b2,)) == k2
        assert one(a, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct_b2,)) == "y"
        assert one(b, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct_b1,)) == "x"


def test_parallel_workers_decrypt_by_keyring(conn):
    """Parallel workers start with a cold key cache; loading a key there must
    not need a transaction id (cannot be assigned in a parallel operation)."""
    conn.execute("SELECT manna_crypt.create_keyring('par')")
    conn.execute(
        "CREATE TABLE pt AS SELECT g, manna_crypt.encrypt_gcm('v' || g, 'par'::text) AS c "
        "FROM generate_series(1, 2000) g"
    )
    conn.execute("ANALYZE pt")
    for s in ("force_parallel_mode = on", "parallel_setup_cost = 0", "parallel_tuple_cost = 0",
              "min_parallel_table_scan_size = 0", "max_parallel_workers_per_gather = 2"):
        conn.execute(f"SET {s}")
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT count(*) FROM pt WHERE manna_crypt.decrypt_gcm(c) = 'v' || g").fetchall())
    assert "Gather" in plan
    assert one(conn, "SELECT count(*) FROM pt WHERE manna_crypt.decrypt_gcm(c) = 'v' || g") == 2000


# ---- no key material in views, info(), audit log, errors ---------------------------


def test_no_key_material_in_info_view_audit_or_errors(conn):
    conn.execute("SELECT manna_crypt.create_keyring('leak')")
    conn.execute("SELECT manna_crypt.rotate_keyring('leak')")
    fkey = Fernet.generate_key().decode()
    conn.execute("SELECT manna_crypt.import_fernet_key('old', %s)", (fkey,))
    ct = one(conn, "SELECT manna_crypt.encrypt_gcm('x'::text, 'leak'::text, 'a')")
    errors = []
    for sql, params in [
        ("SELECT manna_crypt.decrypt_gcm(%s::text, 'b')", (ct,)),
        ("SELECT manna_crypt.encrypt_gcm('x'::text, 'old'::text)", None),
        ("SELECT manna_crypt.create_keyring('leak')", None),
        ("SELECT manna_crypt.import_fernet_key('old', 'x')", None),
    ]:
        try:
            conn.execute(sql, params)
        except psycopg.Error as e:
            errors.append(error_text(e))
    assert len(errors) == 4

    cols = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'manna_crypt.keys'::regclass AND attnum > 0"
    ).fetchall()]
    assert "wrapped" not in cols and not any("material" in c or c == "key" for c in cols)

    surfaces = {
        "info": json.dumps(one(conn, "SELECT manna_crypt.info()")),
        "keys": json.dumps(conn.execute("SELECT * FROM manna_crypt.keys").fetchall(), default=str),
        "audit": json.dumps(conn.execute("SELECT * FROM manna_crypt.audit_log").fetchall(), default=str),
        "errors": "\n".join(errors),
    }
    secrets_ = {"root": bytes.fromhex(shared_root_key())}
    for kid, k in data_keys(conn).items():
        secrets_[f"data key {kid}"] = k
    assert len(secrets_) == 4
    for where, text in surfaces.items():
        for what, key in secrets_.items():
            for form in key_forms(key):
                assert form not in text, f"{what} appears in {where}"
        assert fkey not in text, f"the Fernet key appears in {where}"


def test_audit_log_records_the_lifecycle(conn):
    me = one(conn, "SELECT current_user")
    k1 = one(conn, "SELECT manna_crypt.create_keyring('aud', interval '90 days')")
    k2 = one(conn, "SELECT manna_crypt.rotate_keyring('aud')")
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))
    conn.execute("SELECT manna_crypt.reinstate_key(%s)", (k1,))
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (k1,))
    conn.execute("SELECT manna_crypt.destroy_key(%s)", (k1,))
    conn.execute("SELECT manna_crypt.set_rotation_period('aud', interval '7 days')")
    k3 = one(conn, "SELECT manna_crypt.import_fernet_key('aud_legacy', %s)", (Fernet.generate_key().decode(),))
    # A failed call leaves no entry (it rolled back).
    E(conn, "42710", "SELECT manna_crypt.create_keyring('aud')")
    rows = conn.execute(
        "SELECT event, keyring, key_id, role_name, detail FROM manna_crypt.audit_log ORDER BY id"
    ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("create_keyring", "aud", k1),
        ("rotate_keyring", "aud", k2),
        ("revoke_key", "aud", k1),
        ("reinstate_key", "aud", k1),
        ("revoke_key", "aud", k1),
        ("destroy_key", "aud", k1),
        ("set_rotation_period", "aud", None),
        ("import_fernet_key", "aud_legacy", k3),
    ]
    assert all(r[3] == me for r in rows)
    assert rows[1][4]["previous_key_id"] == k1 and rows[1][4]["version"] == 2
    assert rows[2][4]["previous_status"] == "decrypt_only"
    assert "90" in rows[0][4]["rotation_period"]
    ts = conn.execute("SELECT at FROM manna_crypt.audit_log ORDER BY id").fetchall()
    assert ts == sorted(ts)


# ---- privileges ---------------------------------------------------------------------


@pytest.fixture
def roles(fresh_db):
    """LOGIN roles: app (manna_crypt_user), dba (manna_crypt_admin), nobody (no grant)."""
    tag = uuid.uuid4().hex[:8]
    names = {"app": f"mc_app_{tag}", "dba": f"mc_dba_{tag}", "nobody": f"mc_nobody_{tag}"}
    with connect("postgres") as c:
        for n in names.values():
            c.execute(f'CREATE ROLE "{n}" LOGIN')
        c.execute(f'GRANT manna_crypt_user TO "{names["app"]}"')
        c.execute(f'GRANT manna_crypt_admin TO "{names["dba"]}"')
    try:
        yield names
    finally:
        with connect(fresh_db) as c:
            for n in names.values():
                c.execute(f'DROP OWNED BY "{n}"')
        with connect("postgres") as c:
            for n in names.values():
                c.execute(f'DROP ROLE IF EXISTS "{n}"')


def test_privileges(fresh_db, roles):
    with connect(fresh_db) as su:
        k1 = one(su, "SELECT manna_crypt.create_keyring('app_ring')")
        su.execute("SELECT manna_crypt.grant_keyring_access('app_ring', %s, 'all')", (roles["app"],))
        su.execute("CREATE TABLE public.notes (id serial, body manna_crypt.encrypted_text)")
        su.execute("GRANT SELECT, INSERT ON public.notes TO PUBLIC")
        su.execute("GRANT USAGE ON SEQUENCE public.notes_id_seq TO PUBLIC")
        ct = one(su, "SELECT manna_crypt.encrypt_gcm('hello'::text, 'app_ring'::text)")

    # manna_crypt_user: encrypt and decrypt by keyring; no key management,
    # no key tables.
    with connect(fresh_db, user=roles["app"]) as app:
        mine = one(app, "SELECT manna_crypt.encrypt_gcm('mine'::text, 'app_ring'::text)")
        assert one(app, "SELECT manna_crypt.decrypt_gcm(%s::text)", (mine,)) == "mine"
        assert one(app, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "hello"
        env = bytes(one(app, "SELECT manna_crypt.encrypt_gcm('\\x00'::bytea, 'app_ring'::text)"))
        assert bytes(one(app, "SELECT manna_crypt.decrypt_gcm(%s::bytea)", (env,))) == b"\x00"
        for sql in (
            "SELECT manna_crypt.create_keyring('x')",
            "SELECT manna_crypt.rotate_keyring('app_ring')",
            f"SELECT manna_crypt.revoke_key({k1})",
            "SELECT manna_crypt.rewrap_keys()",
            "SELECT manna_crypt.info()",
            "SELECT * FROM manna_crypt.data_keys",
            "SELECT * FROM manna_crypt.keys",
            "SELECT * FROM manna_crypt.root_key_check",
            "SELECT * FROM manna_crypt.audit_log",
            "INSERT INTO manna_crypt.audit_log (event) VALUES ('forged')",
            "UPDATE manna_crypt.data_keys SET status = 'active'",
        ):
            E(app, "42501", sql)

    # No grant at all: no encryption, but the domain check still works, so
    # writing an encrypted_text column needs nothing from manna_crypt.
    with connect(fresh_db, user=roles["nobody"]) as nobody:
        E(nobody, "42501", "SELECT manna_crypt.encrypt_gcm('x'::text, 'app_ring'::text)")
        E(nobody, "42501", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,))
        E(nobody, "42501", "SELECT manna_crypt.encrypt_gcm('x'::text, %s::bytea)", (os.urandom(32),))
        nobody.execute("INSERT INTO public.notes (body) VALUES (%s)", (ct,))
        E(nobody, "23514", "INSERT INTO public.notes (body) VALUES ('plain text')")
        assert one(nobody, "SELECT count(*) FROM public.notes") == 1

    # manna_crypt_admin: manages keys.
    with connect(fresh_db, user=roles["dba"]) as dba:
        k = one(dba, "SELECT manna_crypt.create_keyring('dba_ring')")
        k2 = one(dba, "SELECT manna_crypt.rotate_keyring('dba_ring')")
        dba.execute("SELECT manna_crypt.revoke_key(%s)", (k,))
        dba.execute("SELECT manna_crypt.destroy_key(%s)", (k,))
        assert one(dba, "SELECT status FROM manna_crypt.keys WHERE key_id = %s", (k,)) == "destroyed"
        assert one(dba, "SELECT manna_crypt.info()")["keys_by_status"]["active"] == 2
        assert one(dba, "SELECT role_name FROM manna_crypt.audit_log WHERE key_id = %s ORDER BY id DESC LIMIT 1",
                   (k,)) == roles["dba"]
        assert k2 > k
        # ... but cannot read the wrapped keys directly, nor forge the log.
        E(dba, "42501", "SELECT wrapped FROM manna_crypt.data_keys")
        for sql in (
            "UPDATE manna_crypt.audit_log SET event = 'x'",
            "DELETE FROM manna_crypt.audit_log",
            "TRUNCATE manna_crypt.audit_log",
            "INSERT INTO manna_crypt.audit_log (event) VALUES ('forged')",
        ):
            E(dba, "42501", sql)

    # Not even a superuser changes the audit log.
    with connect(fresh_db) as su:
        n = one(su, "SELECT count(*) FROM manna_crypt.audit_log")
        assert n >= 5
        for sql in (
            "UPDATE manna_crypt.audit_log SET event = 'x'",
            "DELETE FROM manna_crypt.audit_log",
            "TRUNCATE manna_crypt.audit_log",
        ):
            E(su, "42501", sql)
        assert one(su, "SELECT count(*) FROM manna_crypt.audit_log") == n


def test_hot_path_has_no_security_definer(conn):
    rows = conn.execute(
        "SELECT p.oid::regprocedure::text, p.prosecdef FROM pg_proc p "
        "WHERE p.pronamespace = 'manna_crypt'::regnamespace "
        "AND p.proname IN ('encrypt_gcm', 'decrypt_gcm')"
    ).fetchall()
    assert len(rows) == 8
    assert [sig for sig, secdef in rows if secdef] == []
    # No SET clause either (it would cost a GUC save/restore per call).
    assert one(conn, "SELECT count(*) FROM pg_proc WHERE pronamespace = 'manna_crypt'::regnamespace "
                     "AND proname IN ('encrypt_gcm', 'decrypt_gcm') AND proconfig IS NOT NULL") == 0
