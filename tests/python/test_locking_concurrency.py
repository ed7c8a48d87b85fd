"""Optimistic locking and named locks under real concurrency, from psycopg.

(a) compare-and-set from plain SQL: `UPDATE t SET x = ..., version = <read>`;
    a stale writer gets SQLSTATE 40001 as psycopg's SerializationFailure;
(b) many clients incrementing a few shared counters with read-modify-write +
    retry on 40001 lose no increment;
(c) the motivating case: Plaid sync workers advancing a per-item cursor under
    manna_crypt.lock_xact('plaid_item:' || id) never move a cursor backwards;
(d) named locks across sessions: holders, timeouts (55P03), release at unlock,
    commit and disconnect, cancel, and the documented key rule;
(e) misuse from a client gets the right SQLSTATE and never costs the backend.

Every thread opens and closes its own connection; threads are joined with a
time limit and their exceptions are re-raised in the test.
"""

import hashlib
import random
import threading
import time

import psycopg
import psycopg.errors
import pytest

from conftest import connect


def py_lock_key(name: str) -> int:
    """The documented rule, independently of the extension."""
    digest = hashlib.sha256(b"manna_crypt:" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def run_threads(targets, timeout=60):
    """Runs callables in threads; re-raises the first exception; returns results."""
    results = [None] * len(targets)
    errors = []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "worker threads did not finish in time"
    if errors:
        raise errors[0]
    return results


def backend_alive(c, pid):
    assert c.execute("SELECT 1").fetchone() == (1,)
    assert c.execute("SELECT pg_backend_pid()").fetchone()[0] == pid


# ---------------------------------------------------------------------------
# (a) compare-and-set from plain SQL
# ---------------------------------------------------------------------------


def test_compare_and_set_stale_writer_gets_40001(conn, fresh_db):
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('accounts')")
    conn.execute("INSERT INTO accounts (id, balance) VALUES (1, 100)")

    with connect(fresh_db) as a, connect(fresh_db) as b:
        bal_a, ver_a = a.execute("SELECT balance, version FROM accounts WHERE id = 1").fetchone()
        bal_b, ver_b = b.execute("SELECT balance, version FROM accounts WHERE id = 1").fetchone()
        assert ver_a == ver_b == 1

        cur = a.execute(
            "UPDATE accounts SET balance = %s, version = %s WHERE id = 1 RETURNING version",
            (bal_a - 30, ver_a),
        )
        assert cur.fetchone() == (2,)

        with pytest.raises(psycopg.errors.SerializationFailure) as info:
            b.execute("UPDATE accounts SET balance = %s, version = %s WHERE id = 1", (bal_b - 50, ver_b))
        e = info.value
        assert e.sqlstate == "40001"
        # what generic retry loops catch: psycopg maps 40001 to this class,
        # an OperationalError (SQLAlchemy wraps it as sqlalchemy.exc.OperationalError)
        assert psycopg.errors.lookup("40001") is psycopg.errors.SerializationFailure
        assert isinstance(e, psycopg.OperationalError)
        assert '"accounts"' in e.diag.message_primary
        assert e.diag.message_detail == "the update expected version 1, but the current version is 2"
        assert e.diag.message_hint

        # the loser re-reads and retries successfully
        bal_b, ver_b = b.execute("SELECT balance, version FROM accounts WHERE id = 1").fetchone()
        assert (bal_b, ver_b) == (70, 2)
        b.execute("UPDATE accounts SET balance = %s, version = %s WHERE id = 1", (bal_b - 50, ver_b))

    assert conn.execute("SELECT balance, version FROM accounts WHERE id = 1").fetchone() == (20, 3)


def test_compare_and_set_waiting_writer_gets_40001(conn, fresh_db):
    """B's UPDATE blocks on A's uncommitted row; when A commits, PostgreSQL
    re-checks B against A's row and the trigger refuses B's stale version."""
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('accounts')")
    conn.execute("INSERT INTO accounts (id, balance) VALUES (1, 100)")

    with connect(fresh_db, autocommit=False) as a:
        a.execute("UPDATE accounts SET balance = 1, version = 1 WHERE id = 1")

        def writer_b():
            with connect(fresh_db) as b:
                try:
                    b.execute("UPDATE accounts SET balance = 2, version = 1 WHERE id = 1")
                    return "updated"
                except psycopg.errors.SerializationFailure as e:
                    return e.sqlstate

        def commit_a_later():
            time.sleep(0.4)
            a.commit()

        got = run_threads([writer_b, commit_a_later], timeout=20)
    assert got[0] == "40001"
    assert conn.execute("SELECT balance, version FROM accounts").fetchone() == (1, 2)


# ---------------------------------------------------------------------------
# (b) contended counters: read-modify-write with retry on 40001
# ---------------------------------------------------------------------------

CLIENTS = 8
INCREMENTS = 1000
ROWS = 4


def test_concurrent_counters_lose_no_increment(conn, fresh_db):
    conn.execute("CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL)")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('counters')")
    conn.execute("INSERT INTO counters (id, n) SELECT g, 0 FROM generate_series(1, %s) g", (ROWS,))

    start = threading.Barrier(CLIENTS)

    def client(seed):
        rnd = random.Random(seed)
        per_row = [0] * ROWS
        conflicts = retried = 0
        with connect(fresh_db) as c:
            c.execute("SET statement_timeout = '30s'")
            start.wait(10)
            for _ in range(INCREMENTS):
                rid = rnd.randrange(ROWS) + 1
                attempts = 0
                while True:
                    attempts += 1
                    assert attempts < 1000, "no progress"
                    n, version = c.execute("SELECT n, version FROM counters WHERE id = %s", (rid,)).fetchone()
                    try:
                        cur = c.execute(
                            "UPDATE counters SET n = %s, version = %s WHERE id = %s",
                            (n + 1, version, rid),
                        )
                    except psycopg.errors.SerializationFailure:
                        conflicts += 1
                        continue
                    assert cur.rowcount == 1
                    break
                retried += attempts > 1
                per_row[rid - 1] += 1
        return per_row, conflicts, retried

    t0 = time.monotonic()
    results = run_threads([lambda s=s: client(s) for s in range(CLIENTS)], timeout=90)
    elapsed = time.monotonic() - t0

    committed = [sum(r[0][i] for r in results) for i in range(ROWS)]
    conflicts = sum(r[1] for r in results)
    retried = sum(r[2] for r in results)
    print(
        f"\n{CLIENTS} clients x {INCREMENTS} increments on {ROWS} rows in {elapsed:.1f}s: "
        f"{conflicts} conflicts (40001), {retried} increments needed a retry"
    )

    rows = conn.execute("SELECT id, n, version FROM counters ORDER BY id").fetchall()
    assert sum(committed) == CLIENTS * INCREMENTS
    assert [r[1] for r in rows] == committed
    assert sum(r[1] for r in rows) == CLIENTS * INCREMENTS
    # each committed increment bumped the version exactly once
    assert [r[2] for r in rows] == [1 + n for n in committed]
    # the test proves something only if clients really collided
    assert conflicts > 0
    assert retried > 0


# ---------------------------------------------------------------------------
# (c) Plaid sync workers advancing cursors
# ---------------------------------------------------------------------------

ITEMS = 3


def setup_plaid(c):
    c.execute("CREATE TABLE plaid_items (id int PRIMARY KEY, cursor bigint NOT NULL)")
    c.execute("SELECT manna_crypt.enable_optimistic_locking('plaid_items')")
    c.execute("INSERT INTO plaid_items (id, cursor) SELECT g, 1000 * g FROM generate_series(1, %s) g", (ITEMS,))
    # written in the same transaction as the cursor: one row per committed sync
    c.execute(
        """CREATE TABLE plaid_cursor_history (
               seq bigserial PRIMARY KEY, item_id int NOT NULL,
               prev_cursor bigint NOT NULL, new_cursor bigint NOT NULL, worker int NOT NULL)"""
    )


def sync_once(c, item, worker, rnd, mode):
    """One sync of one item in one transaction. Returns 'synced', 'busy'
    (try-lock refused) or 'stale' (40001)."""
    try:
        with c.transaction():
            if mode == "wait":
                c.execute("SELECT manna_crypt.lock_xact('plaid_item:' || %s, '5 seconds')", (item,))
            elif mode == "try":
                got = c.execute("SELECT manna_crypt.try_lock_xact('plaid_item:' || %s)", (item,)).fetchone()[0]
                if not got:
                    return "busy"
            cursor, version = c.execute(
                "SELECT cursor, version FROM plaid_items WHERE id = %s", (item,)
            ).fetchone()
            time.sleep(0.001)  # the call to Plaid's /transactions/sync
            new = cursor + rnd.randint(1, 5)
            c.execute(
                "UPDATE plaid_items SET cursor = %s, version = %s WHERE id = %s",
                (new, version, item),
            )
            c.execute(
                "INSERT INTO plaid_cursor_history (item_id, prev_cursor, new_cursor, worker) VALUES (%s, %s, %s, %s)",
                (item, cursor, new, worker),
            )
        return "synced"
    except psycopg.errors.SerializationFailure:
        return "stale"


def check_cursor_history(c):
    """Per item, in commit order: strictly increasing, each sync started from
    the previous committed cursor (no lost sync), final cursor = the max."""
    synced = 0
    for item in range(1, ITEMS + 1):
        hist = c.execute(
            "SELECT prev_cursor, new_cursor FROM plaid_cursor_history WHERE item_id = %s ORDER BY seq", (item,)
        ).fetchall()
        final, version = c.execute("SELECT cursor, version FROM plaid_items WHERE id = %s", (item,)).fetchone()
        expected_prev = 1000 * item
        for prev, new in hist:
            assert new > prev, f"item {item}: cursor went backwards ({prev} -> {new})"
            assert prev == expected_prev, f"item {item}: a sync started from {prev}, last committed was {expected_prev}"
            expected_prev = new
        assert final == expected_prev
        assert final == max([1000 * item] + [n for _, n in hist])
        assert version == 1 + len(hist)
        synced += len(hist)
    return synced


@pytest.mark.parametrize("workers_modes", [("wait",) * 4, ("wait", "wait", "try", "try")])
def test_plaid_sync_workers_with_named_lock(conn, fresh_db, workers_modes):
    setup_plaid(conn)
    rounds = 60
    start = threading.Barrier(len(workers_modes))

    def worker(w, mode):
        rnd = random.Random(w)
        counts = {"synced": 0, "busy": 0, "stale": 0}
        with connect(fresh_db) as c:
            start.wait(10)
            for _ in range(rounds):
                counts[sync_once(c, rnd.randrange(ITEMS) + 1, w, rnd, mode)] += 1
        return counts

    results = run_threads([lambda w=w, m=m: worker(w, m) for w, m in enumerate(workers_modes)], timeout=60)
    total = {k: sum(r[k] for r in results) for k in ("synced", "busy", "stale")}
    print(f"\nplaid sync with named lock {workers_modes}: {total}")

    # the lock serializes each item's read-modify-write: the version check
    # never has to refuse anything
    assert total["stale"] == 0
    assert check_cursor_history(conn) == total["synced"]
    if "try" in workers_modes:
        assert total["busy"] > 0, "try_lock_xact never found a lock taken: no contention"
        assert total["synced"] + total["busy"] == rounds * len(workers_modes)
    else:
        assert total["synced"] == rounds * len(workers_modes)
    # nothing left locked
    assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)


