"""Usage counts and the nonce budget (docs/DESIGN.md section 7.2,
src/keys/counters.rs, src/keys/budget.rs).

Every encryption under a data key is counted per (database, key), reserved
ahead in blocks with a durable mark on disk, so that the count survives a
clean restart exactly and a crash (SIGKILL of the postmaster, a backend
crash) can only over-count. Past the warning fraction of the budget,
encrypting warns once per session and key, and rotate_due() rotates.
"""

import os
import signal
import time
from pathlib import Path

import psycopg
import pytest

from conftest import connect, create_database, new_role, sqlstate
from mc_cluster import Cluster, new_root_key

# Counting depends on PostgreSQL internals (shmem_exit at shutdown and at
# the reset after a crash, parallel workers): every tested version.
pytestmark = pytest.mark.all_versions

# The default budget's sizes (manna_crypt_core::budget): a session's block
# and the step of the durable mark, i.e. the most a crash over-counts.
BLOCK = 1024
CHUNK = 1 << 20


def count(conn, key_id):
    return conn.execute(
        "SELECT encryptions FROM manna_crypt.keys WHERE key_id = %s", (key_id,)
    ).fetchone()[0]


def encrypt_many(conn, ring, n, form="text"):
    plaintext = "'v' || g" if form == "text" else "convert_to('v' || g, 'UTF8')"
    conn.execute(
        f"SELECT count(manna_crypt.encrypt_gcm({plaintext}, %s)) FROM generate_series(1, %s) g",
        (ring, n),
    )


def wait_for_count(dbname, key_id, expected, connect_fn=connect, timeout=15):
    """The count once every other session has given back its unused block
    (sessions do so when their process exits, just after they close)."""
    deadline = time.time() + timeout
    while True:
        with connect_fn(dbname) as c:
            n = count(c, key_id)
        if n == expected or time.time() > deadline:
            return n
        time.sleep(0.1)


def test_keys_view_counts_keyring_encryptions_only(conn, fresh_db):
    a = conn.execute("SELECT manna_crypt.create_keyring('cnt_a')").fetchone()[0]
    assert count(conn, a) == 0
    assert conn.execute(
        "SELECT last_used FROM manna_crypt.keys WHERE key_id = %s", (a,)
    ).fetchone()[0] is None
    encrypt_many(conn, "cnt_a", 3000)
    encrypt_many(conn, "cnt_a", 500, form="bytea")
    # Raw keys, decryption and failed encryptions are not counted.
    ct = conn.execute(
        "SELECT manna_crypt.encrypt_gcm('x', 'cnt_a')::text, "
        "manna_crypt.encrypt_gcm('y', decode(repeat('00', 32), 'hex'))"
    ).fetchone()[0]
    conn.execute("SELECT manna_crypt.decrypt_gcm(%s)", (ct,))
    assert sqlstate(conn, "SELECT manna_crypt.encrypt_gcm('x', 'no_such_ring')") == "42704"
    # This session's own unused block is left out: the count is exact here.
    assert count(conn, a) == 3501
    row = conn.execute(
        "SELECT last_used >= created_at AND last_used <= now() "
        "FROM manna_crypt.keys WHERE key_id = %s",
        (a,),
    ).fetchone()
    assert row[0] is True
    # Other sessions see the block this one still holds until it exits.
    with connect(fresh_db) as other:
        seen = count(other, a)
    assert 3501 <= seen <= 3501 + BLOCK
    info = conn.execute("SELECT manna_crypt.info()->'nonce_budget'").fetchone()[0]
    assert info["settings"] == {"counting": True, "limit_log2": 32, "warn_fraction": 0.5}
    assert info["counted_keys"] == 1 and info["encryptions"] == 3501
    assert info["keyrings_past_warning"] == []
    assert 0 < info["highest_active_fraction"] < 1e-5


