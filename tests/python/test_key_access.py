"""Key access statistics (README "Who used which key"; src/keys/access_*.rs).

Every encrypt and decrypt under a keyring is counted per (database, role,
keyring, operation, hour) in shared memory, handed over by each backend at
the end of its transactions, shown by the key_access view (admins: every
role; others: the roles whose privileges they have), kept across a clean
restart, lost back to the last clean shutdown by a crash, reset by admins
(audited), bounded by a capacity that counts what it drops.
"""

import os
import signal
import time
from collections import Counter

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import connect, new_role, sqlstate
from mc_cluster import Cluster, new_root_key

# Shared memory, exit callbacks, parallel workers: every tested version.
pytestmark = pytest.mark.all_versions

SECRET = "kaccess-plaintext-7f3a"


def seen(conn, where="true"):
    """(role, keyring, operation) -> calls, summed over the hours."""
    rows = conn.execute(
        f"SELECT role, keyring, operation, calls FROM manna_crypt.key_access WHERE {where}"
    ).fetchall()
    out = Counter()
    for role, ring, op, n in rows:
        out[(role, ring, op)] += n
    return dict(out)


def open_keyrings(conn):
    """0.1.0's rule for this database (what the upgrade grants): every
    member of manna_crypt_user may use every keyring. The statistics are
    what these tests are about, not the keyring grants."""
    conn.execute("SET client_min_messages = warning")
    conn.execute("SELECT manna_crypt.grant_keyring_access('*', 'manna_crypt_user', 'all')")
    conn.execute("RESET client_min_messages")


def user(conn, *groups):
    open_keyrings(conn)
    role = new_role(conn)
    for g in groups or ("manna_crypt_user",):
        conn.execute(f'GRANT {g} TO "{role}"')
    return role


def test_counts_match_the_calls_of_every_path_across_backends(conn, fresh_db):
    conn.execute("SELECT manna_crypt.create_keyring('pii')")
    conn.execute("SELECT manna_crypt.create_keyring('plaid_tokens')")
    fkey = Fernet.generate_key()
    conn.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", (fkey.decode(),))
    token = Fernet(fkey).encrypt(SECRET.encode()).decode()
    conn.execute("CREATE TABLE prot (id int, v text)")
    conn.execute("SELECT manna_crypt.protect_column('prot', 'v', 'pii', 'id')")
    app, support = user(conn), user(conn)
    conn.execute(f'GRANT INSERT, SELECT ON prot TO "{app}"')
    ct_plaid = conn.execute(
        "SELECT manna_crypt.encrypt_gcm(%s, 'plaid_tokens')::text", (SECRET,)
    ).fetchone()[0]
    me = conn.execute("SELECT current_user").fetchone()[0]
    with connect(fresh_db, user=app) as a:
        a.execute("SELECT count(manna_crypt.encrypt_gcm('v' || g, 'pii')) "
                  "FROM generate_series(1, 30) g")
        a.execute("SELECT count(manna_crypt.encrypt_gcm(convert_to('v' || g, 'UTF8'), 'pii')) "
                  "FROM generate_series(1, 5) g")
        ct = a.execute("SELECT manna_crypt.encrypt_gcm(%s, 'pii', 'aad')::text",
                       (SECRET,)).fetchone()[0]
        for _ in range(4):
            a.execute("SELECT manna_crypt.decrypt_gcm(%s, 'aad')", (ct,))
        a.execute("SELECT manna_crypt.decrypt_any(%s, 'aad')", (ct,))
        # A decryption that fails to authenticate still used the key.
        assert sqlstate(a, "SELECT manna_crypt.decrypt_gcm(%s, 'other')", (ct,)) != "ok"
        for _ in range(3):
            a.execute("SELECT manna_crypt.decrypt_fernet(%s, 'legacy')", (token,))
        a.execute("SELECT manna_crypt.decrypt_any(%s, NULL, 'legacy')", (token,))
        # A transaction that rolls back still read what it decrypted.
        a.execute("BEGIN")
        a.execute("SELECT manna_crypt.decrypt_gcm(%s, 'aad')", (ct,))
        a.execute("ROLLBACK")
        # The protect trigger encrypts; reading back decrypts.
        a.execute("INSERT INTO prot SELECT g, 'p' || g FROM generate_series(1, 6) g")
        a.execute("SELECT count(manna_crypt.decrypt_gcm(v, id::text)) FROM prot")
        # Raw keys are not keyrings: not counted.
        a.execute("SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('x', "
                  "decode(repeat('00', 32), 'hex')), decode(repeat('00', 32), 'hex'))")
    with connect(fresh_db, user=support) as s:
        for _ in range(7):
            s.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct_plaid,))
    assert seen(conn) == {
        (me, "plaid_tokens", "encrypt"): 1,
        (app, "pii", "encrypt"): 30 + 5 + 1 + 6,
        (app, "pii", "decrypt"): 4 + 1 + 1 + 1 + 6,
        (app, "legacy", "decrypt"): 3 + 1,
        (support, "plaid_tokens", "decrypt"): 7,
    }
    row = conn.execute(
        "SELECT database = current_database(), bucket_start = date_trunc('hour', now()), "
        "keyring_id = (SELECT keyring_id FROM manna_crypt.keyrings WHERE name = 'pii') "
        "FROM manna_crypt.key_access WHERE keyring = 'pii' AND role = %s LIMIT 1",
        (app,),
    ).fetchone()
    assert row == (True, True, True)