def test_plaid_sync_workers_without_lock_rely_on_version_check(conn, fresh_db):
    """Without the lock, workers do collide; the trigger refuses every stale
    write (40001), the worker retries, and still no cursor goes backwards."""
    setup_plaid(conn)
    rounds = 60
    start = threading.Barrier(4)

    def worker(w):
        rnd = random.Random(100 + w)
        stale = synced = 0
        with connect(fresh_db) as c:
            start.wait(10)
            for _ in range(rounds):
                item = rnd.randrange(ITEMS) + 1
                for _attempt in range(200):
                    outcome = sync_once(c, item, w, rnd, "none")
                    if outcome == "synced":
                        synced += 1
                        break
                    stale += 1
                else:
                    raise AssertionError("no progress")
        return synced, stale

    results = run_threads([lambda w=w: worker(w) for w in range(4)], timeout=60)
    synced = sum(r[0] for r in results)
    stale = sum(r[1] for r in results)
    print(f"\nplaid sync without lock: {synced} synced, {stale} stale writes refused and retried")
    assert synced == 4 * rounds
    assert stale > 0
    assert check_cursor_history(conn) == synced


# ---------------------------------------------------------------------------
# (d) named locks across sessions
# ---------------------------------------------------------------------------


def test_session_lock_across_sessions(fresh_db):
    with connect(fresh_db) as a, connect(fresh_db) as b:
        pid_a = a.info.backend_pid
        a.execute("SELECT manna_crypt.lock_session('job')")
        assert b.execute("SELECT manna_crypt.try_lock_session('job')").fetchone() == (False,)
        assert b.execute("SELECT manna_crypt.try_lock_xact('job')").fetchone() == (False,)
        assert b.execute("SELECT manna_crypt.lock_holder('job')").fetchone() == (pid_a,)

        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable) as info:
            b.execute("SELECT manna_crypt.lock_xact('job', '200 milliseconds')")
        waited = time.monotonic() - t0
        assert info.value.sqlstate == "55P03"
        assert "job" in info.value.diag.message_primary
        assert 0.15 <= waited < 2.0, waited
        # the timeout was for that call only
        assert b.execute("SHOW lock_timeout").fetchone() == ("0",)

        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            b.execute("SELECT manna_crypt.lock_session('job', '300 milliseconds')")
        assert 0.25 <= time.monotonic() - t0 < 2.0

        # inside a transaction, behind a savepoint, the caller can carry on
        with b.transaction():
            with pytest.raises(psycopg.errors.LockNotAvailable):
                with b.transaction():
                    b.execute("SELECT manna_crypt.lock_xact('job', '50 milliseconds')")
            assert b.execute("SHOW lock_timeout").fetchone() == ("0",)
            assert b.execute("SELECT 1").fetchone() == (1,)

        assert a.execute("SELECT manna_crypt.unlock('job')").fetchone() == (True,)
        assert b.execute("SELECT manna_crypt.try_lock_session('job')").fetchone() == (True,)
        assert a.execute("SELECT manna_crypt.lock_holder('job')").fetchone() == (b.info.backend_pid,)
        assert a.execute("SELECT manna_crypt.try_lock_session('job')").fetchone() == (False,)
        assert b.execute("SELECT manna_crypt.unlock('job')").fetchone() == (True,)
        assert a.execute("SELECT manna_crypt.lock_holder('job')").fetchone() == (None,)