def test_reencryption_counts_its_encryptions(conn, fresh_db):
    key = conn.execute("SELECT manna_crypt.create_keyring('cnt_re')").fetchone()[0]
    conn.execute("CREATE TABLE t (id int, secret text)")
    conn.execute("INSERT INTO t SELECT g, 'plain ' || g FROM generate_series(1, 700) g")
    conn.execute("CALL manna_crypt.encrypt_column('t', 'secret', 'cnt_re')")
    assert count(conn, key) == 700


def test_counts_are_per_database_and_not_shared_with_a_clone(conn, fresh_db):
    key = conn.execute("SELECT manna_crypt.create_keyring('cnt_db')").fetchone()[0]
    encrypt_many(conn, "cnt_db", 100)
    other = create_database(fresh_db + "_o")
    clone = fresh_db + "_c"
    try:
        with connect(other) as o:
            assert o.execute("SELECT manna_crypt.create_keyring('cnt_db')").fetchone()[0] == key
            encrypt_many(o, "cnt_db", 7)
            assert count(o, key) == 7
        assert count(conn, key) == 100
        # A database cloned from a template has the same keys but starts
        # counting from zero (README: rotate the clone's keyrings).
        conn.close()
        assert wait_for_count(fresh_db, key, 100) == 100
        with connect("postgres") as p:
            p.execute(f'CREATE DATABASE "{clone}" TEMPLATE "{fresh_db}"')
        with connect(clone) as c:
            assert count(c, key) == 0
            assert c.execute(
                "SELECT count(*) FROM manna_crypt.keys WHERE key_id = %s", (key,)
            ).fetchone()[0] == 1
        with connect(fresh_db) as again:
            assert count(again, key) == 100
    finally:
        with connect("postgres") as p:
            for db in (other, clone):
                p.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


class Warning_:
    def __init__(self, d):
        # Read inside the handler: the diagnostic does not outlive it.
        self.message_primary = d.message_primary
        self.message_hint = d.message_hint
        self.sqlstate = d.sqlstate


def warnings_of(conn):
    seen = []
    conn.add_notice_handler(
        lambda d: seen.append(Warning_(d)) if d.severity_nonlocalized == "WARNING" else None
    )
    return seen


def test_warning_once_per_session_past_the_fraction(conn, fresh_db):
    key = conn.execute("SELECT manna_crypt.create_keyring('cnt_warn')").fetchone()[0]
    conn.execute("SET manna_crypt.nonce_budget_log2 = 10")  # 1024, blocks of 1
    seen = warnings_of(conn)
    encrypt_many(conn, "cnt_warn", 512)  # exactly the fraction: no warning yet
    assert seen == []
    encrypt_many(conn, "cnt_warn", 1)
    assert len(seen) == 1
    assert f"key {key} of keyring \"cnt_warn\"" in seen[0].message_primary
    assert "50.1% of its nonce budget (513 of 2^10" in seen[0].message_primary
    assert "rotate_keyring('cnt_warn')" in seen[0].message_hint
    assert seen[0].sqlstate == "01000"
    encrypt_many(conn, "cnt_warn", 600)  # past the budget itself: still once
    assert len(seen) == 1
    # Another session warns once for itself.
    with connect(fresh_db) as other:
        other.execute("SET manna_crypt.nonce_budget_log2 = 10")
        seen2 = warnings_of(other)
        encrypt_many(other, "cnt_warn", 3)
        assert len(seen2) == 1
    # The default budget: far from the fraction, no warning.
    with connect(fresh_db) as third:
        seen3 = warnings_of(third)
        encrypt_many(third, "cnt_warn", 3)
        assert seen3 == []


