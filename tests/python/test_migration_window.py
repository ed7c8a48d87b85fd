"""The migration window (issue 11, items 2 and 3): decrypt_any() reads a
column that holds Fernet tokens and mc1 ciphertexts side by side, and
create_keyring(..., if_not_exists => true) lets a migration that is run
again create its keyring.

Assertion messages never contain keys or plaintexts.
"""

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import new_role, sqlstate

pytestmark = pytest.mark.all_versions

LEGACY = "legacy_fernet"
TARGET = "app_tokens"
SECRET = "access-sandbox-5f1e"  # a test secret: must never appear in an error


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def error_of(conn, sql, params=None):
    """The psycopg error a statement raises (it must raise)."""
    with pytest.raises(psycopg.Error) as e:
        conn.execute(sql, params)
    return e.value


def full_text(err):
    d = err.diag
    return " ".join(filter(None, [d.message_primary, d.message_detail, d.message_hint, d.context]))


@pytest.fixture
def window(conn):
    """A table in the middle of a migration: Fernet tokens, mc1 values bound
    to their row id, a NULL."""
    key = Fernet.generate_key()
    conn.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (LEGACY, key.decode()))
    conn.execute("SELECT manna_crypt.create_keyring(%s)", (TARGET,))
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, tok text)")
    f = Fernet(key)
    for i in range(1, 5):
        conn.execute("INSERT INTO items VALUES (%s, %s)", (i, f.encrypt(f"{SECRET}-{i}".encode()).decode()))
    for i in range(5, 9):
        conn.execute(
            "INSERT INTO items VALUES (%s, manna_crypt.encrypt_gcm(%s, %s, %s::text))",
            (i, f"{SECRET}-{i}", TARGET, i),
        )
    conn.execute("INSERT INTO items VALUES (9, NULL)")
    return f


# ---------------------------------------------------------------------------
# decrypt_any
# ---------------------------------------------------------------------------


def test_decrypt_any_reads_both_forms(conn, window):
    got = dict(conn.execute(
        "SELECT id, manna_crypt.decrypt_any(tok, id::text, %s) FROM items ORDER BY id", (LEGACY,)
    ).fetchall())
    want = {i: f"{SECRET}-{i}" for i in range(1, 9)}
    want[9] = None
    assert [i for i in want if got.get(i) != want[i]] == []
    # exactly what decrypt_gcm / decrypt_fernet return for each form
    same = one(conn, """
        SELECT bool_and(manna_crypt.decrypt_any(tok, id::text, %s) =
                        CASE WHEN manna_crypt.is_encrypted(tok) THEN manna_crypt.decrypt_gcm(tok, id::text)
                             ELSE manna_crypt.decrypt_fernet(tok, %s) END)
          FROM items WHERE tok IS NOT NULL""", (LEGACY, LEGACY))
    assert same is True
    # mc1 values need no Fernet keyring; the AAD is optional like decrypt_gcm's
    assert one(conn, "SELECT manna_crypt.decrypt_any(tok, '5') FROM items WHERE id = 5") == f"{SECRET}-5"
    unbound = one(conn, "SELECT manna_crypt.encrypt_gcm('no aad', %s)", (TARGET,))
    assert one(conn, "SELECT manna_crypt.decrypt_any(%s)", (unbound,)) == "no aad"
    # NULL in, NULL out, whatever else is NULL
    assert one(conn, "SELECT manna_crypt.decrypt_any(NULL)") is None
    assert one(conn, "SELECT manna_crypt.decrypt_any(NULL, NULL, NULL)") is None


def test_decrypt_any_refuses_everything_else_without_echoing_it(conn, window):
    token = one(conn, "SELECT tok FROM items WHERE id = 1")
    cases = [
        (f"{SECRET}-plain", LEGACY),          # plaintext, keyring given
        (f"{SECRET}-plain", None),            # plaintext, no keyring
        ("", LEGACY),                         # empty string
        (token, None),                        # a Fernet token without fernet_keyring
    ]
    for value, keyring in cases:
        e = error_of(conn, "SELECT manna_crypt.decrypt_any(%s, NULL, %s)", (value, keyring))
        assert e.sqlstate == "22P02", e.sqlstate
        assert "mc1:" in e.diag.message_primary and "Fernet token" in e.diag.message_primary
        assert SECRET not in full_text(e) and token not in full_text(e)
    e = error_of(conn, "SELECT manna_crypt.decrypt_any(%s)", (token,))
    assert "fernet_keyring" in full_text(e)
    # malformed values of either form: that form's own 22P02, without the value
    for bad in ("mc1:" + SECRET, "gAAAAA" + SECRET):
        e = error_of(conn, "SELECT manna_crypt.decrypt_any(%s, NULL, %s)", (bad, LEGACY))
        assert e.sqlstate == "22P02"
        assert SECRET not in full_text(e)


