"""Keyring grants (README "Keyring access"): a role granted decrypt on `pii`
reads `pii` and is refused (42501) on `plaid_tokens` on every path that uses
a key; grants through group roles and 16+'s per-membership INHERIT FALSE;
revokes, membership changes and DROP ROLE seen by the next transaction;
grant management, SECURITY DEFINER and views.

Plaintexts here are test values; no assertion message prints one."""

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import connect, new_role, sqlstate

pytestmark = pytest.mark.all_versions

PII, PLAID = "pii", "plaid_tokens"


def one(c, sql, params=None):
    return c.execute(sql, params).fetchone()[0]


def refused(c, sql, params=None, keyring=PLAID, privilege="decrypt"):
    """The statement fails with 42501 naming keyring, privilege and role."""
    with pytest.raises(psycopg.Error) as e:
        c.execute(sql, params)
    assert e.value.sqlstate == "42501", f"{sql}: {e.value.sqlstate}"
    msg = e.value.diag.message_primary
    assert f'keyring "{keyring}"' in msg and privilege in msg, msg
    role = one(c, "SELECT current_user")
    assert f'role "{role}"' in msg, msg
    return e.value


def grant(c, keyring, role, privilege):
    c.execute("SELECT manna_crypt.grant_keyring_access(%s, %s, %s)", (keyring, role, privilege))


def revoke(c, keyring, role, privilege):
    c.execute("SELECT manna_crypt.revoke_keyring_access(%s, %s, %s)", (keyring, role, privilege))


@pytest.fixture
def setup(fresh_db):
    """Keyrings pii and plaid_tokens (AES-GCM) and fpii / fplaid (Fernet),
    a table of values under each, and a LOGIN role `support` in
    manna_crypt_user granted decrypt on pii and fpii only."""
    with connect(fresh_db) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("SELECT manna_crypt.create_keyring('pii'), manna_crypt.create_keyring('plaid_tokens')")
        keys = {}
        for ring in ("fpii", "fplaid"):
            keys[ring] = Fernet.generate_key()
            c.execute("SELECT manna_crypt.import_fernet_key(%s, %s)", (ring, keys[ring].decode()))
        c.execute("CREATE TABLE vals (ring text PRIMARY KEY, t text, b bytea)")
        for ring in (PII, PLAID):
            c.execute(
                "INSERT INTO vals VALUES (%s, manna_crypt.encrypt_gcm('v-' || %s, %s),"
                " manna_crypt.encrypt_gcm(convert_to('b-' || %s, 'UTF8'), %s::text))",
                (ring, ring, ring, ring, ring),
            )
        for ring in ("fpii", "fplaid"):
            c.execute("INSERT INTO vals VALUES (%s, %s)",
                      (ring, Fernet(keys[ring]).encrypt(f"f-{ring}".encode()).decode()))
        support = new_role(c, "IN ROLE manna_crypt_user")
        c.execute("GRANT SELECT ON vals TO PUBLIC")
        grant(c, PII, support, "decrypt")
        grant(c, "fpii", support, "decrypt")
        yield c, fresh_db, support