def test_reencryption_counts_under_the_caller_not_the_table_owner(conn, fresh_db):
    owner = new_role(conn)
    me = conn.execute("SELECT current_user").fetchone()[0]
    conn.execute("SELECT manna_crypt.create_keyring('mig')")
    fkey = Fernet.generate_key()
    conn.execute("SELECT manna_crypt.import_fernet_key('old', %s)", (fkey.decode(),))
    f = Fernet(fkey)
    conn.execute("CREATE TABLE m (id int, a text, b text)")
    conn.execute(f'ALTER TABLE m OWNER TO "{owner}"')
    for i in range(20):
        conn.execute("INSERT INTO m VALUES (%s, %s, %s)",
                     (i, f"plain {i}", f.encrypt(b"tok").decode()))
    conn.execute("CALL manna_crypt.encrypt_column('m', 'a', 'mig')")
    conn.execute("CALL manna_crypt.migrate_fernet('m', 'b', 'old', 'mig')")
    conn.execute("SELECT manna_crypt.rotate_keyring('mig')")
    conn.execute("CALL manna_crypt.rewrap_column('m', 'a', 'mig')")
    assert seen(conn) == {
        (me, "mig", "encrypt"): 20 + 20 + 20,
        (me, "old", "decrypt"): 20,
        (me, "mig", "decrypt"): 20,
    }


def test_parallel_workers_hand_over_their_calls(conn, fresh_db):
    conn.execute("SELECT manna_crypt.create_keyring('par')")
    conn.execute("CREATE TABLE p AS SELECT manna_crypt.encrypt_gcm('v' || g, 'par')::text AS c "
                 "FROM generate_series(1, 3000) g")
    conn.execute("ANALYZE p")
    major = conn.info.server_version // 10000
    setting = "force_parallel_mode" if major < 16 else "debug_parallel_query"
    with connect(fresh_db) as c:
        for s in (f"{setting} = on", "parallel_setup_cost = 0", "parallel_tuple_cost = 0",
                  "min_parallel_table_scan_size = 0", "max_parallel_workers_per_gather = 2",
                  "parallel_leader_participation = off"):
            c.execute(f"SET {s}")
        plan = "\n".join(r[0] for r in c.execute(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) "
            "SELECT count(manna_crypt.decrypt_gcm(c)) FROM p"
        ).fetchall())
        assert "Workers Launched: 1" in plan or "Workers Launched: 2" in plan, plan
        # Only the workers decrypted (the leader does not participate), and
        # their tallies arrived by the end of the query's transaction.
        me = c.execute("SELECT current_user").fetchone()[0]
        assert seen(c)[(me, "par", "decrypt")] == 3000