def test_waiter_gets_lock_when_holder_releases(fresh_db):
    with connect(fresh_db) as a:
        a.execute("SELECT manna_crypt.lock_session('job')")

        def waiter():
            with connect(fresh_db) as b:
                t0 = time.monotonic()
                b.execute("SELECT manna_crypt.lock_session('job', '10 seconds')")
                waited = time.monotonic() - t0
                holder = b.execute("SELECT manna_crypt.lock_holder('job')").fetchone()[0]
                return waited, holder == b.info.backend_pid

        def release_later():
            time.sleep(0.5)
            a.execute("SELECT manna_crypt.unlock('job')")

        (waited, held), _ = run_threads([waiter, release_later], timeout=20)
    assert held
    assert 0.4 <= waited < 5.0, waited


def test_transaction_lock_released_at_commit_and_rollback(fresh_db):
    with connect(fresh_db, autocommit=False) as a, connect(fresh_db) as b:
        a.execute("SELECT manna_crypt.lock_xact('tx', '1 second')")
        assert b.execute("SELECT manna_crypt.try_lock_xact('tx')").fetchone() == (False,)
        assert b.execute("SELECT manna_crypt.lock_holder('tx')").fetchone() == (a.info.backend_pid,)
        a.commit()
        assert b.execute("SELECT manna_crypt.lock_holder('tx')").fetchone() == (None,)
        # autocommit: b's transaction lock is released when its statement ends
        assert b.execute("SELECT manna_crypt.try_lock_xact('tx')").fetchone() == (True,)
        assert b.execute("SELECT manna_crypt.lock_holder('tx')").fetchone() == (None,)

        assert a.execute("SELECT manna_crypt.try_lock_xact('tx')").fetchone() == (True,)
        assert b.execute("SELECT manna_crypt.try_lock_session('tx')").fetchone() == (False,)
        a.rollback()
        assert b.execute("SELECT manna_crypt.try_lock_session('tx')").fetchone() == (True,)
        b.execute("SELECT manna_crypt.unlock('tx')")


