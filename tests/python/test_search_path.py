"""Search-path safety of the functions defined in SQL (sql/*.sql).

The attack: a role that may create objects in a schema on a privileged
caller's search_path (`public` with CREATE granted, as in databases created
before PostgreSQL 15 and upgraded since) defines operators whose argument
types match the extension's comparisons exactly — `oid = regclass` as in
`attrelid = tbl`, `name = name`, `regtype <> regtype`, `integer = bigint` —
with a function of its own. An exact match beats pg_catalog's operator,
which needs a coercion, wherever public is in the path; with public put
before pg_catalog even exact pg_catalog matches lose. The function then
runs as whoever called the extension: a superuser, or the table's owner.

Every SQL and PL/pgSQL function therefore carries
`SET search_path = pg_catalog, pg_temp`; the procedures that commit, which
cannot, are fully qualified. tests/python/test_catalog.py asserts both
rules for every routine; this file shows the attack itself failing.
"""

import uuid

import pytest

from conftest import connect

# (left, right) of each operator the attacker shadows, with `=` and `<>`.
SHADOWED = [
    ("oid", "regclass"),
    ("regclass", "oid"),
    ("oid", "oid"),
    ("name", "name"),
    ("regtype", "regtype"),
    ("integer", "bigint"),
    ("bigint", "integer"),
    ("text", "text"),
]

# The caller's search_path: public first explicitly, and the default one
# (pg_catalog implicitly first: only inexact matches can be stolen).
PATHS = ["public, pg_catalog", '"$user", public']


@pytest.fixture
def attacker(conn, fresh_db):
    """An unprivileged role with CREATE on public, whose operators record
    who ran them in public.pwned and otherwise give the right answer."""
    name = "mallory_" + uuid.uuid4().hex[:8]
    conn.execute(f'CREATE ROLE "{name}" LOGIN')
    conn.execute(f'GRANT CREATE ON SCHEMA public TO "{name}"')
    with connect(fresh_db, user=name) as a:
        a.execute("CREATE TABLE public.pwned (who name, op text)")
        a.execute("GRANT INSERT ON public.pwned TO PUBLIC")
        for i, (left, right) in enumerate(SHADOWED):
            for op in ("=", "<>"):
                fn = f"public.evil_{i}_{'eq' if op == '=' else 'ne'}"
                a.execute(
                    f"CREATE FUNCTION {fn}({left}, {right}) RETURNS boolean LANGUAGE plpgsql AS $$"
                    f"BEGIN INSERT INTO public.pwned VALUES (current_user, '{left} {op} {right}'); "
                    f"RETURN $1 OPERATOR(pg_catalog.{op}) $2; END$$"
                )
                a.execute(f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {fn})")
    yield name
    conn.execute("RESET search_path")
    conn.execute(f'DROP OWNED BY "{name}" CASCADE')
    conn.execute(f'DROP ROLE "{name}"')


def pwned(conn):
    return conn.execute("SELECT who::text, op, count(*) FROM public.pwned GROUP BY 1, 2 ORDER BY 1, 2").fetchall()


def test_the_attack_works_on_a_function_without_a_fixed_path(conn, attacker):
    """The attacker's operators are live: a plain query written like the
    0.1.0 bodies runs them as the superuser."""
    conn.execute("CREATE TABLE public.probe (id int)")
    conn.execute("SET search_path = public, pg_catalog")
    conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_attribute a WHERE a.attrelid = 'public.probe'::pg_catalog.regclass"
    )
    assert pwned(conn) != []


