"""Regression tests for problems found in review: privilege escalation
through the column registry, partitioned / length-limited columns in the
re-encryption procedures, absurd lock timeouts, empty keyring names."""

import uuid

import psycopg
import pytest

from conftest import connect


def sqlstate(conn, sql, params=None):
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return "ok"


@pytest.fixture
def admin_role(conn):
    name = "adm_" + uuid.uuid4().hex[:8]
    conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE manna_crypt_admin')
    yield name
    conn.execute(f'DROP OWNED BY "{name}"')
    conn.execute(f'DROP ROLE "{name}"')


def test_registry_cannot_run_user_code_as_the_extension_owner(conn, fresh_db, admin_role):
    conn.execute("SELECT manna_crypt.create_keyring('k1')")
    conn.execute(f'GRANT CREATE ON SCHEMA public TO "{admin_role}"')
    with connect(fresh_db, user=admin_role) as a:
        a.execute(
            "CREATE FUNCTION public.pwn() RETURNS text LANGUAGE plpgsql AS "
            f"$$BEGIN EXECUTE 'ALTER ROLE \"{admin_role}\" SUPERUSER'; RETURN 'x'; END$$"
        )
        a.execute("CREATE VIEW public.v AS SELECT public.pwn() AS c")
        # a view is not a table: it cannot be registered
        assert sqlstate(a, "SELECT manna_crypt.register_column('public.v', 'c')") == "22023"
        # a table the role cannot read cannot be registered either
        conn.execute("CREATE TABLE public.secret_t (c text)")
        assert sqlstate(a, "SELECT manna_crypt.register_column('public.secret_t', 'c')") == "42501"
        # revoking with the registry scan runs as the caller
        assert sqlstate(a, "SELECT manna_crypt.revoke_key(1)") == "ok"
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (admin_role,)).fetchone()[0] is False


def test_partitioned_and_inheriting_tables_are_refused(conn):
    conn.execute("SELECT manna_crypt.create_keyring('k2')")
    conn.execute("CREATE TABLE pt (id int, s text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (0) TO (10000)")
    conn.execute("INSERT INTO pt SELECT g, 'plain ' || g FROM generate_series(1, 500) g")
    assert sqlstate(conn, "CALL manna_crypt.encrypt_column('pt', 's', 'k2')") == "22023"
    # each partition on its own works and converts every row
    conn.execute("SET client_min_messages = warning")
    conn.execute("CALL manna_crypt.encrypt_column('pt1', 's', 'k2')")
    n = conn.execute("SELECT count(*) FROM pt WHERE manna_crypt.is_encrypted(s)").fetchone()[0]
    assert n == 500
    conn.execute("CREATE TABLE parent_t (s text)")
    conn.execute("CREATE TABLE child_t () INHERITS (parent_t)")
    assert sqlstate(conn, "CALL manna_crypt.encrypt_column('parent_t', 's', 'k2')") == "22023"


def test_length_limited_column_is_refused_before_any_write(conn):
    conn.execute("SELECT manna_crypt.create_keyring('k3')")
    conn.execute("CREATE TABLE vc (id int PRIMARY KEY, s varchar(40))")
    conn.execute("INSERT INTO vc VALUES (1, 'short 1')")
    assert sqlstate(conn, "CALL manna_crypt.encrypt_column('vc', 's', 'k3')") == "22023"
    assert conn.execute("SELECT s FROM vc").fetchone()[0] == "short 1"
    assert conn.execute("SELECT count(*) FROM manna_crypt.reencrypt_runs").fetchone()[0] == 0


def test_absurd_lock_timeout_does_not_overflow(conn):
    conn.execute("BEGIN")
    conn.execute("SELECT manna_crypt.lock_xact('x', interval '1000000 years')")
    conn.execute("COMMIT")


def test_empty_keyring_name_is_a_bad_argument(conn):
    assert sqlstate(conn, "SELECT manna_crypt.encrypt_gcm('x', '')") == "22023"
    assert sqlstate(conn, "SELECT manna_crypt.decrypt_fernet('gAAAAA', '')") in ("22023", "22P02")
