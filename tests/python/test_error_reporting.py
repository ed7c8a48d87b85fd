"""What a client and the server log see of an error that passes through the
extension (docs/DESIGN.md section 6):

- never a Rust backtrace or a Rust source location, whatever RUST_BACKTRACE
  says in the server's environment: not in the message, DETAIL, HINT or
  CONTEXT, not as the source file/line/function fields of the protocol, not
  in the server log at log_error_verbosity = verbose, not in a NOTICE;
- a PostgreSQL error raised inside one of our SQL statements (a lock
  timeout, statement_timeout, a cancel, a CHECK or unique violation, a
  permission check) keeps its SQLSTATE, DETAIL, CONTEXT and its schema,
  table and constraint names, so drivers see which constraint failed;
- our own errors carry their SQLSTATE, DETAIL and HINT and no source
  location at all.

Each variant is a cluster of its own whose server environment has
RUST_BACKTRACE set (checked in /proc): once with the library loaded per
backend, once preloaded (its _PG_init runs in the postmaster).
"""

import re
import threading
import time

import psycopg
import pytest

from mc_cluster import Cluster, new_root_key

VARIANTS = [
    pytest.param(({"RUST_BACKTRACE": "1"}, {}), id="RUST_BACKTRACE=1"),
    pytest.param(
        ({"RUST_BACKTRACE": "full"}, {"shared_preload_libraries": "manna_crypt"}),
        id="RUST_BACKTRACE=full-preloaded",
    ),
]

# Anything that betrays Rust in a message: a backtrace, a panic, a Rust
# source file. PostgreSQL's own C locations ("postgres.c:3319") are fine.
RUST_IN_TEXT = re.compile(
    r"backtrace|panicked|rust_begin_unwind|/rustc/|\.rs\b|\brust\b|pgrx", re.IGNORECASE
)
# The same in the server log, where PostgreSQL's own LOCATION lines and
# CONTEXT lines (which may legitimately hold "::" casts) are expected.
RUST_IN_LOG = re.compile(
    r"stack backtrace|panicked|rust_begin_unwind|/rustc/|src/\S*\.rs|\.rs:\d|\.rs\b|pgrx",
    re.IGNORECASE,
)


@pytest.fixture(scope="module", params=VARIANTS)
def cluster(request):
    env, settings = request.param
    settings = {"log_error_verbosity": "verbose", "log_min_messages": "debug1", **settings}
    with Cluster("errors", root_key=new_root_key(), server_env=env, settings=settings) as c:
        # The point of the test: the server really runs with RUST_BACKTRACE.
        assert c.server_environ().get("RUST_BACKTRACE") == env["RUST_BACKTRACE"]
        c.create_db_with_extension("app")
        with c.connect("app") as conn:
            conn.execute("CREATE ROLE keeper LOGIN")
            conn.execute("GRANT manna_crypt_admin TO keeper")
            conn.execute("SELECT manna_crypt.create_keyring('k')")
        yield c


class LogWatch:
    """The part of the server log written since it was created."""

    def __init__(self, cluster):
        self.path = cluster.log_path
        self.start = self.path.stat().st_size

    def text(self):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")


def assert_clean(e: psycopg.Error):
    d = e.diag
    for name in ("message_primary", "message_detail", "message_hint", "context"):
        text = getattr(d, name) or ""
        assert not RUST_IN_TEXT.search(text), f"{name} betrays Rust: {text[:400]!r}"
    assert not (d.source_file or "").endswith(".rs"), d.source_file
    assert "::" not in (d.source_function or ""), d.source_function


def assert_log_clean(watch: LogWatch, expect: str):
    log = watch.text()
    assert expect in log, f"{expect!r} not in the server log:\n{log[-3000:]}"
    bad = [line for line in log.splitlines() if RUST_IN_LOG.search(line)]
    assert not bad, "Rust in the server log:\n" + "\n".join(bad[:20])


def keep_notices(conn) -> list:
    """The NOTICEs the connection receives, as dicts (psycopg's Diagnostic is
    only readable inside the handler)."""
    notices = []
    conn.add_notice_handler(
        lambda d: notices.append(
            {
                "message": d.message_primary,
                "file": d.source_file,
                "line": d.source_line,
                "function": d.source_function,
            }
        )
    )
    return notices


def fails(conn, sqlstate, sql, params=None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql, params)
    e = info.value
    assert e.sqlstate == sqlstate, (e.sqlstate, e.diag.message_primary)
    return e


def test_our_own_error_has_no_source_location(cluster):
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        e = fails(c, "22023", "SELECT manna_crypt.lock_key('')")
    assert e.diag.message_primary == "invalid lock name"
    assert e.diag.message_detail == "the name is 0 bytes long; a lock name has 1 to 200 bytes"
    assert e.diag.source_file is None and e.diag.source_line is None
    assert e.diag.source_function is None
    assert_clean(e)
    assert_log_clean(watch, "invalid lock name")