@pytest.mark.parametrize("path", PATHS)
def test_optimistic_locking_functions_run_no_operator_of_the_callers_path(conn, attacker, path):
    conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, x text)")
    conn.execute("CREATE TABLE public.t2 (id int PRIMARY KEY, lock_version integer NOT NULL DEFAULT 1)")
    conn.execute(f"SET search_path = {path}")
    # every branch: the column added, an existing trigger replaced, an
    # existing integer column used, and removal
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('t')")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('t')")
    conn.execute("SELECT manna_crypt.enable_optimistic_locking('t2', 'lock_version')")
    conn.execute("SELECT manna_crypt.disable_optimistic_locking('t2')")
    assert pwned(conn) == []
    # and they still did their work
    conn.execute("RESET search_path")
    n = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'manna_crypt_optimistic_lock' AND NOT tgisinternal"
    ).fetchone()[0]
    assert n == 1
    assert conn.execute("SELECT count(*) FROM public.pwned").fetchone()[0] == 0


@pytest.mark.parametrize("path", PATHS)
def test_column_status_runs_no_operator_of_the_callers_path(conn, attacker, path):
    conn.execute("SELECT manna_crypt.create_keyring('sp_ring')")
    conn.execute("CREATE TABLE public.s (id int, v text)")
    conn.execute(
        "INSERT INTO public.s VALUES (1, 'plain'), (2, NULL), (3, manna_crypt.encrypt_gcm('secret', 'sp_ring'))"
    )
    conn.execute(f"SET search_path = {path}")
    rows = conn.execute("SELECT category, keyring, n FROM manna_crypt.column_status('s', 'v') ORDER BY 1").fetchall()
    assert pwned(conn) == []
    assert rows == [("mc1", "sp_ring", 1), ("null", None, 1), ("plaintext", None, 1)]


def test_dropping_a_registered_table_runs_no_operator_as_the_extension_owner(conn, fresh_db, attacker):
    """The sql_drop event trigger is SECURITY DEFINER: it must not run the
    dropping role's operators with the extension owner's rights."""
    owner = "app_" + uuid.uuid4().hex[:8]
    conn.execute(f'CREATE ROLE "{owner}" LOGIN')
    try:
        conn.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
        with connect(fresh_db, user=owner) as o:
            o.execute("CREATE TABLE public.reg (id int, c text, d text)")
        conn.execute("SELECT manna_crypt.register_column('public.reg', 'c')")
        conn.execute("SELECT manna_crypt.register_column('public.reg', 'd')")
        with connect(fresh_db, user=owner) as o:
            o.execute("SET search_path = public, pg_catalog")
            o.execute("ALTER TABLE reg DROP COLUMN d")
            o.execute("DROP TABLE reg")
        assert pwned(conn) == []
        assert conn.execute("SELECT count(*) FROM manna_crypt.registered_columns").fetchone()[0] == 0
    finally:
        conn.execute(f'DROP OWNED BY "{owner}" CASCADE')
        conn.execute(f'DROP ROLE "{owner}"')


# The procedures' own bodies resolve nothing through the caller's path (see
# test_catalog.py); the C functions they call fix theirs as well: every SPI
# statement of theirs runs with search_path = pg_catalog, pg_temp
# (src/pg/spi.rs), whatever the caller's path. (Before that, with public
# first, a key-cache miss and the re-encryption's table checks ran the
# attacker's `name = name` and `oid = oid` operators as the caller.)
@pytest.mark.parametrize("path", PATHS)
def test_reencryption_and_encryption_run_no_operator_of_the_callers_path(conn, attacker, path):
    conn.execute("SELECT manna_crypt.create_keyring('sp_ring2')")
    conn.execute("CREATE TABLE public.e (id int, s text)")
    conn.execute("INSERT INTO public.e VALUES (1, 'plain')")
    conn.execute(f"SET search_path = {path}")
    conn.execute("SET client_min_messages = warning")
    conn.execute("SELECT manna_crypt.encrypt_gcm('x', 'sp_ring2')")
    conn.execute("CALL manna_crypt.encrypt_column('e', 's', 'sp_ring2')")
    assert pwned(conn) == []
    assert conn.execute("SELECT manna_crypt.is_encrypted(s) FROM public.e").fetchone()[0] is True
