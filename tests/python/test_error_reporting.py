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


def test_an_error_that_ends_the_call_keeps_its_fields(cluster):
    """An error in the re-encryption batch UPDATE that ends the CALL (a
    serialization failure a trigger raises) reaches the driver as
    PostgreSQL's own, constraint, table and schema names and all."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute("CREATE TABLE checked (id int PRIMARY KEY, secret text)")
        c.execute(
            """CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 RAISE EXCEPTION 'refused by a trigger' USING ERRCODE = 'serialization_failure',
                   CONSTRAINT = 'secret_short', TABLE = 'checked', SCHEMA = 'public';
               END $$"""
        )
        c.execute("CREATE TRIGGER refuse BEFORE UPDATE ON checked FOR EACH ROW EXECUTE FUNCTION public.refuse()")
        c.execute("INSERT INTO checked VALUES (1, 'hello')")
        e = fails(c, "40001", "CALL manna_crypt.encrypt_column('checked', 'secret', 'k')")
    d = e.diag
    assert d.message_primary == "refused by a trigger"
    assert (d.constraint_name, d.table_name, d.schema_name) == ("secret_short", "checked", "public")
    # The statement the error happened in, and the procedure around it.
    assert 'SQL statement "UPDATE ONLY public.checked SET secret' in d.context
    assert "PL/pgSQL function manna_crypt._reencrypt_run(" in d.context
    assert d.source_file == "pl_exec.c"
    assert_clean(e)
    assert_log_clean(watch, "refused by a trigger")


def test_row_errors_are_recorded_with_their_constraint(cluster):
    """A CHECK or a unique index one converted row violates is recorded
    (SQLSTATE, constraint) and skipped; nothing Rust in the record or log."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute(
            "CREATE TABLE rows_checked (id int PRIMARY KEY, "
            "secret text CONSTRAINT secret_short CHECK (length(secret) < 40))"
        )
        c.execute("INSERT INTO rows_checked VALUES (1, 'hello')")
        c.execute("CALL manna_crypt.encrypt_column('rows_checked', 'secret', 'k')")
        c.execute("CREATE TABLE uniq (id int PRIMARY KEY, secret text)")
        c.execute("CREATE UNIQUE INDEX uniq_len_key ON uniq ((length(secret)))")
        c.execute("INSERT INTO uniq VALUES (1, 'a'), (2, 'bb')")
        c.execute("CALL manna_crypt.encrypt_column('uniq', 'secret', 'k')")
        reasons = [r[0] for r in c.execute(
            "SELECT f.reason FROM manna_crypt.reencrypt_failures f "
            "JOIN manna_crypt.reencrypt_runs r USING (run_id) "
            "WHERE r.tbl IN ('rows_checked'::regclass, 'uniq'::regclass) ORDER BY r.run_id"
        ).fetchall()]
    assert len(reasons) == 2, reasons
    assert "23514" in reasons[0] and "secret_short" in reasons[0]
    assert "23505" in reasons[1] and "uniq_len_key" in reasons[1]
    for r in reasons:
        assert not RUST_IN_TEXT.search(r), r
    assert_log_clean(watch, "retrying its rows one by one")


def test_permission_denied_from_postgres(cluster):
    """Row-level security that FORCE applies to the table's owner stops a
    re-encryption with PostgreSQL's own 42501 (it is never half done)."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute("DROP ROLE IF EXISTS rls_owner")
        c.execute("CREATE ROLE rls_owner")
        c.execute("CREATE TABLE rls_t (id int, s text)")
        c.execute("INSERT INTO rls_t VALUES (1, 'x')")
        c.execute("ALTER TABLE rls_t OWNER TO rls_owner")
        c.execute("ALTER TABLE rls_t ENABLE ROW LEVEL SECURITY")
        c.execute("ALTER TABLE rls_t FORCE ROW LEVEL SECURITY")
        e = fails(c, "42501", "CALL manna_crypt.encrypt_column('rls_t', 's', 'k')")
    assert "row-level security" in e.diag.message_primary
    assert "public.rls_t" in e.diag.context
    assert (e.diag.source_file or "").endswith(".c")
    assert_clean(e)
    assert_log_clean(watch, "row-level security")


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
    assert_log_clean(watch, "2 rows: 2 converted, 0 already in target form")


def test_our_error_inside_our_own_statement(cluster):
    """A trigger that calls one of our functions fails inside the batch
    UPDATE with our own 55P03 (a lock held elsewhere, which ends the CALL):
    our error, with no source location, and the statement as CONTEXT."""
    watch = LogWatch(cluster)
    with cluster.connect("app") as c:
        c.execute("CREATE TABLE nested (id int PRIMARY KEY, secret text)")
        c.execute(
            """CREATE FUNCTION public.nested_lock() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN PERFORM manna_crypt.lock_xact('nested-held', '10 ms'); RETURN NEW; END $$"""
        )
        c.execute("CREATE TRIGGER nl BEFORE UPDATE ON nested FOR EACH ROW EXECUTE FUNCTION public.nested_lock()")
        c.execute("INSERT INTO nested VALUES (1, 'hello')")
        with cluster.connect("app") as holder:
            holder.execute("SELECT manna_crypt.lock_session('nested-held')")
            e = fails(c, "55P03", "CALL manna_crypt.encrypt_column('nested', 'secret', 'k')")
    assert e.diag.message_primary == 'could not obtain lock "nested-held" within 10 ms'
    assert 'SQL statement "UPDATE ONLY public.nested SET secret' in e.diag.context
    assert e.diag.source_file is None
    assert_clean(e)
    assert_log_clean(watch, 'could not obtain lock "nested-held"')


def test_handled_errors_leave_later_errors_alone(cluster):
    """PL/pgSQL sees all of an error it catches, ours or PostgreSQL's from
    inside our statement; the errors after it are reported as themselves."""
    with cluster.connect("app") as c:
        notices = keep_notices(c)
        c.execute("CREATE TABLE IF NOT EXISTS private_t (s text)")
        c.execute("SELECT manna_crypt.register_column('private_t', 's')")
        # A writer with the table open: revoke_key's SHARE lock times out.
        writer = cluster.connect("app", autocommit=False)
        writer.execute("INSERT INTO private_t VALUES ('w')")
        c.execute(
            """DO $$ DECLARE k int; m text; ctx text; BEGIN
                 SELECT key_id INTO k FROM manna_crypt.keys WHERE keyring = 'k';
                 SET LOCAL lock_timeout = '20ms';
                 FOR i IN 1..20 LOOP
                   BEGIN
                     PERFORM manna_crypt.lock_key('');
                   EXCEPTION WHEN invalid_parameter_value THEN NULL;
                   END;
                   BEGIN
                     PERFORM manna_crypt.revoke_key(k);
                   EXCEPTION WHEN lock_not_available THEN
                     GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, ctx = PG_EXCEPTION_CONTEXT;
                   END;
                 END LOOP;
                 RAISE NOTICE 'caught: % | %', m, ctx;
               END $$"""
        )
        writer.close()
        e = fails(c, "22012", "SELECT 1 / 0")
        assert e.diag.source_file == "int.c" and e.diag.context is None
        e = fails(c, "22023", "SELECT manna_crypt.lock_key('')")
        assert e.diag.message_primary == "invalid lock name" and e.diag.context is None
    assert_clean(e)
    caught = notices[-1]["message"]
    assert caught.startswith("caught: canceling statement due to lock timeout"), caught
    assert 'SQL statement "LOCK TABLE ONLY public.' in caught, caught
    assert not RUST_IN_TEXT.search(caught), caught