def test_waiting_transaction_lock_acquired_after_commit(fresh_db):
    with connect(fresh_db, autocommit=False) as a:
        a.execute("SELECT manna_crypt.lock_xact('tx')")

        def waiter():
            with connect(fresh_db, autocommit=False) as b:
                t0 = time.monotonic()
                b.execute("SELECT manna_crypt.lock_xact('tx', '10 seconds')")
                waited = time.monotonic() - t0
                b.commit()
                return waited

        def commit_later():
            time.sleep(0.4)
            a.commit()

        waited, _ = run_threads([waiter, commit_later], timeout=20)
    assert 0.3 <= waited < 5.0, waited


def test_session_lock_released_when_holder_disconnects(fresh_db):
    with connect(fresh_db) as b:
        a = connect(fresh_db)
        try:
            a.execute("SELECT manna_crypt.lock_session('job')")
            assert b.execute("SELECT manna_crypt.try_lock_session('job')").fetchone() == (False,)
        finally:
            a.close()
        # the backend exits asynchronously; wait for it briefly
        b.execute("SELECT manna_crypt.lock_session('job', '5 seconds')")
        assert b.execute("SELECT manna_crypt.lock_holder('job')").fetchone() == (b.info.backend_pid,)


def test_cancel_interrupts_wait(fresh_db):
    with connect(fresh_db) as a, connect(fresh_db) as b:
        a.execute("SELECT manna_crypt.lock_session('job')")
        pid_b = b.info.backend_pid

        def wait_forever():
            try:
                b.execute("SELECT manna_crypt.lock_session('job')")
                return "acquired"
            except psycopg.errors.QueryCanceled as e:
                return e.sqlstate

        def cancel_later():
            time.sleep(0.3)
            with connect(fresh_db) as c:
                for _ in range(50):
                    waiting = c.execute(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid_b,)
                    ).fetchone()
                    if waiting and waiting[0]:
                        break
                    time.sleep(0.05)
                assert c.execute("SELECT pg_cancel_backend(%s)", (pid_b,)).fetchone() == (True,)

        got, _ = run_threads([wait_forever, cancel_later], timeout=20)
        assert got == "57014"
        backend_alive(b, pid_b)
        assert b.execute("SELECT manna_crypt.lock_holder('job')").fetchone() == (a.info.backend_pid,)