def test_visibility_reset_and_settings_are_guarded(conn, fresh_db):
    conn.execute("SELECT manna_crypt.create_keyring('vis')")
    ct = conn.execute("SELECT manna_crypt.encrypt_gcm('x', 'vis')::text").fetchone()[0]
    group = new_role(conn)
    conn.execute(f'GRANT manna_crypt_user TO "{group}"')
    alice, bob = user(conn, group), user(conn)
    admin = user(conn, "manna_crypt_admin")
    with connect(fresh_db, user=alice) as a:
        a.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
        a.execute(f'SET ROLE "{group}"')
        a.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
        a.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
        a.execute("RESET ROLE")
        # Her own calls and her group's (whose privileges she has), not bob's.
        with connect(fresh_db, user=bob) as b:
            b.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
            assert seen(b) == {(bob, "vis", "decrypt"): 1}
        assert seen(a) == {(alice, "vis", "decrypt"): 1, (group, "vis", "decrypt"): 2}
        assert sqlstate(a, "SELECT manna_crypt.reset_key_access_stats()") == "42501"
        assert sqlstate(a, "SELECT * FROM manna_crypt.key_access_stats_status()") == "42501"
        assert sqlstate(a, "SET manna_crypt.key_access_log = on") == "42501"
    assert sqlstate(conn, "SET manna_crypt.key_access_max_entries = 500") == "55P02"
    with connect(fresh_db, user=admin) as ad:
        assert len(seen(ad)) == 4
        # A reset that rolls back resets nothing; a committed one is audited.
        ad.execute("BEGIN")
        ad.execute("SELECT manna_crypt.reset_key_access_stats()")
        ad.execute("ROLLBACK")
        assert len(seen(ad)) == 4
        ad.execute("SELECT manna_crypt.reset_key_access_stats()")
        assert seen(ad) == {}
        row = conn.execute(
            "SELECT role_name, detail FROM manna_crypt.audit_log "
            "WHERE event = 'reset_key_access_stats'"
        ).fetchall()
        assert row == [(admin, {"entries": 4, "calls": 5})]
    # Without the admin role nor manna_crypt_user: no access at all.
    stranger = new_role(conn)
    with connect(fresh_db, user=stranger) as s:
        assert sqlstate(s, "SELECT * FROM manna_crypt.key_access") == "42501"


# ---- clusters of their own: restarts, crashes, capacity, the LOG mode ---------------


