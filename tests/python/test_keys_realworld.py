"""Key management in the situations operators meet (docs/DESIGN.md section 2):
pg_dump/restore into another cluster, a hot standby, and what reaches the
server log. Each test runs on clusters of its own (mc_cluster.Cluster).
"""

import base64
import os
import secrets
import time

import psycopg
import pytest
from cryptography.fernet import Fernet

from mc_cluster import (
    Cluster,
    error_text,
    expect_error,
    key_forms,
    new_root_key,
    seal,
    text_of,
    unwrap_data_key,
    wrapped_keys,
)

E = expect_error


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


# ---- (a) pg_dump and restore -------------------------------------------------------------


def populate(conn):
    """Keyrings in several states and a table of encrypted rows. Returns the
    expected plaintexts by id, and the key ids."""
    k_pii = one(conn, "SELECT manna_crypt.create_keyring('pii', interval '90 days')")
    one(conn, "SELECT manna_crypt.create_keyring('financial_data')")
    conn.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", (Fernet.generate_key().decode(),))
    conn.execute(
        "CREATE TABLE customers (id int PRIMARY KEY, email manna_crypt.encrypted_text, "
        "iban manna_crypt.encrypted_text, photo bytea, tenant text)"
    )
    expected = {}
    for i in range(1, 41):
        if i == 21:
            conn.execute("SELECT manna_crypt.rotate_keyring('pii')")
        email, iban, photo = f"user{i}@example.com", f"DE{i:020d}", os.urandom(16 + i)
        conn.execute(
            "INSERT INTO customers VALUES (%s, manna_crypt.encrypt_gcm(%s::text, 'pii'::text), "
            "manna_crypt.encrypt_gcm(%s::text, 'financial_data'::text, %s), "
            "manna_crypt.encrypt_gcm(%s::bytea, 'pii'::text), %s)",
            (i, email, iban, f"tenant-{i % 3}", photo, f"tenant-{i % 3}"),
        )
        expected[i] = (email, iban, photo)
    # A revoked version and a destroyed one travel with the dump too.
    k_old = one(conn, "SELECT manna_crypt.create_keyring('retired')")
    conn.execute("SELECT manna_crypt.rotate_keyring('retired')")
    revoked = one(conn, "SELECT manna_crypt.rotate_keyring('retired')")
    ct_revoked = one(conn, "SELECT manna_crypt.encrypt_gcm('gone'::text, 'retired'::text)")
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (k_old,))
    conn.execute("SELECT manna_crypt.destroy_key(%s)", (k_old,))
    conn.execute("SELECT manna_crypt.rotate_keyring('retired')")
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (revoked,))
    return expected, {"pii_v1": k_pii, "destroyed": k_old, "revoked": revoked, "ct_revoked": ct_revoked}


def check_rows(conn, expected):
    rows = conn.execute(
        "SELECT id, manna_crypt.decrypt_gcm(email), manna_crypt.decrypt_gcm(iban, tenant), "
        "manna_crypt.decrypt_gcm(photo) FROM customers ORDER BY id"
    ).fetchall()
    assert len(rows) == len(expected)
    for i, email, iban, photo in rows:
        assert (email, iban, bytes(photo)) == expected[i], f"row {i} differs"


def key_state(conn):
    return conn.execute(
        "SELECT key_id, keyring, kind, version, status, root_fingerprint FROM manna_crypt.keys ORDER BY key_id"
    ).fetchall()


