"""The upgrade from release 0.1.0 to this version, the way a user does it.

scripts/prepare_upgrade.sh builds 0.1.0 from its commit and installs it into
a private copy of the PostgreSQL under test (MC_UPGRADE_PG_CONFIG). The test
upgrades a copy of that copy of its own, so it touches neither the
installation the other tests use nor the prepared one, and runs again as
often as you like. It:

1. starts a cluster on its copy with 0.1.0 preloaded and creates
   real state: keyrings rotated, a revoked and a destroyed key, a Fernet
   keyring with imported keys, registered columns, finished and failed
   re-encryption runs, audit rows, the version trigger, and user objects
   that depend on extension functions (a CHECK, a view, an index
   expression, the trigger) -- an upgrade script that drops and recreates a
   function fails on these;
2. installs the new release's files over the old ones (the library, the
   control file, the install and upgrade scripts, from MC_PG_CONFIG's
   installation, where scripts/test.sh installed the build under test) and
   restarts: in the window before ALTER EXTENSION ... UPDATE, the new
   library serves the old catalog;
3. runs ALTER EXTENSION manna_crypt UPDATE and checks every value and
   feature, and that the catalog equals a fresh CREATE EXTENSION's.

Assertion messages name row ids and key ids, never plaintexts or keys.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from catalog_snapshot import diff, snapshot
from mc_cluster import CLUSTERS, MC_ROOT, Cluster, _remove_later, expect_error, new_root_key

OLD = "0.1.0"
NEW = tomllib.loads((MC_ROOT / "Cargo.toml").read_text())["package"]["version"]
RAW_KEY = bytes(range(32))


DIRS = ("bindir", "pkglibdir", "sharedir", "includedir-server")


def pg_dirs(var_or_path: str) -> dict:
    """bindir, pkglibdir, sharedir, includedir-server of a pg_config named by
    an environment variable (or given as a path)."""
    path = os.environ.get(var_or_path, var_or_path if "/" in var_or_path else "")
    if not path:
        pytest.fail(
            f"{var_or_path} is not set: run the suite with scripts/test.sh, which builds "
            f"{OLD} for this test (scripts/prepare_upgrade.sh)",
            pytrace=False,
        )
    out = subprocess.run([path, *(f"--{d}" for d in DIRS)], check=True, capture_output=True, text=True)
    return {**dict(zip(DIRS, out.stdout.splitlines())), "pg_config": path}


@pytest.fixture
def old_pg():
    """A scratch copy of the prepared 0.1.0 installation (same layout under a
    new root, so it is relocated as the prepared one is)."""
    prepared = pg_dirs("MC_UPGRADE_PG_CONFIG")
    root = Path(os.path.commonpath([prepared[d] for d in DIRS]))
    CLUSTERS.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="upgrade_pg_", dir=CLUSTERS))
    os.chmod(scratch, 0o755)
    try:
        shutil.copytree(root, scratch / "pg", symlinks=True)
        copy = pg_dirs(str(scratch / "pg" / Path(prepared["pg_config"]).relative_to(root)))
        assert copy["sharedir"].startswith(str(scratch)), "the copied installation is not relocated"
        yield copy
    finally:
        _remove_later(scratch)


def install_new_release(old_pg: dict, new_pg: dict):
    """Copies the new release's files into the old installation, as a package
    manager does: each file is written beside its destination and renamed over
    it, so a running server never sees a half-written library."""
    files = [
        (Path(new_pg["pkglibdir"]), Path(old_pg["pkglibdir"]), "manna_crypt.so"),
        *[
            (Path(new_pg["sharedir"]) / "extension", Path(old_pg["sharedir"]) / "extension", f)
            for f in ("manna_crypt.control", f"manna_crypt--{NEW}.sql",
                      f"manna_crypt--{OLD}--{NEW}.sql")
        ],
    ]
    for src_dir, dst_dir, name in files:
        src, dst = src_dir / name, dst_dir / name
        assert src.is_file(), f"the build under test installed no {src}"
        tmp = dst.with_name(f".{name}.new")
        shutil.copy2(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)


# ---- the state 0.1.0 leaves behind ---------------------------------------------


class State:
    """What the old version created, and what every check expects of it."""

    def __init__(self):
        self.fernet_keys = [Fernet.generate_key(), Fernet.generate_key()]
        self.plain: dict[tuple[str, int], str] = {}  # (table, id) -> plaintext
        self.refused: set[tuple[str, int]] = set()  # rows under revoked/destroyed keys
        self.key_ids: dict[str, int] = {}


def secret(table: str, i: int) -> str:
    return f"{table}-secret-{i}-é🔐"


def fill(conn, st: State, table: str, ids, keyring: str, refused=False):
    for i in ids:
        conn.execute(
            f"INSERT INTO {table} (id, tok) VALUES (%s, manna_crypt.encrypt_gcm(%s, %s, %s))",
            (i, secret(table, i), keyring, str(i)),
        )
        st.plain[(table, i)] = secret(table, i)
        if refused:
            st.refused.add((table, i))


def make_old_state(conn, st: State):
    conn.execute("SET client_min_messages = warning")
    # accounts: two key versions, registered, the version trigger, and user
    # objects that depend on extension functions.
    st.key_ids["main_v1"] = conn.execute(
        "SELECT manna_crypt.create_keyring('ring_main', rotation_period => '30 days')"
    ).fetchone()[0]
    conn.execute(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, tok manna_crypt.encrypted_text, note text)"
    )
    fill(conn, st, "accounts", range(1, 21), "ring_main")
    st.key_ids["main_v2"] = conn.execute(
        "SELECT manna_crypt.rotate_keyring('ring_main')"
    ).fetchone()[0]
    fill(conn, st, "accounts", range(21, 41), "ring_main")
    conn.execute("SELECT manna_crypt.register_column('accounts', 'tok')")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('accounts')")
    conn.execute("CREATE INDEX accounts_key ON accounts (manna_crypt.key_id(tok))")
    conn.execute(
        "CREATE VIEW accounts_plain AS"
        " SELECT id, manna_crypt.decrypt_gcm(tok, id::text) AS tok FROM accounts"
    )
    conn.execute(
        "CREATE TABLE checked (id int PRIMARY KEY, c text CHECK (manna_crypt.is_encrypted(c)))"
    )
    conn.execute(
        "INSERT INTO checked VALUES (1, manna_crypt.encrypt_gcm('checked', 'ring_main'))"
    )

    # a keyring whose first key is revoked (forced: its column is registered)
    conn.execute("SELECT manna_crypt.create_keyring('ring_revoked')")
    conn.execute("CREATE TABLE revoked_rows (id int PRIMARY KEY, tok text)")
    fill(conn, st, "revoked_rows", range(1, 6), "ring_revoked", refused=True)
    conn.execute("SELECT manna_crypt.register_column('revoked_rows', 'tok')")
    st.key_ids["revoked_v2"] = conn.execute(
        "SELECT manna_crypt.rotate_keyring('ring_revoked')"
    ).fetchone()[0]
    fill(conn, st, "revoked_rows", range(6, 9), "ring_revoked")
    st.key_ids["revoked_v1"] = key_of(conn, "ring_revoked", 1)
    expect_error(conn, "55000", "SELECT manna_crypt.revoke_key(%s)", (st.key_ids["revoked_v1"],))
    conn.execute("SELECT manna_crypt.revoke_key(%s, force => true)", (st.key_ids["revoked_v1"],))

    # a keyring whose first key is destroyed (crypto-shredded)
    conn.execute("SELECT manna_crypt.create_keyring('ring_shred')")
    conn.execute("CREATE TABLE shredded (id int PRIMARY KEY, tok text)")
    fill(conn, st, "shredded", range(1, 4), "ring_shred", refused=True)
    conn.execute("SELECT manna_crypt.rotate_keyring('ring_shred')")
    fill(conn, st, "shredded", range(4, 6), "ring_shred")
    st.key_ids["shred_v1"] = key_of(conn, "ring_shred", 1)
    conn.execute("SELECT manna_crypt.revoke_key(%s)", (st.key_ids["shred_v1"],))
    conn.execute("SELECT manna_crypt.destroy_key(%s)", (st.key_ids["shred_v1"],))

    # raw-key values (key id 0), text and bytea
    conn.execute("CREATE TABLE raw (id int PRIMARY KEY, t text, b bytea)")
    conn.execute(
        "INSERT INTO raw SELECT i, manna_crypt.encrypt_gcm('raw-' || i, %s, i::text),"
        " manna_crypt.encrypt_gcm(convert_to('raw-' || i, 'UTF8'), %s, i::text)"
        " FROM generate_series(1, 5) i",
        (RAW_KEY, RAW_KEY),
    )

    # a Fernet keyring with two imported keys; a finished migrate_fernet run,
    # and one that left a bad token behind (a failure row)
    for k in st.fernet_keys:
        conn.execute("SELECT manna_crypt.import_fernet_key('legacy', %s)", (k.decode(),))
    for table in ("migrated", "migrated_bad"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tok text)")
        for i in range(1, 11):
            token = Fernet(st.fernet_keys[i % 2]).encrypt(secret(table, i).encode()).decode()
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, token))
            st.plain[(table, i)] = secret(table, i)
    bad = Fernet(Fernet.generate_key()).encrypt(b"foreign").decode()
    conn.execute("INSERT INTO migrated_bad VALUES (11, %s)", (bad,))
    for table in ("migrated", "migrated_bad"):
        conn.execute(
            f"CALL manna_crypt.migrate_fernet('{table}', 'tok', 'legacy', 'ring_main',"
            " batch_size => 4, aad_column => 'id')"
        )
    # a finished rewrap_column run
    conn.execute("CREATE TABLE rewrapped (id int PRIMARY KEY, tok text)")
    fill(conn, st, "rewrapped", range(1, 6), "ring_revoked")
    conn.execute("SELECT manna_crypt.rotate_keyring('ring_revoked')")
    conn.execute("CALL manna_crypt.rewrap_column('rewrapped', 'tok', 'ring_revoked', aad_column => 'id')")

    # the state is what it claims to be
    runs = conn.execute(
        "SELECT tbl::text, mode, status, failed FROM manna_crypt.reencrypt_runs ORDER BY run_id"
    ).fetchall()
    assert runs == [("migrated", "migrate_fernet", "done", 0), ("migrated_bad", "migrate_fernet", "done", 1),
                    ("rewrapped", "rewrap_column", "done", 0)], runs
    assert conn.execute("SELECT count(*) FROM manna_crypt.reencrypt_failures").fetchone()[0] == 1
    # active: one per AES keyring; decrypt_only: ring_main v1, ring_revoked
    # v2, the two Fernet keys; revoked: ring_revoked v1; destroyed: ring_shred v1
    statuses = conn.execute(
        "SELECT status, count(*) FROM manna_crypt.keys GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert statuses == [("active", 3), ("decrypt_only", 4), ("destroyed", 1), ("revoked", 1)], statuses
    assert conn.execute("SELECT count(*) FROM manna_crypt.audit_log").fetchone()[0] > 10


def key_of(conn, keyring: str, version: int) -> int:
    return conn.execute(
        "SELECT key_id FROM manna_crypt.keys WHERE keyring = %s AND version = %s",
        (keyring, version),
    ).fetchone()[0]


# ---- checks, run before the upgrade, in the window and after it -----------------


def records(conn) -> dict:
    """The extension's own records, which an upgrade must keep as they are."""
    q = {
        "keys": "SELECT key_id, keyring, kind, version, status FROM manna_crypt.keys ORDER BY key_id",
        "audit": "SELECT * FROM manna_crypt.audit_log ORDER BY 1",
        "runs": "SELECT run_id, tbl::text, col, mode, status, converted, failed, other_keyring"
                " FROM manna_crypt.reencrypt_runs ORDER BY run_id",
        "failures": "SELECT run_id, row_key, value_class, reason FROM manna_crypt.reencrypt_failures"
                    " ORDER BY run_id, row_key",
        "registered": "SELECT tbl::text, col FROM manna_crypt.registered_columns ORDER BY 1, 2",
    }
    return {k: conn.execute(sql).fetchall() for k, sql in q.items()}