def test_named_lock_timeout(cluster):
    watch = LogWatch(cluster)
    with cluster.connect("app") as holder, cluster.connect("app") as waiter:
        holder.execute("SELECT manna_crypt.lock_session('x')")
        e = fails(waiter, "55P03", "SELECT manna_crypt.lock_xact('x', '10 ms')")
    assert e.diag.message_primary == 'could not obtain lock "x" within 10 ms'
    assert "pg_locks" in e.diag.message_hint
    assert e.diag.source_file is None
    assert_clean(e)
    assert_log_clean(watch, 'could not obtain lock "x"')


@pytest.mark.parametrize(
    "setting, sqlstate, message",
    [
        ("lock_timeout", "55P03", "canceling statement due to lock timeout"),
        ("statement_timeout", "57014", "canceling statement due to statement timeout"),
    ],
)
def test_timeouts_inside_our_statement(cluster, setting, sqlstate, message):
    watch = LogWatch(cluster)
    with cluster.connect("app") as holder, cluster.connect("app") as waiter:
        holder.execute("SELECT manna_crypt.lock_session('y')")
        waiter.execute(f"SET {setting} = '200ms'")
        e = fails(waiter, sqlstate, "SELECT manna_crypt.lock_session('y')")
    assert e.diag.message_primary == message
    assert e.diag.message_detail is None
    # PostgreSQL's own context of the statement we ran, and its location.
    assert 'SQL statement "SELECT pg_catalog.pg_advisory_lock($1)"' in e.diag.context
    assert e.diag.source_file == "postgres.c"
    assert_clean(e)
    assert_log_clean(watch, message)
    assert "LOCATION:  ProcessInterrupts, postgres.c:" in watch.text()


def test_cancel_inside_our_statement(cluster):
    watch = LogWatch(cluster)
    with cluster.connect("app") as holder, cluster.connect("app") as waiter:
        holder.execute("SELECT manna_crypt.lock_session('z')")
        pid = waiter.info.backend_pid

        def cancel():
            deadline = time.monotonic() + 20
            with cluster.connect("app") as k:
                while time.monotonic() < deadline:
                    waiting = k.execute(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                        (pid,),
                    ).fetchone()
                    if waiting and waiting[0]:
                        k.execute("SELECT pg_cancel_backend(%s)", (pid,))
                        return
                    time.sleep(0.05)

        t = threading.Thread(target=cancel, daemon=True)
        t.start()
        e = fails(waiter, "57014", "SELECT manna_crypt.lock_session('z')")
        t.join(30)
    assert e.diag.message_primary == "canceling statement due to user request"
    assert 'SQL statement "SELECT pg_catalog.pg_advisory_lock($1)"' in e.diag.context
    assert_clean(e)
    assert_log_clean(watch, "canceling statement due to user request")


def test_check_violation_keeps_its_constraint(cluster):
    """The re-encryption batch UPDATE writes a ciphertext the table's CHECK
    rejects: the driver sees PostgreSQL's own error, constraint and all."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute(
            "CREATE TABLE checked (id int PRIMARY KEY, "
            "secret text CONSTRAINT secret_short CHECK (length(secret) < 40))"
        )
        c.execute("INSERT INTO checked VALUES (1, 'hello')")
        e = fails(c, "23514", "CALL manna_crypt.encrypt_column('checked', 'secret', 'k')")
    d = e.diag
    assert d.message_primary == 'new row for relation "checked" violates check constraint "secret_short"'
    assert (d.constraint_name, d.table_name, d.schema_name) == ("secret_short", "checked", "public")
    assert d.message_detail.startswith("Failing row contains (1, mc1:")
    # The statement the error happened in, and the procedure around it.
    assert 'SQL statement "UPDATE ONLY checked SET secret' in d.context
    assert "PL/pgSQL function manna_crypt._reencrypt_run(" in d.context
    assert d.source_file == "execMain.c"
    assert_clean(e)
    assert_log_clean(watch, "violates check constraint")


def test_unique_violation_keeps_its_constraint(cluster):
    """Two plaintexts of different lengths encrypt to ciphertexts of the same
    length: a unique index on length() fails inside the batch UPDATE."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute("CREATE TABLE uniq (id int PRIMARY KEY, secret text)")
        c.execute("CREATE UNIQUE INDEX uniq_len_key ON uniq ((length(secret)))")
        c.execute("INSERT INTO uniq VALUES (1, 'a'), (2, 'bb')")
        e = fails(c, "23505", "CALL manna_crypt.encrypt_column('uniq', 'secret', 'k')")
    d = e.diag
    assert d.message_primary == 'duplicate key value violates unique constraint "uniq_len_key"'
    assert (d.constraint_name, d.table_name, d.schema_name) == ("uniq_len_key", "uniq", "public")
    assert d.message_detail.startswith("Key (length(secret))=(")
    assert 'SQL statement "UPDATE ONLY uniq SET secret' in d.context
    assert_clean(e)
    assert_log_clean(watch, "violates unique constraint")