def test_dump_and_restore_into_other_clusters(tmp_path):
    key = new_root_key()
    with Cluster("dump_src", root_key=key) as src, Cluster("dump_dst", root_key=key) as dst:
        src.create_db_with_extension("app")
        with src.connect("app") as c:
            expected, ids = populate(c)
            keys_before = key_state(c)
            audit_before = one(c, "SELECT count(*) FROM manna_crypt.audit_log")
            check_rows(c, expected)

        dump_c = tmp_path / "app.dump"
        src.pg_tool("pg_dump", "-Fc", "-f", str(dump_c), "app")
        dump_p = tmp_path / "app.sql"
        src.pg_tool("pg_dump", "-Fp", "-f", str(dump_p), "app")
        # The dump holds wrapped keys only: no root key, no data key.
        wrapped = {}
        with src.connect("app") as c:
            for kid, w in wrapped_keys(c).items():
                wrapped[kid] = unwrap_data_key(key, kid, w)
        text = dump_p.read_text()
        for k in [bytes.fromhex(key), *wrapped.values()]:
            assert not any(f in text for f in key_forms(k)), "key material in the dump"
        assert "manna_crypt.data_keys" in text

        # Same root key, another cluster: custom format via pg_restore, plain
        # format via psql.
        with dst.connect() as c:
            c.execute("CREATE DATABASE restored_c")
            c.execute("CREATE DATABASE restored_p")
        dst.pg_tool("pg_restore", "--exit-on-error", "-d", "restored_c", str(dump_c))
        dst.psql("restored_p", "-f", str(dump_p))
        for db in ("restored_c", "restored_p"):
            with dst.connect(db) as c:
                check_rows(c, expected)
                assert key_state(c) == keys_before
                assert one(c, "SELECT count(*) FROM manna_crypt.audit_log") == audit_before
                E(c, "55000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ids["ct_revoked"],))
                assert one(c, "SELECT wrapped FROM manna_crypt.data_keys WHERE key_id = %s",
                           (ids["destroyed"],)) is None
                # The key id sequence came along: new keys do not collide.
                new = one(c, "SELECT manna_crypt.rotate_keyring('pii')")
                assert new > max(k[0] for k in keys_before)
                assert one(c, "SELECT manna_crypt.import_fernet_key('legacy2', %s)",
                           (Fernet.generate_key().decode(),)) == new + 1
                ct = one(c, "SELECT manna_crypt.encrypt_gcm('after restore'::text, 'pii'::text)")
                assert one(c, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "after restore"
                # The restored tables are still protected.
                E(c, "42501", "DELETE FROM manna_crypt.audit_log")
                assert one(c, "SELECT manna_crypt.info()")["root_key"]["matches_stored_keys"] is True

        # A different root key: the restored data is recognisably unreadable.
        other = new_root_key()
        dst.configure(**{"manna_crypt.root_key_file": str(dst.write_key_file("other.key", other))})
        dst.restart()
        with dst.connect("restored_c") as c:
            e = E(c, "F0000", "SELECT manna_crypt.decrypt_gcm(email) FROM customers WHERE id = 1")
            assert e.diag.message_primary == "root key does not match"
            E(c, "F0000", "SELECT manna_crypt.decrypt_gcm(photo) FROM customers WHERE id = 30")
            E(c, "F0000", "SELECT manna_crypt.encrypt_gcm('x'::text, 'pii'::text)")
            text = error_text(e)
            assert key not in text and other not in text
        # And a fresh restore under the other key fails the same way.
        with dst.connect() as c:
            c.execute("CREATE DATABASE restored_other")
        dst.pg_tool("pg_restore", "--exit-on-error", "-d", "restored_other", str(dump_c))
        with dst.connect("restored_other") as c:
            E(c, "F0000", "SELECT manna_crypt.decrypt_gcm(email) FROM customers WHERE id = 2")


# ---- (b) hot standby ------------------------------------------------------------------------


def test_hot_standby():
    key = new_root_key()
    with Cluster("primary", root_key=key) as primary:
        primary.create_db_with_extension("app")
        with primary.connect("app") as p:
            k1 = one(p, "SELECT manna_crypt.create_keyring('pii')")
            p.execute("CREATE TABLE t (id int PRIMARY KEY, v manna_crypt.encrypted_text, b bytea)")
            for i in range(10):
                p.execute(
                    "INSERT INTO t VALUES (%s, manna_crypt.encrypt_gcm(%s::text, 'pii'::text, 'row'), "
                    "manna_crypt.encrypt_gcm(%s::bytea, 'pii'::text))",
                    (i, f"before-{i}", f"bin-{i}".encode()),
                )
        standby = primary.make_standby()
        try:
            with standby.connect("app") as s:
                assert one(s, "SELECT pg_is_in_recovery()") is True
                rows = s.execute(
                    "SELECT id, manna_crypt.decrypt_gcm(v, 'row'), manna_crypt.decrypt_gcm(b) FROM t ORDER BY id"
                ).fetchall()
                assert [(r[0], r[1], bytes(r[2])) for r in rows] == [
                    (i, f"before-{i}", f"bin-{i}".encode()) for i in range(10)
                ]
                info = one(s, "SELECT manna_crypt.info()")
                assert info["root_key"]["matches_stored_keys"] is True
                # Key changes are writes: refused like any write on a standby.
                for sql in ("SELECT manna_crypt.create_keyring('x')",
                            f"SELECT manna_crypt.revoke_key({k1})",
                            "SELECT manna_crypt.rotate_keyring('pii')",
                            "SELECT manna_crypt.rewrap_keys()",
                            "SELECT * FROM manna_crypt.rotate_due()"):
                    E(s, "25006", sql)
                # Encryption needs no write and works on the standby.
                ct = one(s, "SELECT manna_crypt.encrypt_gcm('made on standby'::text, 'pii'::text)")
                assert one(s, "SELECT manna_crypt.key_id(%s::text)", (ct,)) == k1
            with primary.connect("app") as p:
                assert one(p, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "made on standby"

            # A keyring created after the standby started.
            with primary.connect("app") as p:
                k2 = one(p, "SELECT manna_crypt.create_keyring('late')")
                p.execute("INSERT INTO t VALUES (100, manna_crypt.encrypt_gcm('late row'::text, 'late'::text, 'row'))")
            standby.wait_for("app", "SELECT EXISTS (SELECT FROM t WHERE id = 100)")
            # A session that was open before the revocation, with k1 cached.
            with standby.connect("app") as s:
                assert one(s, "SELECT manna_crypt.decrypt_gcm(v, 'row') FROM t WHERE id = 100") == "late row"
                assert one(s, "SELECT manna_crypt.key_id(v) FROM t WHERE id = 100") == k2
                assert one(s, "SELECT manna_crypt.decrypt_gcm(v, 'row') FROM t WHERE id = 1") == "before-1"

                with primary.connect("app") as p:
                    p.execute("SELECT manna_crypt.rotate_keyring('pii')")
                    # t.v is an encrypted_text column: it protects k1, so
                    # revoking a key still in use takes force.
                    p.execute("SELECT manna_crypt.revoke_key(%s, force => true)", (k1,))
                standby.wait_for("app", "SELECT status = 'revoked' FROM manna_crypt.keys WHERE key_id = %s", (k1,))
                # The standby session's next transaction refuses the key.
                e = E(s, "55000", "SELECT manna_crypt.decrypt_gcm(v, 'row') FROM t WHERE id = 1")
                assert "revoked" in e.diag.message_primary
                # New encryptions on the standby use the new active version.
                ct = one(s, "SELECT manna_crypt.encrypt_gcm('x'::text, 'pii'::text)")
                assert one(s, "SELECT manna_crypt.key_id(%s::text)", (ct,)) != k1
                assert one(s, "SELECT manna_crypt.decrypt_gcm(v, 'row') FROM t WHERE id = 100") == "late row"
        finally:
            standby.cleanup()


# ---- (c) log hygiene -----------------------------------------------------------------------


def test_server_log_holds_no_key_material_or_client_plaintext():
    key_a, key_b, key_wrong = new_root_key(), new_root_key(), new_root_key()
    canary = "PLAINTEXT-CANARY-" + secrets.token_hex(8)
    fernet_key = Fernet.generate_key().decode()
    settings = {
        "log_statement": "all",
        "log_min_messages": "debug1",
        "log_error_verbosity": "verbose",
        "log_min_error_statement": "error",
        "log_connections": True,
    }
    seen_errors = []

    def fail(conn, sqlstate, sql, params=None):
        seen_errors.append(error_text(expect_error(conn, sqlstate, sql, params)))

    with Cluster("logs", root_key=key_a, settings=settings) as c:
        file_a = c.settings["manna_crypt.root_key_file"]
        c.create_db_with_extension("app")
        with c.connect("app") as x:
            k1 = one(x, "SELECT manna_crypt.create_keyring('pii')")
            x.execute("CREATE TABLE t (id int, v manna_crypt.encrypted_text, aad text)")
            x.execute("INSERT INTO t VALUES (1, manna_crypt.encrypt_gcm('server side'::text, 'pii'::text, 'a1'), 'a1')")
            assert one(x, "SELECT manna_crypt.decrypt_gcm(v, aad) FROM t WHERE id = 1") == "server side"

            # The canary only ever enters the database encrypted, sealed in
            # Python under the keyring's own data key (unwrapped here).
            dk1 = unwrap_data_key(key_a, k1, wrapped_keys(x, k1)[k1])
            ct = text_of(seal(dk1, k1, canary.encode(), b"a2"))
            x.execute("INSERT INTO t VALUES (2, %s, 'a2')", (ct,))
            # Decrypted server side, results go back to the client only.
            assert one(x, "SELECT manna_crypt.decrypt_gcm(v, aad) FROM t WHERE id = 2") == canary
            with x.cursor() as cur:  # and with a bind parameter
                cur.execute("SELECT manna_crypt.decrypt_gcm(%s::text, %s)", (ct, "a2"))
                assert cur.fetchone()[0] == canary
            x.execute("CREATE TABLE copy AS SELECT manna_crypt.decrypt_gcm(v, aad) AS p FROM t")
            assert one(x, "SELECT count(*) FROM copy WHERE p = manna_crypt.decrypt_gcm((SELECT v FROM t WHERE id = 2), 'a2')") == 1
            fail(x, "39000", "SELECT manna_crypt.decrypt_gcm(v, 'wrong') FROM t WHERE id = 2")
            fail(x, "39000", "SELECT manna_crypt.decrypt_gcm(v) FROM t WHERE id = 2")

            k2 = one(x, "SELECT manna_crypt.rotate_keyring('pii')")
            x.execute("INSERT INTO t VALUES (3, manna_crypt.encrypt_gcm('v2'::text, 'pii'::text, 'a3'), 'a3')")
            x.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", (fernet_key,))
            kdel = one(x, "SELECT manna_crypt.create_keyring('doomed')")
            ct_doomed = one(x, "SELECT manna_crypt.encrypt_gcm('x'::text, 'doomed'::text)")
            x.execute("SELECT manna_crypt.revoke_key(%s)", (kdel,))
            fail(x, "55000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct_doomed,))
            dk_doomed = unwrap_data_key(key_a, kdel, wrapped_keys(x, kdel)[kdel])
            x.execute("SELECT manna_crypt.destroy_key(%s)", (kdel,))
            fail(x, "55000", "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct_doomed,))
            fail(x, "42704", "SELECT manna_crypt.encrypt_gcm('x'::text, 'nope'::text)")
            fail(x, "22023", "SELECT manna_crypt.create_keyring('Bad Name')")
            fail(x, "22023", "SELECT manna_crypt.encrypt_gcm('x'::text, 'legacy'::text)")
            fail(x, "42710", "SELECT manna_crypt.create_keyring('pii')")
            x.execute("SELECT manna_crypt.info()")
            dk2 = unwrap_data_key(key_a, k2, wrapped_keys(x, k2)[k2])

        # Root-key rotation A -> B.
        file_b = c.write_key_file("b.key", key_b)
        c.configure(**{"manna_crypt.root_key_file": str(file_b), "manna_crypt.previous_root_key_file": file_a})
        c.reload()
        with c.connect("app") as x:
            assert one(x, "SELECT manna_crypt.rewrap_keys()") == 3
            x.execute("SELECT manna_crypt.info()")
        c.configure(**{"manna_crypt.previous_root_key_file": None})
        c.reload()
        with c.connect("app") as x:
            assert one(x, "SELECT manna_crypt.decrypt_gcm(v, aad) FROM t WHERE id = 2") == canary
            assert one(x, "SELECT manna_crypt.rewrap_keys()") == 0
            x.execute("SELECT manna_crypt.info()")
        # A wrong root key, a bad key file, a failing command.
        c.configure(**{"manna_crypt.root_key_file": str(c.write_key_file("wrong.key", key_wrong))})
        c.reload()
        with c.connect("app") as x:
            fail(x, "F0000", "SELECT manna_crypt.decrypt_gcm(v, aad) FROM t WHERE id = 2")
            x.execute("SELECT manna_crypt.info()")
        c.configure(**{"manna_crypt.root_key_file": str(c.write_key_file("bad.key", key_wrong[:-2] + "zz"))})
        c.reload()
        with c.connect("app") as x:
            fail(x, "58030", "SELECT manna_crypt.decrypt_gcm(v, aad) FROM t WHERE id = 2")
        script = c.write_script("leaky.sh", f"echo {key_wrong} >&2\necho {key_b}\nexit 1\n")
        c.configure(**{"manna_crypt.root_key_file": None, "manna_crypt.root_key_command": str(script)})
        c.reload()
        with c.connect("app") as x:
            fail(x, "58030", "SELECT manna_crypt.decrypt_gcm(v, aad) FROM t WHERE id = 2")
        c.stop()
        log = c.log_text()

    # The log really is verbose: statements (their literals replaced by
    # manna_crypt.redact_log, on by default), locations, the errors above.
    assert "LOG:  00000: statement: SELECT manna_crypt.create_keyring('<redacted>')" in log
    assert "root key does not match" in log and "39000" in log and "58030" in log
    assert len(seen_errors) == 11

    secrets_ = {
        "root key A": bytes.fromhex(key_a),
        "root key B": bytes.fromhex(key_b),
        "wrong root key": bytes.fromhex(key_wrong),
        "data key v1": dk1,
        "data key v2": dk2,
        "destroyed data key": dk_doomed,
    }
    for what, k in secrets_.items():
        for form in key_forms(k):
            assert form not in log, f"{what} appears in the server log"
            for err in seen_errors:
                assert form not in err, f"{what} appears in an error message"
    # Halves of a key would be a leak too (e.g. a truncated dump).
    for what, k in secrets_.items():
        assert k.hex()[:32] not in log and k.hex()[32:] not in log, f"part of {what} in the log"
    assert canary not in log, "client-side plaintext appears in the server log"
    for err in seen_errors:
        assert canary not in err
    # The Fernet key was passed as a bind parameter: redact_log keeps it out
    # of the statement log (with redaction off it is import_fernet_key's
    # documented leak); never in an error, and its derived halves never
    # appear on their own.
    leaked = fernet_key in log
    assert not leaked, "the Fernet key is in the server log"
    raw = base64.urlsafe_b64decode(fernet_key)
    for half in (raw[:16], raw[16:]):
        assert half.hex() not in log