def check_values(conn, st: State, where: str):
    """Every value decrypts to its plaintext, except those under a revoked or
    destroyed key, which are refused with 55000."""
    wrong, not_refused = [], []
    for (table, i), plain in sorted(st.plain.items()):
        sql = f"SELECT manna_crypt.decrypt_gcm(tok, id::text) FROM {table} WHERE id = %s"
        if (table, i) in st.refused:
            try:
                conn.execute(sql, (i,))
                not_refused.append((table, i))
            except psycopg.Error as e:
                if e.sqlstate != "55000":
                    not_refused.append((table, i, e.sqlstate))
            continue
        if conn.execute(sql, (i,)).fetchone()[0] != plain:
            wrong.append((table, i))
    assert wrong == [], f"{where}: rows that do not decrypt to their plaintext: {wrong}"
    assert not_refused == [], f"{where}: rows under revoked/destroyed keys not refused: {not_refused}"
    good, total = conn.execute(
        "SELECT count(*) FILTER (WHERE tok = 'accounts-secret-' || id || '-é🔐'), count(*)"
        " FROM accounts_plain"
    ).fetchone()
    assert good == total, f"{where}: the view over decrypt_gcm gives {good} of {total} rows"
    raw = conn.execute(
        "SELECT count(*) FROM raw WHERE manna_crypt.decrypt_gcm(t, %s, id::text) = 'raw-' || id"
        " AND convert_from(manna_crypt.decrypt_gcm(b, %s, id::text), 'UTF8') = 'raw-' || id",
        (RAW_KEY, RAW_KEY),
    ).fetchone()[0]
    assert raw == 5, f"{where}: {raw} of 5 raw-key rows decrypt"
    bad = conn.execute("SELECT manna_crypt.value_class(tok) FROM migrated_bad WHERE id = 11").fetchone()
    assert bad == ("fernet",), f"{where}: the token migrate_fernet could not convert changed"


