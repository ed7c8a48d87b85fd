"""Root-key rotation is cluster-wide: the settings belong to the server,
the data keys to each database. A DBA sees which databases are done, and
retiring the previous root key while any database still needs it is
refused (in 0.1.0 the runbook's last step left three other databases with
F0000 on every key operation, and their data gone once the old key was
deleted)."""

import psycopg

from mc_cluster import Cluster, new_root_key


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def status(c):
    with c.connect("one") as x:
        return {db: st for db, _, st in x.execute("SELECT * FROM manna_crypt.root_key_status()")}


def test_rotation_across_three_databases():
    key_a, key_b = new_root_key(), new_root_key()
    settings = {"shared_preload_libraries": "manna_crypt"}
    with Cluster("rot3", root_key=key_a, settings=settings) as c:
        file_a = c.settings["manna_crypt.root_key_file"]
        cts = {}
        for db in ("one", "two", "three"):
            c.create_db_with_extension(db)
            with c.connect(db) as x:
                x.execute("SELECT manna_crypt.create_keyring('k')")
                cts[db] = one(x, "SELECT manna_crypt.encrypt_gcm(%s, 'k')::text", (f"in {db}",))
        st = status(c)
        assert [st[d] for d in ("one", "two", "three")] == ["current"] * 3
        assert st["postgres"] == "unknown"

        # Rotation, step 1: the new root key, the old one as previous.
        file_b = c.write_key_file("b.key", key_b)
        c.configure(**{"manna_crypt.root_key_file": str(file_b),
                       "manna_crypt.previous_root_key_file": file_a})
        c.reload()
        with c.connect("one") as x:
            assert one(x, "SELECT manna_crypt.rewrap_keys()") == 1
        st = status(c)
        assert st["one"] == "current"
        assert st["two"] == st["three"] == "needs previous root key"

        # Retiring the previous key now is refused, by SQL and by a reload.
        with c.connect("one") as x:
            try:
                x.execute("ALTER SYSTEM SET manna_crypt.previous_root_key_file = ''")
                raise AssertionError("retiring the previous root key was accepted")
            except psycopg.Error as e:
                assert e.sqlstate == "22023"
                assert "rewrap_keys" in (e.diag.message_detail or "")
        c.configure(**{"manna_crypt.previous_root_key_file": None})
        c.reload()
        for db in ("two", "three"):
            with c.connect(db) as x:
                assert one(x, "SHOW manna_crypt.previous_root_key_file") == file_a
                assert one(x, "SELECT manna_crypt.decrypt_gcm(%s)", (cts[db],)) == f"in {db}"
        assert "rewrap_keys" in c.log_text()

        # Step 2 in the other databases; then the previous key may go. (Set
        # it to '' rather than removing the line: PostgreSQL does not retry
        # resetting a removed setting once a reset was refused.)
        for db in ("two", "three"):
            with c.connect(db) as x:
                assert one(x, "SELECT manna_crypt.rewrap_keys()") == 1
        st = status(c)
        assert [st[d] for d in ("one", "two", "three")] == ["current"] * 3
        c.configure(**{"manna_crypt.previous_root_key_file": ""})
        c.reload()
        for db in ("one", "two", "three"):
            with c.connect(db) as x:
                assert one(x, "SHOW manna_crypt.previous_root_key_file") == ""
                assert one(x, "SELECT manna_crypt.decrypt_gcm(%s)", (cts[db],)) == f"in {db}"
        # A dropped database's note goes with it.
        with c.connect("postgres") as x:
            x.execute("DROP DATABASE three")
        assert "three" not in status(c)