def test_decrypt_any_authenticates(conn, window):
    # wrong AAD on an mc1 value -> 39000, as decrypt_gcm
    assert sqlstate(conn, "SELECT manna_crypt.decrypt_any(tok, 'not the id') FROM items WHERE id = 5") == "39000"
    # a Fernet token under a key the keyring does not hold -> 39000
    foreign = Fernet(Fernet.generate_key()).encrypt(SECRET.encode()).decode()
    e = error_of(conn, "SELECT manna_crypt.decrypt_any(%s, NULL, %s)", (foreign, LEGACY))
    assert e.sqlstate == "39000" and SECRET not in full_text(e)
    # unknown Fernet keyring -> 42704; an AES-GCM keyring given as Fernet -> 22023
    assert sqlstate(conn, "SELECT manna_crypt.decrypt_any(tok, NULL, 'no_such_ring') FROM items WHERE id = 1") == "42704"
    assert sqlstate(conn, "SELECT manna_crypt.decrypt_any(tok, NULL, %s) FROM items WHERE id = 1", (TARGET,)) == "22023"


def test_decrypt_any_catalog_and_privileges(conn, window):
    row = conn.execute("""
        SELECT p.provolatile, p.proparallel, p.proisstrict, pg_get_function_arguments(p.oid),
               pg_get_function_result(p.oid)
          FROM pg_proc p WHERE p.oid = 'manna_crypt.decrypt_any'::regproc""").fetchone()
    assert row == ("s", "s", False, "value text, aad text DEFAULT NULL::text, fernet_keyring text DEFAULT NULL::text", "text")
    user = new_role(conn)
    outsider = new_role(conn)
    conn.execute(f'GRANT manna_crypt_user TO "{user}"')
    conn.execute("GRANT SELECT ON items TO PUBLIC")
    assert one(conn, "SELECT has_function_privilege(%s, 'manna_crypt.decrypt_any(text, text, text)', 'EXECUTE')", (user,))
    assert not one(conn, "SELECT has_function_privilege(%s, 'manna_crypt.decrypt_any(text, text, text)', 'EXECUTE')", (outsider,))


# ---------------------------------------------------------------------------
# create_keyring(..., if_not_exists)
# ---------------------------------------------------------------------------


def test_create_keyring_if_not_exists(conn):
    first = one(conn, "SELECT manna_crypt.create_keyring('ring_a')")
    # the one-argument call still resolves (one function, no ambiguity)
    assert one(conn, "SELECT count(*) FROM pg_proc WHERE proname = 'create_keyring' "
                     "AND pronamespace = 'manna_crypt'::regnamespace") == 1
    # again without the flag: 42710, as before
    assert sqlstate(conn, "SELECT manna_crypt.create_keyring('ring_a')") == "42710"
    audit_before = one(conn, "SELECT count(*) FROM manna_crypt.audit_log")
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    again = one(conn, "SELECT manna_crypt.create_keyring('ring_a', if_not_exists => true)")
    assert again == first
    assert notices == ['keyring "ring_a" already exists, skipping']
    assert one(conn, "SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'ring_a'") == 1
    assert one(conn, "SELECT count(*) FROM manna_crypt.audit_log") == audit_before
    # after a rotation it returns the active key id, and changes nothing
    rotated = one(conn, "SELECT manna_crypt.rotate_keyring('ring_a')")
    assert one(conn, "SELECT manna_crypt.create_keyring('ring_a', NULL, true)") == rotated
    assert one(conn, "SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'ring_a'") == 2
    # its rotation period is not changed by a repeated create
    one(conn, "SELECT manna_crypt.create_keyring('ring_a', '30 days', true)")
    assert one(conn, "SELECT rotation_period FROM manna_crypt.keyrings WHERE name = 'ring_a'") is None
    # a new keyring with the flag is created as usual (and audited)
    new = one(conn, "SELECT manna_crypt.create_keyring('ring_b', '30 days', if_not_exists => true)")
    assert one(conn, "SELECT status FROM manna_crypt.keys WHERE key_id = %s", (new,)) == "active"
    assert one(conn, "SELECT count(*) FROM manna_crypt.audit_log WHERE event = 'create_keyring' "
                     "AND keyring = 'ring_b'") == 1
    # a Fernet keyring of that name is another kind: still 42710
    conn.execute("SELECT manna_crypt.import_fernet_key('ring_f', %s)", (Fernet.generate_key().decode(),))
    e = error_of(conn, "SELECT manna_crypt.create_keyring('ring_f', if_not_exists => true)")
    assert e.sqlstate == "42710" and "Fernet" in e.diag.message_primary
    # a keyring whose active key was revoked has nothing to return: 55000
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (rotated,))
    assert sqlstate(conn, "SELECT manna_crypt.create_keyring('ring_a', if_not_exists => true)") == "55000"
    # NULL flag: 22023; bad names are checked first, as before
    assert sqlstate(conn, "SELECT manna_crypt.create_keyring('ring_c', NULL, NULL)") == "22023"
    assert sqlstate(conn, "SELECT manna_crypt.create_keyring('Bad Name', if_not_exists => true)") == "22023"