def check_fernet(conn, st: State, where: str):
    for n, k in enumerate(st.fernet_keys):
        token = Fernet(k).encrypt(f"fernet-{n}".encode()).decode()
        got = conn.execute("SELECT manna_crypt.decrypt_fernet(%s, 'legacy')", (token,)).fetchone()[0]
        assert got == f"fernet-{n}", f"{where}: decrypt_fernet fails under imported key {n}"


def check_version_trigger(conn, table: str, i: int, where: str):
    v = conn.execute(f"SELECT version FROM {table} WHERE id = %s", (i,)).fetchone()[0]
    conn.execute(f"UPDATE {table} SET note = 'bumped' WHERE id = %s", (i,))
    after = conn.execute(f"SELECT version FROM {table} WHERE id = %s", (i,)).fetchone()[0]
    assert after == v + 1, f"{where}: a plain update of {table} {i} did not bump its version"
    expect_error(conn, "40001", f"UPDATE {table} SET note = 'stale', version = %s WHERE id = %s", (v, i))


def check_named_lock(cluster: Cluster, db: str, where: str):
    with cluster.connect(db, autocommit=False) as a, cluster.connect(db) as b:
        a.execute("SELECT manna_crypt.lock_xact('upgrade-job', '1 second')")
        held = b.execute("SELECT manna_crypt.try_lock_session('upgrade-job')").fetchone()[0]
        assert held is False, f"{where}: a named lock held by another session was granted"
        a.rollback()
        assert b.execute("SELECT manna_crypt.try_lock_session('upgrade-job')").fetchone()[0]
        assert b.execute("SELECT manna_crypt.unlock('upgrade-job')").fetchone()[0]


