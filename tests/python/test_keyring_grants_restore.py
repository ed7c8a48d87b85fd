"""Keyring grants through pg_dump and restore (README "Keyring access"):
into another cluster, where a grantee's role exists (the row is bound to it)
or does not (the restore succeeds, the row waits for a role of that name),
and into the same cluster (matched by OID)."""

import psycopg
import pytest

from mc_cluster import Cluster, new_root_key


def one(c, sql, params=None):
    return c.execute(sql, params).fetchone()[0]


def decrypts(cluster, db, user, ct):
    """True if `user` decrypts `ct`, False on 42501 (anything else fails)."""
    with cluster.connect(db, user=user) as c:
        try:
            return one(c, "SELECT manna_crypt.decrypt_gcm(%s::text)", (ct,)) == "restored secret"
        except psycopg.Error as e:
            assert e.sqlstate == "42501", e.sqlstate
            return False


def sysid(c):
    return one(c, "SELECT system_identifier FROM pg_control_system()")


def test_dump_and_restore_keep_grants(tmp_path):
    key = new_root_key()
    with Cluster("grants_src", root_key=key) as src, Cluster("grants_dst", root_key=key) as dst:
        src.create_db_with_extension("app")
        with src.connect("app") as c:
            c.execute("SELECT manna_crypt.create_keyring('pii')")
            ct = one(c, "SELECT manna_crypt.encrypt_gcm('restored secret'::text, 'pii'::text)")
            for role in ("g_app", "g_later", "g_none"):
                c.execute(f"CREATE ROLE {role} LOGIN IN ROLE manna_crypt_user")
            for role in ("g_app", "g_later"):
                c.execute("SELECT manna_crypt.grant_keyring_access('pii', %s, 'decrypt')", (role,))
        assert decrypts(src, "app", "g_app", ct) and not decrypts(src, "app", "g_none", ct)
        dump = tmp_path / "app.dump"
        src.pg_tool("pg_dump", "-Fc", "-f", str(dump), "app")

        # Another cluster: g_app exists before the restore, g_later not yet.
        dst.create_db_with_extension("base")      # creates the manna_crypt roles
        with dst.connect() as c:
            c.execute("CREATE ROLE g_app LOGIN IN ROLE manna_crypt_user")
            c.execute("CREATE ROLE g_none LOGIN IN ROLE manna_crypt_user")
            c.execute("CREATE DATABASE restored")
        dst.pg_tool("pg_restore", "--exit-on-error", "-d", "restored", str(dump))
        assert decrypts(dst, "restored", "g_app", ct)
        assert not decrypts(dst, "restored", "g_none", ct)
        with dst.connect("restored") as c:
            here = sysid(c)
            # g_app's row was bound to the local role at restore time.
            row = c.execute("SELECT grantee_oid, cluster_id FROM manna_crypt.keyring_grants"
                            " WHERE grantee_name = 'g_app'").fetchone()
            assert row == (one(c, "SELECT 'g_app'::regrole::oid"), here)
            assert one(c, "SELECT state FROM manna_crypt.keyring_access WHERE grantee = 'g_later'") \
                == "restored, role missing"
            c.execute("CREATE ROLE g_later LOGIN IN ROLE manna_crypt_user")
        # A role of that name created after the restore gets the grant.
        assert decrypts(dst, "restored", "g_later", ct)
        # g_app is judged by OID now: a new role of the same name gets nothing.
        with dst.connect("restored") as c:
            c.execute("DROP ROLE g_app")
            c.execute("CREATE ROLE g_app LOGIN IN ROLE manna_crypt_user")
        assert not decrypts(dst, "restored", "g_app", ct)

        # The same cluster: a restore into another database matches by OID.
        with src.connect() as c:
            c.execute("CREATE DATABASE copy")
        src.pg_tool("pg_restore", "--exit-on-error", "-d", "copy", str(dump))
        assert decrypts(src, "copy", "g_app", ct) and decrypts(src, "copy", "g_later", ct)
        assert not decrypts(src, "copy", "g_none", ct)
        with src.connect("copy") as c:
            assert one(c, "SELECT count(*) FROM manna_crypt.keyring_grants WHERE cluster_id = %s",
                       (sysid(c),)) == 2