def test_decrypt_paths(setup):
    c, db, support = setup
    with connect(db, user=support) as s:
        val = lambda ring, col="t": one(c, f"SELECT {col} FROM vals WHERE ring = %s", (ring,))
        assert one(s, "SELECT manna_crypt.decrypt_gcm(%s::text)", (val(PII),)) == "v-pii"
        refused(s, "SELECT manna_crypt.decrypt_gcm(%s::text)", (val(PLAID),))
        assert bytes(one(s, "SELECT manna_crypt.decrypt_gcm(%s::bytea)", (val(PII, "b"),))) == b"b-pii"
        refused(s, "SELECT manna_crypt.decrypt_gcm(%s::bytea)", (val(PLAID, "b"),))
        assert one(s, "SELECT manna_crypt.decrypt_any(%s)", (val(PII),)) == "v-pii"
        refused(s, "SELECT manna_crypt.decrypt_any(%s)", (val(PLAID),))
        assert one(s, "SELECT manna_crypt.decrypt_any(%s, NULL, 'fpii')", (val("fpii"),)) == "f-fpii"
        refused(s, "SELECT manna_crypt.decrypt_any(%s, NULL, 'fplaid')", (val("fplaid"),), "fplaid")
        assert one(s, "SELECT manna_crypt.decrypt_fernet(%s, 'fpii')", (val("fpii"),)) == "f-fpii"
        refused(s, "SELECT manna_crypt.decrypt_fernet(%s, 'fplaid')", (val("fplaid"),), "fplaid")
        # In a query over many rows: refused as a whole, never a partial answer.
        refused(s, "SELECT manna_crypt.decrypt_gcm(t) FROM vals WHERE ring IN ('pii', 'plaid_tokens')")
        # Decrypt only: encrypting, even under pii, is refused.
        refused(s, "SELECT manna_crypt.encrypt_gcm('x'::text, 'pii'::text)", keyring=PII,
                privilege="encrypt")
        # The error names the keyring and the role, never the value.
        e = refused(s, "SELECT manna_crypt.decrypt_gcm(%s::text)", (val(PLAID),))
        text = " ".join(filter(None, [e.diag.message_primary, e.diag.message_detail,
                                      e.diag.message_hint]))
        assert "v-plaid" not in text and val(PLAID) not in text
        # In parallel workers too (each loads the grants itself).
        force = "debug_parallel_query" if s.info.server_version >= 160000 else "force_parallel_mode"
        s.execute(f"SET {force} = on")
        assert one(s, "SELECT count(manna_crypt.decrypt_gcm(t)) FROM vals WHERE ring = 'pii'") == 1
        refused(s, "SELECT count(manna_crypt.decrypt_gcm(t)) FROM vals WHERE ring = 'plaid_tokens'")
        s.execute(f"RESET {force}")
        # Unknown keyring and unknown key stay 42704 (found before the check).
        assert sqlstate(s, "SELECT manna_crypt.encrypt_gcm('x'::text, 'nope'::text)") == "42704"