def check_info(conn, version: str, where: str):
    info = conn.execute("SELECT manna_crypt.info()").fetchone()[0]
    assert info["version"] == version, f"{where}: info() reports library {info['version']}"
    assert info["root_key"]["matches_stored_keys"], f"{where}: info(): root key does not match"
    assert {r["name"] for r in info["keyrings"]} >= {"ring_main", "ring_revoked", "ring_shred", "legacy"}


def extversion(conn) -> str:
    return conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'manna_crypt'").fetchone()[0]


def check_everything_works(cluster: Cluster, conn, st: State):
    """After the update: every feature on old and new data."""
    where = "after ALTER EXTENSION UPDATE"
    # encrypt/decrypt, and rotation: new rows under a new key, old rows still read
    v3 = conn.execute("SELECT manna_crypt.rotate_keyring('ring_main')").fetchone()[0]
    assert v3 not in st.key_ids.values()
    fill(conn, st, "accounts", range(41, 46), "ring_main")
    n = conn.execute("SELECT count(*) FROM accounts WHERE manna_crypt.key_id(tok) = %s", (v3,)).fetchone()[0]
    assert n == 5, f"{where}: {n} of 5 new rows are under the rotated key {v3}"
    # revocation: the revoked keyring's second key, forced (its column is registered)
    expect_error(conn, "55000", "SELECT manna_crypt.revoke_key(%s)", (st.key_ids["revoked_v2"],))
    conn.execute("SELECT manna_crypt.revoke_key(%s, force => true)", (st.key_ids["revoked_v2"],))
    for i in range(6, 9):
        st.refused.add(("revoked_rows", i))
    # rewrap_column: the two rows written in the window under the old key
    conn.execute("SET client_min_messages = warning")
    conn.execute("CALL manna_crypt.rewrap_column('shredded', 'tok', 'ring_shred', aad_column => 'id')")
    assert conn.execute(
        "SELECT status, converted FROM manna_crypt.reencrypt_runs ORDER BY run_id DESC LIMIT 1"
    ).fetchone() == ("done", 2), f"{where}: rewrap_column did not rewrap the 2 rows under the old key"
    # migrate_fernet on a table made now
    conn.execute("CREATE TABLE migrated_new (id int PRIMARY KEY, tok text)")
    for i in range(1, 8):
        token = Fernet(st.fernet_keys[i % 2]).encrypt(secret("migrated_new", i).encode()).decode()
        conn.execute("INSERT INTO migrated_new VALUES (%s, %s)", (i, token))
        st.plain[("migrated_new", i)] = secret("migrated_new", i)
    conn.execute(
        "CALL manna_crypt.migrate_fernet('migrated_new', 'tok', 'legacy', 'ring_main', aad_column => 'id')"
    )
    status, converted = conn.execute(
        "SELECT status, converted FROM manna_crypt.reencrypt_runs"
        " WHERE tbl = 'migrated_new'::regclass ORDER BY run_id DESC LIMIT 1"
    ).fetchone()
    assert (status, converted) == ("done", 7), f"{where}: migrate_fernet run {status}, {converted} converted"
    # optimistic locking on the old table and on one made now
    check_version_trigger(conn, "accounts", 2, where)
    conn.execute("CREATE TABLE locked_new (id int PRIMARY KEY, note text)")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('locked_new')")
    conn.execute("INSERT INTO locked_new (id, note) VALUES (1, 'x')")
    check_version_trigger(conn, "locked_new", 1, where)
    check_named_lock(cluster, "app", where)
    check_values(conn, st, where)
    check_fernet(conn, st, where)
    check_info(conn, NEW, where)