def test_rotate_due_rotates_on_the_budget(conn, fresh_db):
    old = conn.execute("SELECT manna_crypt.create_keyring('cnt_due')").fetchone()[0]
    calm = conn.execute("SELECT manna_crypt.create_keyring('cnt_calm')").fetchone()[0]
    conn.execute("SET manna_crypt.nonce_budget_log2 = 10")
    conn.execute("SET client_min_messages = error")
    encrypt_many(conn, "cnt_due", 512)
    encrypt_many(conn, "cnt_calm", 20)
    assert conn.execute("SELECT * FROM manna_crypt.rotate_due()").fetchall() == []
    encrypt_many(conn, "cnt_due", 1)
    info = conn.execute("SELECT manna_crypt.info()->'nonce_budget'").fetchone()[0]
    assert info["keyrings_past_warning"] == ["cnt_due"]
    assert abs(info["highest_active_fraction"] - 513 / 1024) < 1e-9
    rotated = conn.execute("SELECT * FROM manna_crypt.rotate_due()").fetchall()
    assert len(rotated) == 1 and rotated[0][0] == "cnt_due" and rotated[0][1] != old
    new = rotated[0][1]
    reason = conn.execute(
        "SELECT detail->>'reason' FROM manna_crypt.audit_log "
        "WHERE event = 'rotate_keyring' AND key_id = %s",
        (new,),
    ).fetchone()[0]
    assert reason == "nonce budget: 513 encryptions"
    assert conn.execute(
        "SELECT status FROM manna_crypt.keys WHERE key_id = %s", (old,)
    ).fetchone()[0] == "decrypt_only"
    # The new key starts at zero; the calm keyring was left alone.
    encrypt_many(conn, "cnt_due", 5)
    assert count(conn, new) == 5 and count(conn, old) == 513
    assert conn.execute("SELECT * FROM manna_crypt.rotate_due()").fetchall() == []
    assert conn.execute(
        "SELECT count(*) FROM manna_crypt.keys WHERE keyring = 'cnt_calm'"
    ).fetchone()[0] == 1
    assert count(conn, calm) == 20


def test_budget_settings_are_superuser_only(conn, fresh_db):
    role = new_role(conn)
    with connect(fresh_db, user=role) as c:
        for setting in ("manna_crypt.nonce_budget_log2 = 10",
                        "manna_crypt.nonce_budget_warn_fraction = 0.1"):
            assert sqlstate(c, f"SET {setting}") == "42501"
    assert sqlstate(conn, "SET manna_crypt.nonce_budget_log2 = 63") == "22023"
    assert sqlstate(conn, "SET manna_crypt.nonce_budget_warn_fraction = 1.5") == "22023"
    assert sqlstate(conn, "SET manna_crypt.max_counted_keys = 100") == "55P02"


def test_parallel_workers_are_counted(conn, fresh_db):
    key = conn.execute("SELECT manna_crypt.create_keyring('cnt_par')").fetchone()[0]
    conn.execute("CREATE TABLE p AS SELECT 'v' || g AS v FROM generate_series(1, 2000) g")
    conn.execute("ANALYZE p")
    major = conn.info.server_version // 10000
    setting = "force_parallel_mode" if major < 16 else "debug_parallel_query"
    for s in (f"{setting} = on", "parallel_setup_cost = 0", "parallel_tuple_cost = 0",
              "min_parallel_table_scan_size = 0", "max_parallel_workers_per_gather = 2"):
        conn.execute(f"SET {s}")
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) "
        "SELECT count(manna_crypt.encrypt_gcm(v, 'cnt_par')) FROM p"
    ).fetchall())
    assert "Workers Launched: 1" in plan or "Workers Launched: 2" in plan, plan
    conn.close()
    assert wait_for_count(fresh_db, key, 2000) == 2000


# ---- clusters of their own: restarts, crashes, limits ------------------------------


def kill_postmaster_and_children(cluster):
    """SIGKILL to the postmaster and every child of it, by pid: no process
    gets to run an exit callback."""
    pm = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pm:
                children.append(int(d.name))
    os.kill(pm, signal.SIGKILL)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while any(Path(f"/proc/{p}").exists() for p in [pm, *children]):
        assert time.time() < deadline, "killed processes did not go away"
        time.sleep(0.05)
    cluster._running = False