def hour_now():
    """PostgreSQL's hour bucket of now: hours since 2000-01-01 UTC."""
    return int((time.time() - 946684800) // 3600)


def decrypt_n(c, ct, n):
    c.execute("SELECT count(manna_crypt.decrypt_gcm(%s)) FROM generate_series(1, %s)", (ct, n))


def test_clean_restart_keeps_counts_and_a_crash_goes_back_to_it():
    with Cluster("kaccess_restart", root_key=new_root_key()) as cl:
        cl.create_db_with_extension("u")
        with cl.connect("u") as c:
            c.execute("SELECT manna_crypt.create_keyring('ring')")
            ct = c.execute("SELECT manna_crypt.encrypt_gcm('x', 'ring')::text").fetchone()[0]
            decrypt_n(c, ct, 40)
            me = c.execute("SELECT current_user").fetchone()[0]
        cl.restart()  # pg_ctl stop -m fast, start
        assert (cl.data / "manna_crypt" / "access_stats").exists()
        c = cl.connect("u")
        assert seen(c) == {(me, "ring", "encrypt"): 1, (me, "ring", "decrypt"): 40}
        decrypt_n(c, ct, 9)
        assert seen(c)[(me, "ring", "decrypt")] == 49
        # A backend crash resets shared memory: back to the last clean
        # shutdown (README says so). Killed while its session is open: a
        # closed session's backend may already be gone.
        crash(cl, c)
        c = cl.connect("u")
        assert seen(c) == {(me, "ring", "encrypt"): 1, (me, "ring", "decrypt"): 40}
        # A reset is written at once: a crash does not bring counts back.
        c.execute("SELECT manna_crypt.reset_key_access_stats()")
        crash(cl, c)
        with cl.connect("u") as c:
            assert seen(c) == {}


def crash(cluster, conn):
    """SIGKILLs the backend of an open session, then waits for the crash
    restart to finish."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    os.kill(pid, signal.SIGKILL)
    try:
        conn.close()
    except psycopg.Error:
        pass
    # Once the postmaster has reaped it, the crash restart has begun and
    # new connections wait for it to finish.
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    wait_until_up(cluster)


def wait_until_up(cluster, timeout=60):
    deadline = time.time() + timeout
    while True:
        try:
            with cluster.connect("postgres") as c:
                c.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            assert time.time() < deadline, "the server did not come back"
            time.sleep(0.2)


def test_capacity_drops_the_oldest_hour_and_counts_it():
    with Cluster("kaccess_cap", root_key=new_root_key(),
                 settings={"manna_crypt.key_access_max_entries": 100}) as cl:
        cl.create_db_with_extension("u")
        with cl.connect("u") as c:
            db = c.execute("SELECT oid FROM pg_database WHERE datname = 'u'").fetchone()[0]
            c.execute("SELECT manna_crypt.create_keyring('ring')")
            ct = c.execute("SELECT manna_crypt.encrypt_gcm('x', 'ring')::text").fetchone()[0]
        cl.stop()
        # A saved table of 100 entries: 98 of another database 5 hours ago
        # (3 calls each), one 2 hours ago in this database, one 40 days ago
        # (past the 35-day retention).
        now = hour_now()
        lines = [f"{db} 10 1 1 {now - 2} 11", f"{db} 10 1 1 {now - 24 * 40} 13"]
        lines += [f"1 {1000 + i} 1 0 {now - 5} 3" for i in range(98)]
        path = cl.data / "manna_crypt" / "access_stats"
        path.write_text("manna_crypt access statistics v1\ndropped 0\n" + "\n".join(lines) + "\n")
        cl.start()
        with cl.connect("u") as c:
            assert c.execute(
                "SELECT role_oid::int, calls, bucket_start = date_trunc('hour', now()) "
                "- interval '2 hours' FROM manna_crypt.key_access"
            ).fetchall() == [(10, 11, True)]
            assert c.execute("SELECT * FROM manna_crypt.key_access_stats_status()").fetchone() \
                == (100, 100, 0, 35)
            # The table is full: the new entry expires the 40-day-old one.
            c.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
            assert c.execute("SELECT * FROM manna_crypt.key_access_stats_status()").fetchone() \
                == (100, 100, 0, 35)
            # Full of kept entries: the oldest hour (5 hours ago) goes, counted.
            c.execute("SET ROLE manna_crypt_admin")
            c.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
            c.execute("RESET ROLE")
            assert c.execute("SELECT * FROM manna_crypt.key_access_stats_status()").fetchone() \
                == (100, 3, 98 * 3, 35)
            assert sum(n for n in seen(c).values()) == 11 + 2
        assert "98 entries of hour" in cl.log_text()
        # 97 more roles fill the table; the 98th drops the hour 2 hours ago
        # (11 calls); then every entry is of the current hour, and the 99th
        # role's call itself is dropped (and counted).
        with cl.connect("u") as c:
            open_keyrings(c)
            for i in range(99):
                r = f"cap_{i}"
                c.execute(f"CREATE ROLE {r}; GRANT manna_crypt_user TO {r}")
                c.execute(f"SET ROLE {r}")
                c.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
                c.execute("RESET ROLE")
            status = c.execute("SELECT * FROM manna_crypt.key_access_stats_status()").fetchone()
            assert status == (100, 100, 98 * 3 + 11 + 1, 35)
        # Without preloading there is no table: a clear 55000, not nothing.
        cl.configure(shared_preload_libraries="")
        cl.restart()
        with cl.connect("u") as c:
            for q in ("SELECT * FROM manna_crypt.key_access",
                      "SELECT manna_crypt.reset_key_access_stats()",
                      "SELECT * FROM manna_crypt.key_access_stats_status()"):
                assert sqlstate(c, q) == "55000", q


def test_the_log_mode_names_role_keyring_and_key_never_the_value():
    with Cluster("kaccess_log", root_key=new_root_key()) as cl:
        cl.create_db_with_extension("u")
        with cl.connect("u") as c:
            key = c.execute("SELECT manna_crypt.create_keyring('logged')").fetchone()[0]
            me = c.execute("SELECT current_user").fetchone()[0]
            c.execute("CREATE TABLE t (id int, v text)")
            c.execute("SELECT manna_crypt.protect_column('t', 'v', 'logged', 'id')")
            c.execute("SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm(%s, 'logged'))",
                      (SECRET + "-off",))
            c.execute("SET manna_crypt.key_access_log = on")
            c.execute("SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm(%s, 'logged'))",
                      (SECRET,))
            with c.cursor().copy("COPY t FROM STDIN") as cp:
                cp.write_row((1, SECRET + "-copy"))
        log = cl.log_text()
        line = f'manna_crypt key access: role "{me}" %s keyring "logged" key {key}'
        assert log.count(line % "encrypt") == 2 and log.count(line % "decrypt") == 1
        # Neither the statement nor COPY's context (the raw line) follows.
        assert SECRET not in log