def test_permission_denied_from_postgres(cluster):
    """revoke_key counts the values of every registered column as the caller;
    one the caller cannot read fails with PostgreSQL's own 42501."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute("CREATE TABLE private_t (s text)")
        c.execute("SELECT manna_crypt.register_column('private_t', 's')")
        key_id = c.execute(
            "SELECT key_id FROM manna_crypt.keys WHERE keyring = 'k'"
        ).fetchone()[0]
    with cluster.connect("app", user="keeper") as k:
        e = fails(k, "42501", "SELECT manna_crypt.revoke_key(%s)", (key_id,))
    # The first registered column keeper cannot read (the other tests
    # register theirs too).
    table = re.fullmatch(r"permission denied for table (\w+)", e.diag.message_primary)[1]
    assert f'SQL statement "SELECT count(*) FROM public.{table} WHERE' in e.diag.context
    assert e.diag.source_file == "aclchk.c"
    assert_clean(e)
    assert_log_clean(watch, "permission denied for table")


def test_notices_have_no_source_location(cluster):
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        notices = keep_notices(c)
        c.execute("CREATE TABLE plain (id int PRIMARY KEY, secret text)")
        c.execute("INSERT INTO plain VALUES (1, 'x'), (2, 'y')")
        c.execute("CALL manna_crypt.encrypt_column('plain', 'secret', 'k')")
    assert notices, "encrypt_column reports its progress in NOTICEs"
    for n in notices:
        assert n["message"], n
        assert n["file"] is None and n["line"] is None and n["function"] is None, n
        assert not RUST_IN_TEXT.search(n["message"]), n
    assert_log_clean(watch, "encrypt_column plain.secret done")


def test_our_error_inside_our_own_statement(cluster):
    """A CHECK that calls one of our functions fails inside the batch UPDATE:
    our error, with no source location, and the statement as CONTEXT."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute(
            "CREATE TABLE nested (id int PRIMARY KEY, secret text CONSTRAINT nested_check CHECK ("
            "CASE WHEN secret LIKE 'mc1:%' THEN manna_crypt.encrypt_gcm('x', 'nope') IS NOT NULL "
            "ELSE true END))"
        )
        c.execute("INSERT INTO nested VALUES (1, 'hello')")
        e = fails(c, "42704", "CALL manna_crypt.encrypt_column('nested', 'secret', 'k')")
    assert e.diag.message_primary == 'keyring "nope" does not exist'
    assert "create_keyring" in e.diag.message_hint
    assert 'SQL statement "UPDATE ONLY nested SET secret' in e.diag.context
    assert e.diag.source_file is None
    assert_clean(e)
    assert_log_clean(watch, 'keyring "nope" does not exist')


def test_handled_errors_leave_later_errors_alone(cluster):
    """PL/pgSQL sees all of an error it catches, ours or PostgreSQL's from
    inside our statement; the errors after it are reported as themselves."""
    with cluster.connect("app") as c:
        notices = keep_notices(c)
        c.execute("CREATE TABLE IF NOT EXISTS private_t (s text)")
        c.execute("SELECT manna_crypt.register_column('private_t', 's')")
        c.execute(
            """DO $$ DECLARE k int; m text; ctx text; BEGIN
                 SELECT key_id INTO k FROM manna_crypt.keys WHERE keyring = 'k';
                 SET LOCAL ROLE keeper;
                 FOR i IN 1..50 LOOP
                   BEGIN
                     PERFORM manna_crypt.lock_key('');
                   EXCEPTION WHEN invalid_parameter_value THEN NULL;
                   END;
                   BEGIN
                     PERFORM manna_crypt.revoke_key(k);
                   EXCEPTION WHEN insufficient_privilege THEN
                     GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, ctx = PG_EXCEPTION_CONTEXT;
                   END;
                 END LOOP;
                 RAISE NOTICE 'caught: % | %', m, ctx;
               END $$"""
        )
        e = fails(c, "22012", "SELECT 1 / 0")
        assert e.diag.source_file == "int.c" and e.diag.context is None
        e = fails(c, "22023", "SELECT manna_crypt.lock_key('')")
        assert e.diag.message_primary == "invalid lock name" and e.diag.context is None
    assert_clean(e)
    caught = notices[-1]["message"]
    assert caught.startswith("caught: permission denied for table "), caught
    assert 'SQL statement "SELECT count(*) FROM public.' in caught, caught
    assert not RUST_IN_TEXT.search(caught), caught