OLD_MEMBER = "old_member"


def member_roundtrip(cluster: Cluster, db: str, keyring: str, where: str):
    """OLD_MEMBER (a plain member of manna_crypt_user since 0.1.0) encrypts
    under `keyring` and decrypts the result."""
    with cluster.connect(db, user=OLD_MEMBER) as m:
        ct = m.execute("SELECT manna_crypt.encrypt_gcm('member'::text, %s::text)", (keyring,)).fetchone()[0]
        got = m.execute("SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)).fetchone()[0]
    assert got == "member", f"{where}: a member of manna_crypt_user cannot use keyring {keyring}"


def check_keyring_grants(cluster: Cluster, conn):
    """After the update manna_crypt_user holds every privilege on every
    keyring, present and future ('*'); README's tightening runbook then
    narrows it to one keyring (issue 13)."""
    where = "after ALTER EXTENSION UPDATE"
    assert sorted(conn.execute(
        "SELECT keyring, privilege, grantee, state FROM manna_crypt.keyring_access"
    ).fetchall()) == [("*", p, "manna_crypt_user", "granted") for p in ("blind_index", "decrypt", "encrypt")]
    member_roundtrip(cluster, "app", "ring_main", where)
    # The next migration's keyring works at once.
    conn.execute("SELECT manna_crypt.create_keyring('ring_after_upgrade')")
    member_roundtrip(cluster, "app", "ring_after_upgrade", where)
    # Tightening: per-keyring grants first, then the wildcard goes.
    conn.execute("SELECT manna_crypt.grant_keyring_access('ring_main', %s, 'all')", (OLD_MEMBER,))
    conn.execute("SELECT manna_crypt.revoke_keyring_access('*', 'manna_crypt_user', 'all')")
    member_roundtrip(cluster, "app", "ring_main", "after tightening")
    with cluster.connect("app", user=OLD_MEMBER) as m:
        expect_error(m, "42501", "SELECT manna_crypt.encrypt_gcm('x'::text, 'ring_after_upgrade'::text)")


def check_catalog_matches_fresh_install(cluster: Cluster, conn):
    cluster.create_db_with_extension("fresh")
    with cluster.connect("fresh") as fresh:
        assert extversion(fresh) == NEW
        expected = snapshot(fresh)
    actual = snapshot(conn)
    if actual != expected:
        pytest.fail(
            f"the catalog of a database upgraded from {OLD} differs from a fresh install of {NEW}:\n\n"
            + diff(expected, actual, f"fresh CREATE EXTENSION ({NEW})", f"upgraded from {OLD}")
            + f"\nsql/manna_crypt--{OLD}--{NEW}.sql must produce what a fresh install produces.",
            pytrace=False,
        )


def test_upgrade_from_0_1_0(old_pg):
    new_pg = pg_dirs("MC_PG_CONFIG")
    assert NEW != OLD, "Cargo.toml still says 0.1.0"
    control = (Path(old_pg["sharedir"]) / "extension" / "manna_crypt.control").read_text()
    assert re.search(rf"default_version = '{re.escape(OLD)}'", control), "the private copy does not hold 0.1.0"

    port = int(os.environ["MC_UPGRADE_PORT"]) if os.environ.get("MC_UPGRADE_PORT") else None
    st = State()
    with Cluster("upgrade", root_key=new_root_key(), bindir=old_pg["bindir"], port=port,
                 settings={"shared_preload_libraries": "manna_crypt"}) as cluster:
        # 1. the old release, with real state, in two databases
        for db in ("app", "app2"):
            cluster.create_db_with_extension(db)
        with cluster.connect("app") as conn:
            assert extversion(conn) == OLD
            make_old_state(conn, st)
            check_values(conn, st, OLD)
            before = records(conn)
            check_info(conn, OLD, f"running {OLD}")
        with cluster.connect("app2") as conn:
            conn.execute(f"CREATE ROLE {OLD_MEMBER} LOGIN IN ROLE manna_crypt_user")
            conn.execute("SELECT manna_crypt.create_keyring('ring_app2')")
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, tok manna_crypt.encrypted_text)")
            conn.execute("INSERT INTO t VALUES (1, manna_crypt.encrypt_gcm('app2-secret', 'ring_app2', '1'))")

        # 2. the new files over the old ones, then a restart (the library is
        #    preloaded): the new library serves the old catalog
        install_new_release(old_pg, new_pg)
        cluster.restart()
        where = f"{NEW} library, {OLD} catalog"
        with cluster.connect("app") as conn:
            assert extversion(conn) == OLD
            assert records(conn) == before, f"{where}: the restart changed the extension's records"
            check_info(conn, NEW, where)
            check_values(conn, st, where)
            check_fernet(conn, st, where)
            check_version_trigger(conn, "accounts", 1, where)
            expect_error(conn, "23514", "INSERT INTO checked VALUES (2, 'plaintext')")
            fill(conn, st, "accounts", range(100, 103), "ring_main")
            conn.execute("SELECT manna_crypt.rotate_keyring('ring_shred')")
            fill(conn, st, "shredded", range(10, 12), "ring_shred")
            # Re-encryption's per-row functions changed signature (and carry
            # the batch's token): the procedures ask for the update first.
            e = expect_error(
                conn, "55000",
                "CALL manna_crypt.rewrap_column('shredded', 'tok', 'ring_shred', aad_column => 'id')",
            )
            assert "ALTER EXTENSION manna_crypt UPDATE" in (e.diag.message_hint or ""), where
            check_values(conn, st, where)
            before = records(conn)
        check_named_lock(cluster, "app", where)
        # No grants table yet: 0.1.0's rule (EXECUTE) still decides.
        member_roundtrip(cluster, "app", "ring_main", where)

        # 3. ALTER EXTENSION ... UPDATE, database by database
        with cluster.connect("app") as conn:
            path = conn.execute(
                "SELECT path FROM pg_extension_update_paths('manna_crypt')"
                " WHERE source = %s AND target = %s", (OLD, NEW)
            ).fetchone()
            assert path == (f"{OLD}--{NEW}",), f"no direct update path {OLD} -> {NEW}: {path}"
            conn.execute("ALTER EXTENSION manna_crypt UPDATE")
            assert extversion(conn) == NEW
            after = records(conn)
            for k in ("keys", "runs", "failures", "registered"):
                assert after[k] == before[k], f"the update changed the extension's {k} records"
            assert after["audit"][: len(before["audit"])] == before["audit"], "the update changed audit rows"
            check_everything_works(cluster, conn, st)
            check_catalog_matches_fresh_install(cluster, conn)
            check_keyring_grants(cluster, conn)
        with cluster.connect("app2") as conn:
            assert extversion(conn) == OLD
            got = conn.execute("SELECT manna_crypt.decrypt_gcm(tok, '1') FROM t").fetchone()[0]
            assert got == "app2-secret", "a database not yet updated stopped decrypting"
            member_roundtrip(cluster, "app2", "ring_app2", f"{NEW} library, {OLD} catalog")
            conn.execute("ALTER EXTENSION manna_crypt UPDATE")
            assert extversion(conn) == NEW
            assert conn.execute("SELECT manna_crypt.decrypt_gcm(tok, '1') FROM t").fetchone()[0] == "app2-secret"
            member_roundtrip(cluster, "app2", "ring_app2", "app2 after ALTER EXTENSION UPDATE")