def test_encrypt_paths(setup):
    c, db, support = setup
    grant(c, PII, support, "encrypt")
    with connect(db, user=support) as s:
        ct = one(s, "SELECT manna_crypt.encrypt_gcm('w'::text, 'pii'::text)")
        assert one(s, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "w"
        assert one(s, "SELECT manna_crypt.encrypt_gcm('w'::bytea, 'pii'::text)") is not None
        refused(s, "SELECT manna_crypt.encrypt_gcm('w'::text, 'plaid_tokens'::text)", privilege="encrypt")
        refused(s, "SELECT manna_crypt.encrypt_gcm('w'::bytea, 'plaid_tokens'::text)", privilege="encrypt")
        # Raw keys need no grant.
        key = bytes(range(32))
        assert one(s, "SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('r'::text, %s), %s)",
                   (key, key)) == "r"


def test_protected_columns(setup):
    c, db, support = setup
    for ring in (PII, PLAID):
        c.execute(f"CREATE TABLE p_{ring} (id int PRIMARY KEY, k int NOT NULL, s text)")
        c.execute(f"SELECT manna_crypt.protect_column('p_{ring}', 's', %s, 'k')", (ring,))
        c.execute(f"INSERT INTO p_{ring} VALUES (1, 1, 'one'), (2, 2, 'two')")
        c.execute(f'GRANT ALL ON p_{ring} TO "{support}"')
    with connect(db, user=support) as s:
        # Writing plaintext needs encrypt on the column's keyring.
        refused(s, "INSERT INTO p_pii VALUES (3, 3, 'three')", keyring=PII, privilege="encrypt")
        grant(c, PII, support, "encrypt")
        s.execute("INSERT INTO p_pii VALUES (3, 3, 'three')")
        refused(s, "INSERT INTO p_plaid_tokens VALUES (3, 3, 'three')", privilege="encrypt")
        # An UPDATE writing a ciphertext is verified: decrypt on its keyring.
        s.execute("UPDATE p_pii SET s = manna_crypt.encrypt_gcm('new', 'pii', '1') WHERE id = 1")
        grant(c, PLAID, support, "encrypt")
        refused(s, "UPDATE p_plaid_tokens SET s = manna_crypt.encrypt_gcm('new', 'plaid_tokens', '1')"
                   " WHERE id = 1")
        # Changing the AAD re-binds the value: decrypt (and encrypt).
        s.execute("UPDATE p_pii SET k = 10 WHERE id = 1")
        assert one(c, "SELECT manna_crypt.decrypt_gcm(s, '10') FROM p_pii WHERE id = 1") == "new"
        refused(s, "UPDATE p_plaid_tokens SET k = 10 WHERE id = 1")
        # The stored values are untouched by the refusals.
        assert one(c, "SELECT manna_crypt.decrypt_gcm(s, '1') FROM p_plaid_tokens WHERE id = 1") == "one"


def test_reencryption_procedures(setup):
    """The caller is checked before the batches switch to the table's owner,
    who holds no grant at all: decrypt on the source, encrypt on the target."""
    c, db, support = setup
    owner = new_role(c)
    routines = ("_reencrypt_run", "migrate_fernet", "rewrap_column", "encrypt_column")
    for r in routines:
        c.execute(f'GRANT EXECUTE ON PROCEDURE manna_crypt.{r} TO "{support}"')
    for f in ("_reencrypt_start", "_reencrypt_step", "_reencrypt_finish", "_reencrypt_result"):
        c.execute(f'GRANT EXECUTE ON FUNCTION manna_crypt.{f} TO "{support}"')
    for ring in (PII, PLAID):
        c.execute(f"CREATE TABLE r_{ring} (id int PRIMARY KEY, s text, f text)")
        fernet_ring = {PII: "fpii", PLAID: "fplaid"}[ring]
        c.execute(f"INSERT INTO r_{ring} SELECT i, 'plain-' || i, f FROM generate_series(1, 5) i,"
                  " (SELECT t AS f FROM vals WHERE ring = %s) v", (fernet_ring,))
        c.execute(f'ALTER TABLE r_{ring} OWNER TO "{owner}"')
        c.execute(f'GRANT SELECT, UPDATE ON r_{ring} TO "{support}"')
    # A protected column owned by the grant-less owner: the batch's write
    # fires the protect trigger as the owner.
    c.execute("CREATE TABLE r_prot (id int PRIMARY KEY, s text)")
    c.execute("SELECT manna_crypt.protect_column('r_prot', 's', 'pii', 'id')")
    c.execute("INSERT INTO r_prot SELECT i, 'p-' || i FROM generate_series(1, 5) i")
    c.execute("SELECT manna_crypt.rotate_keyring('pii')")
    c.execute('ALTER TABLE r_prot OWNER TO "{}"'.format(owner))
    c.execute(f'GRANT SELECT, UPDATE ON r_prot TO "{support}"')
    grant(c, PII, support, "encrypt")
    with connect(db, user=support) as s:
        s.execute("SET client_min_messages = warning")
        s.execute("CALL manna_crypt.encrypt_column('r_pii', 's', 'pii', aad_column => 'id')")
        refused(s, "CALL manna_crypt.encrypt_column('r_plaid_tokens', 's', 'plaid_tokens', aad_column => 'id')",
                privilege="encrypt")
        s.execute("CALL manna_crypt.migrate_fernet('r_pii', 'f', 'fpii', 'pii')")
        refused(s, "CALL manna_crypt.migrate_fernet('r_plaid_tokens', 'f', 'fplaid', 'pii')",
                keyring="fplaid")
        refused(s, "CALL manna_crypt.migrate_fernet('r_plaid_tokens', 'f', 'fpii', 'plaid_tokens')",
                privilege="encrypt")
        refused(s, "CALL manna_crypt.rewrap_column('r_plaid_tokens', 's', 'plaid_tokens')",
                privilege="decrypt")
        s.execute("CALL manna_crypt.rewrap_column('r_prot', 's', 'pii')")
    assert one(c, "SELECT count(*) FROM r_pii WHERE manna_crypt.decrypt_gcm(s, id::text) LIKE 'plain-%'") == 5
    assert one(c, "SELECT count(*) FROM r_pii WHERE manna_crypt.decrypt_gcm(f) = 'f-fpii'") == 5
    assert one(c, "SELECT count(*) FROM r_plaid_tokens WHERE s LIKE 'plain-%'") == 5
    active = one(c, "SELECT key_id FROM manna_crypt.keys WHERE keyring = 'pii' AND status = 'active'")
    assert one(c, "SELECT count(*) FROM r_prot WHERE manna_crypt.key_id(s) = %s", (active,)) == 5
    # Without decrypt on pii, the rewrap is refused before any batch.
    revoke(c, PII, support, "decrypt")
    c.execute("SELECT manna_crypt.rotate_keyring('pii')")
    with connect(db, user=support) as s:
        refused(s, "CALL manna_crypt.rewrap_column('r_prot', 's', 'pii')", keyring=PII)


def test_group_roles_and_inherit(setup):
    c, db, _ = setup
    group = new_role(c, "IN ROLE manna_crypt_user")
    grant(c, PLAID, group, "decrypt")
    member = new_role(c, "IN ROLE manna_crypt_user")
    c.execute(f'GRANT "{group}" TO "{member}"')
    nested = new_role(c, "IN ROLE manna_crypt_user")
    c.execute(f'GRANT "{member}" TO "{nested}"')
    ct = one(c, "SELECT t FROM vals WHERE ring = 'plaid_tokens'")
    for role in (member, nested):
        with connect(db, user=role) as m:
            assert one(m, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "v-plaid_tokens"
            # The group's grant is not the member's: pii stays closed.
            refused(m, "SELECT manna_crypt.decrypt_gcm(t) FROM vals WHERE ring = 'pii'", keyring=PII)
    if c.info.server_version < 160000:
        return
    # 16+: a membership granted WITH INHERIT FALSE gives nothing until SET ROLE.
    other = new_role(c, "IN ROLE manna_crypt_user")
    c.execute(f'GRANT "{group}" TO "{other}" WITH INHERIT FALSE')
    with connect(db, user=other) as o:
        refused(o, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,))
        o.execute(f'SET ROLE "{group}"')
        assert one(o, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "v-plaid_tokens"


def test_revoke_and_membership_seen_by_next_transaction(setup):
    c, db, support = setup
    group = new_role(c)
    grant(c, PLAID, group, "decrypt")
    ct = one(c, "SELECT t FROM vals WHERE ring = 'pii'")
    ct2 = one(c, "SELECT t FROM vals WHERE ring = 'plaid_tokens'")
    with connect(db, user=support) as s:
        dec = "SELECT manna_crypt.decrypt_gcm(%s::text)"
        assert one(s, dec, (ct,)) == "v-pii"
        revoke(c, PII, support, "decrypt")          # another session, committed
        refused(s, dec, (ct,), keyring=PII)
        grant(c, PII, support, "decrypt")
        assert one(s, dec, (ct,)) == "v-pii"
        # Membership: touches no manna_crypt table.
        refused(s, dec, (ct2,))
        c.execute(f'GRANT "{group}" TO "{support}"')
        assert one(s, dec, (ct2,)) == "v-plaid_tokens"
        c.execute(f'REVOKE "{group}" FROM "{support}"')
        refused(s, dec, (ct2,))
        # Administrators pass; losing manna_crypt_admin is seen too.
        c.execute(f'GRANT manna_crypt_admin TO "{support}"')
        assert one(s, dec, (ct2,)) == "v-plaid_tokens"
        c.execute(f'REVOKE manna_crypt_admin FROM "{support}"')
        refused(s, dec, (ct2,))
        # A revoke inside a transaction that has not committed changes nothing
        # for others; its commit is seen by their next transaction.
        with connect(db, autocommit=False) as a:
            a.execute("SELECT manna_crypt.revoke_keyring_access('pii', %s, 'decrypt')", (support,))
            assert one(s, dec, (ct,)) == "v-pii"
            a.commit()
        refused(s, dec, (ct,), keyring=PII)


def test_drop_role_and_same_name(setup):
    c, db, _ = setup
    name = new_role(c, "IN ROLE manna_crypt_user")
    grant(c, PLAID, name, "decrypt")
    ct = one(c, "SELECT t FROM vals WHERE ring = 'plaid_tokens'")
    with connect(db, user=name) as s:
        assert one(s, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "v-plaid_tokens"
    c.execute(f'DROP ROLE "{name}"')     # nothing of ours blocks it
    assert c.execute("SELECT state FROM manna_crypt.keyring_access WHERE grantee = %s",
                     (name,)).fetchall() == [("role dropped",)]
    c.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE manna_crypt_user')
    with connect(db, user=name) as s:
        refused(s, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,))
    # The next grant or revoke prunes the dead row.
    grant(c, PII, name, "encrypt")
    assert c.execute("SELECT keyring, privilege, state FROM manna_crypt.keyring_access"
                     " WHERE grantee = %s", (name,)).fetchall() == [(PII, "encrypt", "granted")]
    # A renamed role keeps its grants (judged by OID), under its new name.
    c.execute(f'ALTER ROLE "{name}" RENAME TO "{name}_x"')
    with connect(db, user=f"{name}_x") as s:
        assert one(s, "SELECT manna_crypt.encrypt_gcm('x'::text, 'pii'::text)") is not None
    assert one(c, "SELECT grantee FROM manna_crypt.keyring_access WHERE keyring = 'pii'"
                  " AND privilege = 'encrypt' AND grantee LIKE %s", (name + "%",)) == f"{name}_x"


def test_grant_management(setup):
    c, db, support = setup
    E = lambda code, *a: sqlstate(c, "SELECT manna_crypt.grant_keyring_access(%s, %s, %s)", a) == code
    assert E("42704", "nope", support, "decrypt")
    assert E("22023", "Bad Name", support, "decrypt")
    assert E("22023", PII, support, "read")
    assert E("22023", None, support, "decrypt")
    assert E("22023", PII, None, "decrypt")
    assert E("22023", PII, support, None)
    assert E("42704", PII, "no_such_role_x", "decrypt")
    assert sqlstate(c, "SELECT manna_crypt.revoke_keyring_access('nope', %s, 'all')", (support,)) == "42704"
    # 'all' and '*'
    grant(c, "*", support, "all")
    assert sorted(c.execute("SELECT privilege FROM manna_crypt.keyring_access WHERE keyring = '*'"
                            " AND grantee = %s", (support,)).fetchall()) == [
        ("blind_index",), ("decrypt",), ("encrypt",)]
    with connect(db, user=support) as s:
        c.execute("SELECT manna_crypt.create_keyring('later')")
        assert one(s, "SELECT manna_crypt.encrypt_gcm('x'::text, 'later'::text)") is not None
    revoke(c, "*", support, "all")
    # Audited, with grantee and privilege.
    events = c.execute("SELECT event, keyring, detail->>'grantee', detail->>'privilege'"
                       " FROM manna_crypt.audit_log WHERE event LIKE '%%keyring_access'"
                       " ORDER BY id").fetchall()
    assert (("grant_keyring_access", PII, support, "decrypt") in events
            and ("revoke_keyring_access", "*", support, "blind_index") in events)
    # Only administrators, whoever else has EXECUTE.
    c.execute("GRANT EXECUTE ON FUNCTION manna_crypt.grant_keyring_access(text, regrole, text),"
              f' manna_crypt.revoke_keyring_access(text, regrole, text) TO "{support}"')
    with connect(db, user=support) as s:
        assert sqlstate(s, "SELECT manna_crypt.grant_keyring_access('plaid_tokens', current_user::regrole,"
                           " 'decrypt')") == "42501"
        assert sqlstate(s, "SELECT manna_crypt.revoke_keyring_access('pii', current_user::regrole,"
                           " 'decrypt')") == "42501"
        assert sqlstate(s, "SELECT * FROM manna_crypt.keyring_access") == "42501"
    admin = new_role(c, "IN ROLE manna_crypt_admin")
    with connect(db, user=admin) as a:
        grant(a, PLAID, support, "decrypt")
        assert one(a, "SELECT count(*) FROM manna_crypt.keyring_access WHERE grantee = %s",
                   (support,)) == 3


def test_security_definer_and_views(setup):
    """A SECURITY DEFINER function is judged for its owner; a view's function
    calls for the role querying the view."""
    c, db, support = setup
    nobody = new_role(c, "IN ROLE manna_crypt_user")
    c.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{support}"')
    ct = one(c, "SELECT t FROM vals WHERE ring = 'pii'")
    with connect(db, user=support) as s:
        s.execute("CREATE FUNCTION read_pii(ct text) RETURNS text SECURITY DEFINER"
                  " SET search_path = pg_catalog LANGUAGE sql AS"
                  " $$ SELECT manna_crypt.decrypt_gcm(ct) $$")
        s.execute(f'GRANT EXECUTE ON FUNCTION read_pii(text) TO "{nobody}"')
        s.execute("CREATE VIEW pii_view AS SELECT manna_crypt.decrypt_gcm(t) AS v FROM vals WHERE ring = 'pii'")
        s.execute(f'GRANT SELECT ON pii_view TO "{nobody}"')
    with connect(db, user=nobody) as n:
        refused(n, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,), keyring=PII)
        assert one(n, "SELECT read_pii(%s)", (ct,)) == "v-pii"
        refused(n, "SELECT v FROM pii_view", keyring=PII)
