"""Regression tests for problems found in review: privilege escalation
through the column registry, partitioned / length-limited columns in the
re-encryption procedures, absurd lock timeouts, empty keyring names."""

import uuid

import pytest

from conftest import connect, sqlstate


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


def registered(conn):
    return conn.execute(
        "SELECT tbl::oid::int, col::text FROM manna_crypt.registered_columns ORDER BY 1, 2"
    ).fetchall()


def test_dropping_a_column_or_table_forgets_its_registration(conn):
    """registered_columns holds bare oids, which PostgreSQL reuses: a DROP
    must not leave a registration behind for the next table with the oid."""
    conn.execute("CREATE TABLE reg_a (id int, c text, d text)")
    conn.execute("CREATE TABLE reg_b (id int, c text)")
    a = conn.execute("SELECT 'reg_a'::regclass::oid::int").fetchone()[0]
    b = conn.execute("SELECT 'reg_b'::regclass::oid::int").fetchone()[0]
    for t, c in (("reg_a", "c"), ("reg_a", "d"), ("reg_b", "c")):
        conn.execute("SELECT manna_crypt.register_column(%s, %s)", (t, c))
    conn.execute("ALTER TABLE reg_a DROP COLUMN d")
    assert registered(conn) == sorted([(a, "c"), (b, "c")])
    # a dropped column of the same name elsewhere changes nothing here
    conn.execute("ALTER TABLE reg_b ADD COLUMN d text")
    conn.execute("ALTER TABLE reg_b DROP COLUMN d")
    assert registered(conn) == sorted([(a, "c"), (b, "c")])
    conn.execute("DROP TABLE reg_a")
    assert registered(conn) == [(b, "c")]
    # dropped with its schema, or by a type it depends on
    conn.execute("CREATE SCHEMA reg_s")
    conn.execute("CREATE TABLE reg_s.t (c text)")
    conn.execute("SELECT manna_crypt.register_column('reg_s.t', 'c')")
    conn.execute("DROP SCHEMA reg_s CASCADE")
    assert registered(conn) == [(b, "c")]
    # names that need quoting (a dot in them, too)
    conn.execute('CREATE TABLE "reg.Odd" (c text, "Odd.C" text)')
    conn.execute("""SELECT manna_crypt.register_column('"reg.Odd"', 'Odd.C')""")
    conn.execute("""SELECT manna_crypt.register_column('"reg.Odd"', 'c')""")
    conn.execute('ALTER TABLE "reg.Odd" DROP COLUMN "Odd.C"')
    assert [c for _, c in registered(conn)] == ["c", "c"]
    conn.execute('DROP TABLE "reg.Odd"')
    assert registered(conn) == [(b, "c")]
    # a rolled-back DROP keeps the registration
    conn.execute("BEGIN")
    conn.execute("DROP TABLE reg_b")
    conn.execute("ROLLBACK")
    assert registered(conn) == [(b, "c")]


def test_dropping_a_table_closes_its_unfinished_run_but_keeps_the_history(conn):
    conn.execute("SELECT manna_crypt.create_keyring('k_drop')")
    conn.execute("CREATE TABLE run_t (id int, s text)")
    conn.execute("INSERT INTO run_t VALUES (1, 'plain')")
    conn.execute("SET client_min_messages = warning")
    conn.execute("CALL manna_crypt.encrypt_column('run_t', 's', 'k_drop')")
    # an unfinished run, as a crash leaves it
    conn.execute(
        """INSERT INTO manna_crypt.reencrypt_runs (tbl, col, mode, target_keyring, batch_size, pid)
           VALUES ('run_t', 's', 'encrypt_column', 'k_drop', 1000, NULL)"""
    )
    conn.execute("DROP TABLE run_t")
    rows = conn.execute(
        "SELECT status, finished_at IS NOT NULL FROM manna_crypt.reencrypt_runs ORDER BY run_id"
    ).fetchall()
    assert rows == [("done", True), ("abandoned", True)]
    assert registered(conn) == []


def test_a_table_owner_without_rights_on_the_registry_can_drop_a_registered_table(conn, fresh_db):
    owner = "own_" + uuid.uuid4().hex[:8]
    conn.execute(f'CREATE ROLE "{owner}" LOGIN')
    try:
        conn.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
        with connect(fresh_db, user=owner) as o:
            o.execute("CREATE TABLE public.owned (id int, c text, d text)")
        conn.execute("SELECT manna_crypt.register_column('public.owned', 'c')")
        conn.execute("SELECT manna_crypt.register_column('public.owned', 'd')")
        with connect(fresh_db, user=owner) as o:
            assert sqlstate(o, "SELECT * FROM manna_crypt.registered_columns") == "42501"
            # the event trigger's function cannot be called directly
            assert sqlstate(o, "SELECT manna_crypt._forget_dropped()") in ("42501", "0A000")
            o.execute("ALTER TABLE public.owned DROP COLUMN d")
            assert [c for _, c in registered(conn)] == ["c"]
            o.execute("DROP TABLE public.owned")
        assert registered(conn) == []
        # a DROP that drops nothing registered works as ever
        with connect(fresh_db, user=owner) as o:
            o.execute("CREATE TABLE public.other (id int)")
            o.execute("CREATE INDEX ON public.other (id)")
            o.execute("DROP TABLE public.other")
    finally:
        conn.execute(f'DROP OWNED BY "{owner}" CASCADE')
        conn.execute(f'DROP ROLE "{owner}"')


def test_drop_extension_takes_its_event_trigger_along(conn):
    conn.execute("CREATE TABLE ext_t (c text)")
    conn.execute("SELECT manna_crypt.register_column('ext_t', 'c')")
    conn.execute("DROP EXTENSION manna_crypt")
    assert conn.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0] == 0
    # DROP still works without the extension, and it can be created again
    conn.execute("DROP TABLE ext_t")
    conn.execute("CREATE EXTENSION manna_crypt")
    conn.execute("CREATE TABLE ext_t (c text)")
    conn.execute("SELECT manna_crypt.register_column('ext_t', 'c')")
    conn.execute("DROP EXTENSION manna_crypt CASCADE")
    conn.execute("DROP TABLE ext_t")
