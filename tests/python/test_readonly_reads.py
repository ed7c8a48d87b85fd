"""Reads through the extension's SPI helper are read-only: they assign no
transaction id and increment no command counter. Before the helper, pgrx's
`Spi::get_one`/`select` ran read-write once a transaction had an xid (and
`get_one` assigned one itself), which made a plain read take an xid and made
key loads in parallel workers fail with XX000 "cannot start commands during
a parallel operation" whenever the leader's statement wrote."""

import pytest

from conftest import connect

# Read-only reads depend on PostgreSQL internals (parallel mode, command
# counter, transaction ids) that change between major versions.
pytestmark = pytest.mark.all_versions


def xid(conn):
    return conn.execute("SELECT txid_current_if_assigned()").fetchone()[0]


def test_lock_holder_takes_no_transaction_id(conn):
    conn.autocommit = False
    conn.execute("SELECT manna_crypt.lock_holder('x')")
    conn.execute("SELECT manna_crypt.try_lock_xact('ro-probe')")
    assert xid(conn) is None
    conn.rollback()


def test_cold_key_load_takes_no_transaction_id(conn, fresh_db):
    conn.execute("SELECT manna_crypt.create_keyring('ro_ring')")
    c = conn.execute("SELECT manna_crypt.encrypt_gcm('v', 'ro_ring')::text").fetchone()[0]
    # A new session: its key cache is cold, so the decrypt reads the key tables.
    with connect(fresh_db, autocommit=False) as s:
        assert s.execute("SELECT manna_crypt.decrypt_gcm(%s)", (c,)).fetchone()[0] == "v"
        assert s.execute("SELECT (manna_crypt.info()->>'version') IS NOT NULL").fetchone()[0]
        assert xid(s) is None


def _parallel(conn):
    major = conn.info.server_version // 10000
    setting = "force_parallel_mode" if major < 16 else "debug_parallel_query"
    conn.execute(f"SET {setting} = on")
    conn.execute("SET parallel_setup_cost = 0")
    conn.execute("SET parallel_tuple_cost = 0")
    conn.execute("SET min_parallel_table_scan_size = 0")


def test_parallel_key_load_while_the_leader_writes(conn, fresh_db):
    conn.execute("SELECT manna_crypt.create_keyring('par_ring')")
    conn.execute(
        "CREATE TABLE src AS SELECT g AS id, manna_crypt.encrypt_gcm('v' || g, 'par_ring')::text AS c"
        " FROM generate_series(1, 2000) g"
    )
    conn.execute("ANALYZE src")
    for statement in (
        "CREATE TABLE out1 AS SELECT id, manna_crypt.decrypt_gcm(c) AS p FROM src",
        "SELECT id, manna_crypt.decrypt_gcm(c) AS p INTO out2 FROM src",
        "CREATE MATERIALIZED VIEW out3 AS SELECT id, manna_crypt.decrypt_gcm(c) AS p FROM src",
    ):
        # A new session each time: cold key caches in the leader and workers.
        with connect(fresh_db) as s:
            _parallel(s)
            s.execute(statement)
    for t in ("out1", "out2", "out3"):
        n, ok = conn.execute(f"SELECT count(*), bool_and(p = 'v' || id) FROM {t}").fetchone()
        assert (n, ok) == (2000, True)
    with connect(fresh_db) as s:
        _parallel(s)
        s.execute("REFRESH MATERIALIZED VIEW out3")