NAMES = ["plaid_item:42", "job", "a", "A", "é", "plaid_item:ümlaut", "日本語のロック", "🔒", "x" * 200, " spaced name "]


def test_lock_key_is_the_documented_sha256_rule(conn):
    for name in NAMES:
        assert conn.execute("SELECT manna_crypt.lock_key(%s)", (name,)).fetchone()[0] == py_lock_key(name), name
    # the number pinned in tests/pg_regress/expected/locking.out
    assert py_lock_key("plaid_item:42") == 6446956087239071342
    assert py_lock_key("job") == 2700339170260278380
    assert py_lock_key("é") == -3811882770467638839


def test_named_lock_interoperates_with_raw_advisory_locks(fresh_db):
    """A program without the extension's functions can take the same lock
    with pg_advisory_lock(key) using the key computed in its own language."""
    with connect(fresh_db) as a, connect(fresh_db) as b:
        for name in ["plaid_item:7", "日本語のロック", "🔒"]:
            key = py_lock_key(name)
            assert a.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
            assert b.execute("SELECT manna_crypt.try_lock_session(%s)", (name,)).fetchone() == (False,)
            assert b.execute("SELECT manna_crypt.lock_holder(%s)", (name,)).fetchone() == (a.info.backend_pid,)
            assert a.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone() == (True,)
            assert b.execute("SELECT manna_crypt.try_lock_session(%s)", (name,)).fetchone() == (True,)
            assert a.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (False,)
            assert b.execute("SELECT manna_crypt.unlock(%s)", (name,)).fetchone() == (True,)


# ---------------------------------------------------------------------------
# (e) misuse from a client: right SQLSTATE, the backend survives
# ---------------------------------------------------------------------------