def wait_until_up(cluster, timeout=60):
    """Until the server accepts connections again after a crash restart."""
    deadline = time.time() + timeout
    while True:
        try:
            with cluster.connect("postgres") as c:
                c.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            assert time.time() < deadline, "the server did not come back"
            time.sleep(0.2)


def test_counts_survive_restarts_and_crashes():
    with Cluster("usage_crash", root_key=new_root_key()) as cl:
        cl.create_db_with_extension("u")
        with cl.connect("u") as c:
            key = c.execute("SELECT manna_crypt.create_keyring('ring')").fetchone()[0]
            encrypt_many(c, "ring", 5000)
        # Clean shutdown: every session gave its block back, the postmaster
        # wrote the exact count.
        cl.restart()
        with cl.connect("u") as c:
            assert count(c, key) == 5000
            encrypt_many(c, "ring", 3000)
        # SIGKILL of everything: the durable mark, never less than the truth.
        kill_postmaster_and_children(cl)
        cl.start()
        with cl.connect("u") as c:
            after_kill = count(c, key)
        assert 8000 <= after_kill <= 8000 + CHUNK + BLOCK
        assert after_kill > 8000, "a killed server cannot have given its blocks back"
        # A backend crash: the postmaster resets shared memory (writing the
        # counts first) and must register its exit flush again.
        with cl.connect("u") as c:
            encrypt_many(c, "ring", 10)  # holds a block, then dies
            pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            os.kill(pid, signal.SIGKILL)
        wait_until_up(cl)
        with cl.connect("u") as c:
            after_crash = count(c, key)
            assert after_crash >= after_kill + 10
            encrypt_many(c, "ring", 42)
        cl.restart()
        with cl.connect("u") as c:
            assert count(c, key) == after_crash + 42


def test_full_table_and_missing_preload():
    with Cluster("usage_limit", root_key=new_root_key(),
                 settings={"manna_crypt.max_counted_keys": 16}) as cl:
        cl.create_db_with_extension("u")
        with cl.connect("u") as c:
            for i in range(16):
                c.execute(f"SELECT manna_crypt.create_keyring('r{i}')")
                encrypt_many(c, f"r{i}", 1)
            c.execute("SELECT manna_crypt.create_keyring('one_too_many')")
            with pytest.raises(psycopg.Error) as e:
                encrypt_many(c, "one_too_many", 1)
            assert e.value.sqlstate == "53400"
            assert "max_counted_keys" in e.value.diag.message_hint
            encrypt_many(c, "r3", 5)  # counted keys keep working
        cl.configure(shared_preload_libraries="")
        cl.restart()
        with cl.connect("u") as c:
            # No shared memory: encrypting under a key is refused (it could
            # not be counted); the view still shows the stored counts.
            assert sqlstate(c, "SELECT manna_crypt.encrypt_gcm('x', 'r3')") == "55000"
            assert count(c, 1) == 1 and count(c, 4) == 6
            info = c.execute("SELECT manna_crypt.info()->'nonce_budget'").fetchone()[0]
            assert info["settings"]["counting"] is False


def test_standby_counts_its_own_encryptions():
    with Cluster("usage_primary", root_key=new_root_key()) as primary:
        primary.create_db_with_extension("u")
        with primary.connect("u") as c:
            key = c.execute("SELECT manna_crypt.create_keyring('ring')").fetchone()[0]
            encrypt_many(c, "ring", 100)
        primary.restart()  # the exact count on disk before the base backup
        sb = primary.make_standby()
        try:
            with sb.connect("u") as s:
                assert count(s, key) == 100  # carried by the base backup
                s.execute("SET default_transaction_read_only = on")
                encrypt_many(s, "ring", 50)
                assert count(s, key) == 150
            with primary.connect("u") as c:
                assert count(c, key) == 100
        finally:
            sb.cleanup()