MISUSE = [
    # (setup statements, failing statement, SQLSTATE)
    (
        ["CREATE TABLE m (id int PRIMARY KEY, version bigint NOT NULL DEFAULT 1, label text)",
         "SELECT manna_crypt.enable_optimistic_locking('m')", "INSERT INTO m VALUES (1, 1, 'x')",
         "UPDATE m SET label = 'y'"],
        "UPDATE m SET label = 'z', version = 1",
        "40001",
    ),
    (
        ["CREATE TABLE m (id int PRIMARY KEY, version bigint, label text)", "INSERT INTO m VALUES (1, 1, 'x')",
         "CREATE TRIGGER t AFTER UPDATE ON m FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump()"],
        "UPDATE m SET label = 'y'",
        "39P01",
    ),
    (
        ["CREATE TABLE m (id int PRIMARY KEY, version bigint, label text)", "INSERT INTO m VALUES (1, 1, 'x')",
         "CREATE TRIGGER t BEFORE UPDATE ON m FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt.version_bump()"],
        "UPDATE m SET label = 'y'",
        "39P01",
    ),
    (
        ["CREATE TABLE m (id int PRIMARY KEY, version bigint, label text)", "INSERT INTO m VALUES (1, 1, 'x')",
         "CREATE TRIGGER t BEFORE DELETE ON m FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump()"],
        "DELETE FROM m",
        "39P01",
    ),
    (
        ["CREATE TABLE m (id int PRIMARY KEY, version bigint, label text)",
         "CREATE TRIGGER t BEFORE INSERT ON m FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump('version', 'label')"],
        "INSERT INTO m VALUES (1, 1, 'x')",
        "39P01",
    ),
    (
        ["CREATE TABLE m (id int PRIMARY KEY, label text)",
         "CREATE TRIGGER t BEFORE INSERT ON m FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump()"],
        "INSERT INTO m VALUES (1, 'x')",
        "42703",
    ),
    (
        ["CREATE TABLE m (id int PRIMARY KEY, version text)",
         "CREATE TRIGGER t BEFORE INSERT ON m FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump()"],
        "INSERT INTO m VALUES (1, 'x')",
        "42804",
    ),
    (["CREATE TABLE m (id int PRIMARY KEY, version text)"], "SELECT manna_crypt.enable_optimistic_locking('m')", "42804"),
    ([], "SELECT manna_crypt.lock_key('')", "22023"),
    ([], "SELECT manna_crypt.lock_session(repeat('x', 201))", "22023"),
    ([], "SELECT manna_crypt.try_lock_xact('')", "22023"),
    ([], "SELECT manna_crypt.lock_xact('job', '-5 seconds')", "22023"),
]


@pytest.mark.parametrize("setup,statement,sqlstate", MISUSE, ids=[f"{m[2]}-{i}" for i, m in enumerate(MISUSE)])
def test_misuse_gets_sqlstate_and_backend_survives(fresh_db, setup, statement, sqlstate):
    with connect(fresh_db) as c:
        started = c.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        pid = c.info.backend_pid
        for s in setup:
            c.execute(s)
        for _ in range(3):  # repeatedly, in autocommit and in a transaction
            with pytest.raises(psycopg.Error) as info:
                c.execute(statement)
            assert info.value.sqlstate == sqlstate, info.value.diag.message_primary
            assert "panicked" not in str(info.value)
            backend_alive(c, pid)
        with pytest.raises(psycopg.Error) as info:
            with c.transaction():
                c.execute(statement)
        assert info.value.sqlstate == sqlstate
        backend_alive(c, pid)
        assert c.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT manna_crypt.lock_xact(NULL)",
        "SELECT manna_crypt.lock_session(NULL, '1 second')",
    ],
)
def test_null_lock_name_is_a_user_error(fresh_db, statement):
    """A NULL lock name is bad user input: 22004 or 22023 with a short message,
    not XX000 with a Rust backtrace (docs/DESIGN.md section 6)."""
    with connect(fresh_db) as c:
        pid = c.info.backend_pid
        with pytest.raises(psycopg.Error) as info:
            c.execute(statement)
        assert info.value.sqlstate in ("22004", "22023"), (
            info.value.sqlstate,
            info.value.diag.message_primary,
        )
        assert "rust" not in (info.value.diag.message_detail or "").lower()
        backend_alive(c, pid)
