"""manna_crypt.redact_log (README "Keeping plaintext out of the server log"):
with the logging an audited database runs (every statement, every duration,
bind parameters in full, errors with their statement, verbose errors,
csvlog and jsonlog, auto_explain with nested statements, debug_print_plan),
the README's flows run with distinctive plaintexts, keys and tokens, as
simple and extended-protocol statements, with syntax and type errors
around a secret; then every server log file is searched. With the setting
on, no secret is in any of them; with it off, every one is (so each check
can fail).
"""

import os
import re
import secrets
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from mc_cluster import Cluster, expect_error, new_root_key, pg_bin

# Hooks and logging differ between PostgreSQL versions: run on every one.
pytestmark = pytest.mark.all_versions


def _pkglibdir() -> Path:
    out = subprocess.run([pg_bin("pg_config"), "--pkglibdir"], capture_output=True, text=True)
    return Path(out.stdout.strip())


HAS_AUTO_EXPLAIN = (_pkglibdir() / "auto_explain.so").exists()
NO_AUTO_EXPLAIN = "this PostgreSQL build ships no auto_explain (the 16 build from pgserver)"

LOGGING = {
    "log_statement": "all",
    "log_min_duration_statement": 0,
    "log_min_error_statement": "error",
    "log_parameter_max_length": -1,
    "log_parameter_max_length_on_error": -1,
    "log_error_verbosity": "verbose",
    "logging_collector": True,
    "log_destination": "stderr,csvlog,jsonlog",
    "log_directory": "log",
}
AUTO_EXPLAIN = {
    "auto_explain.log_min_duration": 0,
    "auto_explain.log_analyze": True,
    "auto_explain.log_verbose": True,
    "auto_explain.log_nested_statements": True,
}


@pytest.fixture(scope="module")
def cluster():
    settings = dict(LOGGING)
    if HAS_AUTO_EXPLAIN:
        settings["shared_preload_libraries"] = "manna_crypt,auto_explain"
        settings.update(AUTO_EXPLAIN)
    with Cluster("redact", root_key=new_root_key(), settings=settings) as c:
        c.create_db_with_extension("app")
        with c.connect("app") as conn:
            conn.execute("SELECT manna_crypt.create_keyring('pii')")
            conn.execute(
                "CREATE TABLE items (id int PRIMARY KEY, tok text, email text UNIQUE,"
                " note text NOT NULL DEFAULT '')"
            )
            conn.execute("SELECT manna_crypt.protect_column('items', 'tok', 'pii')")
            conn.execute("CREATE ROLE app_user LOGIN")
            conn.execute("GRANT manna_crypt_user TO app_user")
        yield c


class LogWindow:
    """The server log files' growth while a block runs: stderr, csvlog and
    jsonlog files of the logging collector."""

    def __init__(self, c: Cluster):
        self.c = c
        self.start = {p: p.stat().st_size for p in self.files()}

    def files(self):
        d = self.c.data / "log"
        return sorted(d.iterdir()) if d.exists() else []

    def flush(self):
        """Waits until a marker statement has reached every log file kind."""
        mark = f"mark-{uuid.uuid4().hex}"
        with self.c.connect("app") as conn:
            conn.execute(f"SELECT '{mark}'")
        deadline = time.time() + 30
        while time.time() < deadline:
            text = self.text()
            kinds = {p.suffix for p in self.files() if mark in self._new(p)}
            if {".log", ".csv", ".json"} <= kinds:
                return text
            time.sleep(0.1)
        raise AssertionError("the marker never reached every log file")

    def _new(self, p: Path) -> str:
        with open(p, "rb") as f:
            f.seek(self.start.get(p, 0))
            return f.read().decode("utf-8", "replace")

    def text(self) -> str:
        return "\n".join(self._new(p) for p in self.files())


def _fresh(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(6)}"


def _bytes_of(s: str) -> str:
    """A pattern for how a node dump (debug_print_plan) shows a text
    Const's bytes: decimal numbers, wrapped across lines."""
    return r"\b" + r"\s+".join(str(b) for b in s.encode()) + r"\b"


def run_flows(c: Cluster, options: str = "") -> dict:
    """Runs the README's flows with fresh secrets; returns them by name."""
    s = {k: _fresh(k) for k in (
        "plain-enc", "plain-raw", "plain-ins", "plain-upd", "plain-syn", "plain-unterm",
        "plain-type", "plain-dup", "plain-failrow", "plain-copycol", "plain-copyline",
        "plain-ext", "plain-extins", "plain-bind", "plain-dbg", "plain-do",
        "plain-bidx", "plain-bidxbind",
    )}
    s["rawkey"] = secrets.token_hex(32)
    fernet_key = Fernet.generate_key()
    s["fernet-key"] = fernet_key.decode()
    s["fernet-token"] = Fernet(fernet_key).encrypt(b"legacy plaintext").decode()
    s["number"] = str(900000000 + secrets.randbelow(99999999))
    ring = f"legacy_{secrets.token_hex(3)}"
    with c.connect("app", options=options) as conn:
        # Simple protocol: keyring and raw-key encryption, Fernet import and
        # decryption, plain writes to a protected column, a re-encryption.
        conn.execute(f"SELECT manna_crypt.encrypt_gcm('{s['plain-enc']}', 'pii')")
        conn.execute(
            f"SELECT manna_crypt.encrypt_gcm('{s['plain-raw']}', '\\x{s['rawkey']}'::bytea)"
        )
        conn.execute(f"SELECT manna_crypt.import_fernet_key('{ring}', '{s['fernet-key']}')")
        conn.execute(f"SELECT manna_crypt.decrypt_fernet('{s['fernet-token']}', '{ring}')")
        conn.execute("DELETE FROM items")
        conn.execute(f"INSERT INTO items (id, tok) VALUES (1, '{s['plain-ins']}')")
        conn.execute(f"UPDATE items SET tok = '{s['plain-upd']}' WHERE id = 1")
        conn.execute(f"INSERT INTO items (id, tok) VALUES (2, {s['number']})")
        conn.execute("CALL manna_crypt.rewrap_column('items', 'tok', 'pii', 100)")
        conn.execute(
            "DO $$BEGIN PERFORM manna_crypt.encrypt_gcm("
            f"'{s['plain-do']}', 'pii'); END$$"
        )
        # Blind-index lookups: a literal, and a bind value.
        conn.execute("SELECT manna_crypt.rotate_index_key('pii')")
        conn.execute(f"SELECT manna_crypt.blind_index('{s['plain-bidx']}', 'pii', 'email')")
        conn.execute("SELECT manna_crypt.blind_index_all(%s, 'pii', 'email')",
                     [s["plain-bidxbind"]], prepare=True)
        # Syntax errors and type errors around a secret.
        expect_error(conn, "42601", f"SELECT manna_crypt.encrypt_gcm('{s['plain-syn']}', 'pii' ;")
        expect_error(conn, "42601", f"SELECT manna_crypt.encrypt_gcm('{s['plain-unterm']}")
        expect_error(conn, "22P02",
                     f"INSERT INTO items (id, tok) VALUES ('{s['plain-type']}', 'x')")
        conn.execute(f"INSERT INTO items (id, tok, email) VALUES (3, 'x', '{s['plain-dup']}')")
        expect_error(conn, "23505",
                     f"INSERT INTO items (id, tok, email) VALUES (4, 'x', '{s['plain-dup']}')")
        expect_error(conn, "23502", "INSERT INTO items (id, tok, email, note) "
                     f"VALUES (5, 'x', '{s['plain-failrow']}', NULL)")
        # COPY into the protected table: the bad value, the raw line.
        for data in (f"{s['plain-copycol']}\tx\n", f"7\tx\t{s['plain-copyline']}\tz\tq\n"):
            with pytest.raises(psycopg.errors.DataError):
                with conn.cursor().copy("COPY items (id, tok) FROM STDIN") as cp:
                    cp.write(data)
        # Extended protocol: prepared, text and binary parameters, a bind
        # error (log_parameter_max_length_on_error's CONTEXT line).
        for binary in (False, True):
            conn.execute("SELECT manna_crypt.encrypt_gcm(%s::text, 'pii')", [s["plain-ext"]],
                         prepare=True, binary=binary)
        conn.execute("INSERT INTO items (id, tok) VALUES (%s, %s)", [10, s["plain-extins"]],
                     prepare=True)
        expect_error(conn, "22P02", "INSERT INTO items (id, tok) VALUES (%s::text::int, 'y')",
                     [s["plain-bind"]])
        # debug_print_plan: the node tree holds the Const's bytes.
        conn.execute("SET debug_print_plan = on")
        conn.execute(f"SELECT manna_crypt.encrypt_gcm('{s['plain-dbg']}', 'pii')")
        conn.execute("RESET debug_print_plan")
    return s


def _leaks(log: str, s: dict) -> list:
    found = [k for k, v in s.items() if v in log]
    if re.search(_bytes_of(s["plain-dbg"]), log):
        found.append("plain-dbg (node dump bytes)")
    return found


def _has(log: str, needle: str):
    """Asserts `needle` is in the log without printing the log (which may
    hold a secret if the check fails)."""
    found = needle in log
    assert found, f"not in the server log: {needle!r}"


def _where(log: str, s: dict) -> str:
    """The log lines that hold a secret, each secret shown by its name
    only (a test's failure output carries no secret either)."""
    lines = [line for line in log.splitlines() if any(v in line for v in s.values())]
    for k, v in s.items():
        lines = [line.replace(v, f"<<{k}>>") for line in lines]
    return "\n".join(lines[:40])


def test_setting_is_superuser_only(cluster):
    with cluster.connect("app") as conn:
        assert conn.execute("SHOW manna_crypt.redact_log").fetchone()[0] == "on"
    with cluster.connect("app", user="app_user") as conn:
        expect_error(conn, "42501", "SET manna_crypt.redact_log = off")
        expect_error(conn, "42501", "SET manna_crypt.redact_log = 'all'")
    with pytest.raises(psycopg.OperationalError):
        cluster.connect("app", user="app_user", options="-c manna_crypt.redact_log=off")
    with cluster.connect("app") as conn:
        expect_error(conn, "22023", "SET manna_crypt.redact_log = sometimes")


def test_flows_leave_no_secret_in_any_log_file(cluster):
    w = LogWindow(cluster)
    s = run_flows(cluster)
    log = w.flush()
    assert _leaks(log, s) == [], _where(log, s)
    # The statements keep their shape.
    _has(log, "INSERT INTO items (id, tok) VALUES (<n>, '<redacted>')")
    _has(log, "UPDATE items SET tok = '<redacted>' WHERE id = <n>")
    _has(log, "SELECT manna_crypt.encrypt_gcm('<redacted>', '<redacted>'::bytea)")
    _has(log, "$1 = '<redacted>'")
    _has(log, 'invalid input syntax for type integer: "<redacted>"')
    _has(log, "Key (email)=(<redacted>) already exists.")
    _has(log, "STATEMENT:  SELECT manna_crypt.encrypt_gcm('<redacted>', '<redacted>' ;")
    _has(log, "unnamed portal with parameters: $1 = '<redacted>'")
    _has(log, "COPY items, line 1, column id: <redacted>")
    _has(log, "COPY items, line 1: <redacted>")
    _has(log, "Failing row contains (<redacted>).")
    _has(log, "DETAIL:  <redacted>")  # the debug_print_plan node tree
    _has(log, "DO '<redacted>'")
    # csvlog's and jsonlog's query field.
    _has(log, '"statement":"SELECT manna_crypt.encrypt_gcm(\'<redacted>\', \'<redacted>\' ;"')
    _has(log, ',"SELECT manna_crypt.encrypt_gcm(\'<redacted>\', \'<redacted>\' ;",')


def test_flows_with_redaction_off_log_every_secret(cluster):
    w = LogWindow(cluster)
    s = run_flows(cluster, options="-c manna_crypt.redact_log=off")
    log = w.flush()
    missing = set(s) | {"plain-dbg (node dump bytes)"}
    missing -= set(_leaks(log, s))
    bytea = [line for line in log.splitlines() if "::bytea" in line]
    assert not missing, (missing, _where("\n".join(bytea), s))


def test_statements_not_using_manna_crypt_stay_readable_and_all_redacts_them(cluster):
    w = LogWindow(cluster)
    plain, every = _fresh("ordinary"), _fresh("ordinary-all")
    with cluster.connect("app") as conn:
        conn.execute(f"SELECT '{plain}' AS ordinary")
        conn.execute("SET manna_crypt.redact_log = 'all'")
        conn.execute(f"SELECT '{every}' AS ordinary")
    log = w.flush()
    _has(log, plain)
    leaked = every in log
    assert not leaked
    _has(log, "SELECT '<redacted>' AS ordinary")


def test_wrapper_function_marks_the_outer_statement(cluster):
    """A function that calls manna_crypt inside: its inner statement is
    analyzed while the outer one runs, so the outer statement's error line
    is redacted (its `statement:` line, logged before, is not: README)."""
    w = LogWindow(cluster)
    secret = _fresh("plain-wrapped")
    with cluster.connect("app") as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION wrap(v text, n int) RETURNS text LANGUAGE plpgsql AS "
            "$$BEGIN RETURN manna_crypt.encrypt_gcm(v, 'pii') || (1 / n)::text; END$$"
        )
        expect_error(conn, "22012", f"SELECT wrap('{secret}', 0)")
    log = w.flush()
    errors = [line for line in log.splitlines() if "STATEMENT:" in line and "wrap(" in line]
    assert errors and all(secret not in line for line in errors), errors


def test_table_protected_in_another_session(cluster):
    """The backend-local list follows invalidations: a table protected in
    another session makes this session's next syntax error naming it
    redacted (no catalog lookup is possible while the error is reported);
    the same error on an unprotected table is logged as written."""
    w = LogWindow(cluster)
    # The control's literal holds the word "late": a word in a plain
    # literal is no table name.
    secret, control = _fresh("plain-late"), _fresh("ordinary-late")
    with cluster.connect("app") as a, cluster.connect("app") as b:
        a.execute("SELECT 1")
        b.execute("CREATE TABLE late (id int PRIMARY KEY, tok text)")
        b.execute("CREATE TABLE unprotected (id int PRIMARY KEY, tok text)")
        b.execute("SELECT manna_crypt.protect_column('late', 'tok', 'pii')")
        a.execute("SELECT 1")  # analyzed: the list is read again
        expect_error(a, "42601", f"SELECT tok FROM late WHERE tok = '{secret}' ORDER")
        expect_error(a, "42601", f"SELECT tok FROM unprotected WHERE tok = '{control}' ORDER")
        b.execute("DROP TABLE late, unprotected")
    log = w.flush()
    leaked = secret in log
    assert not leaked, _where(log, {"plain-late": secret})
    _has(log, control)


def test_parallel_worker_lines(cluster):
    """An error raised in a parallel worker is logged by the worker too,
    with the leader's statement; the worker never analyzes, so it redacts
    every statement's lines."""
    w = LogWindow(cluster)
    secret = _fresh("plain-par")
    force = "debug_parallel_query" if cluster_major(cluster) >= 16 else "force_parallel_mode"
    with cluster.connect("app") as conn:
        conn.execute("INSERT INTO items (id, tok) VALUES (30, 'x') ON CONFLICT DO NOTHING")
        conn.execute(f"SET {force} = on")
        conn.execute("SET max_parallel_workers_per_gather = 2")
        expect_error(conn, "22P02", f"SELECT (id::text || '{secret}')::int FROM items")
    log = w.flush()
    _has(log, "parallel worker")
    leaked = secret in log
    assert not leaked, _where(log, {"plain-par": secret})


def test_deadlock_detail_quotes_no_other_session_statement(cluster):
    """A deadlock's server-only DETAIL quotes every session's statement;
    the victim here runs nothing sensitive, the other session does: that
    statement is redacted all the same."""
    w = LogWindow(cluster)
    secret = _fresh("plain-deadlock")
    with cluster.connect("app") as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS dl (id int PRIMARY KEY, v text)")
        setup.execute("INSERT INTO dl VALUES (1, ''), (2, '') ON CONFLICT DO NOTHING")
    victim = cluster.connect("app", autocommit=False)
    other = cluster.connect("app", autocommit=False)
    victim.execute("SET deadlock_timeout = '100ms'")
    other.execute("SET deadlock_timeout = '60s'")
    victim.execute("UPDATE dl SET v = v WHERE id = 1")
    other.execute("UPDATE dl SET v = v WHERE id = 2")
    t = threading.Thread(target=lambda: _quietly(other, (
        f"UPDATE dl SET v = manna_crypt.encrypt_gcm('{secret}', 'pii') WHERE id = 1")))
    t.start()
    with cluster.connect("app") as watcher:
        _wait_lock(watcher, other.info.backend_pid)
    with pytest.raises(psycopg.errors.DeadlockDetected):
        victim.execute("UPDATE dl SET v = v WHERE id = 2")
    victim.rollback()
    t.join(30)
    other.rollback()
    victim.close()
    other.close()
    log = w.flush()
    _has(log, "deadlock detected")
    _has(log, "UPDATE dl SET v = manna_crypt.encrypt_gcm('<redacted>', '<redacted>')")
    leaked = secret in log
    assert not leaked, _where(log, {"plain-deadlock": secret})


def _wait_lock(conn, pid, timeout=30):
    """Waits until backend `pid` waits for a lock."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        if row and row[0] == "Lock":
            return
        time.sleep(0.05)
    raise AssertionError("the statement never waited for its lock")


def cluster_major(c: Cluster) -> int:
    with c.connect("app") as conn:
        return int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000


@pytest.mark.skipif(not HAS_AUTO_EXPLAIN, reason=NO_AUTO_EXPLAIN)
@pytest.mark.parametrize("fmt", ["text", "json", "yaml", "xml"])
@pytest.mark.parametrize("redact", ["on", "off"])
def test_auto_explain_plans(cluster, fmt, redact):
    """auto_explain with log_analyze, log_verbose and nested statements, in
    every format: plan constants, the query text and (16+) the query
    parameters. With redaction off, every value is in a plan line."""
    w = LogWindow(cluster)
    lit, param, nested = _fresh("plain-ae"), _fresh("plain-aeparam"), _fresh("plain-aenest")
    number = str(700000000 + secrets.randbelow(99999999))
    with cluster.connect("app", options=f"-c manna_crypt.redact_log={redact}") as conn:
        conn.execute(f"SET auto_explain.log_format = {fmt}")
        conn.execute(f"SELECT manna_crypt.encrypt_gcm('{lit}', 'pii'), {number}")
        conn.execute("SELECT manna_crypt.encrypt_gcm(%s::text, 'pii')", [param], prepare=True)
        conn.execute(f"INSERT INTO items (id, tok) VALUES (20, '{nested}')")
        conn.execute("DELETE FROM items WHERE id = 20")
    log = w.flush()
    plans = "\n".join(line for line in log.split("\n20") if "plan:" in line)
    _has(plans, "plan:")
    for name, s in (("literal", lit), ("parameter", param), ("nested", nested),
                    ("number", number)):
        in_plans, anywhere = s in plans, s in log
        if redact == "on":
            assert not anywhere, f"the {name} is in the server log"
        else:
            assert in_plans, f"the {name} is not in any plan line"


def test_postmaster_crash_report(cluster):
    """`Failed process was running: ...` after a backend is killed: the
    postmaster cannot judge the statement, and always redacts it."""
    w = LogWindow(cluster)
    secret = _fresh("plain-crash")
    conn = cluster.connect("app")
    pid = conn.info.backend_pid
    t = threading.Thread(target=lambda: _quietly(
        conn, f"SELECT manna_crypt.encrypt_gcm('{secret}', 'pii'), pg_sleep(60)"))
    t.start()
    with cluster.connect("app") as watcher:
        cluster_wait_active(watcher, pid)
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    deadline = time.time() + 60
    while True:
        try:
            log = w.flush()
            break
        except psycopg.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    _has(log, "Failed process was running: SELECT manna_crypt.encrypt_gcm('<redacted>'")
    leaked = secret in log
    assert not leaked


def cluster_wait_active(conn, pid, timeout=30):
    """Waits until backend `pid` runs its statement (pg_sleep)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        row = conn.execute(
            "SELECT wait_event FROM pg_stat_activity WHERE pid = %s AND state = 'active'", [pid]
        ).fetchone()
        if row and row[0] == "PgSleep":
            return
        time.sleep(0.05)
    raise AssertionError("the statement never started")


def _quietly(conn, sql):
    try:
        conn.execute(sql)
    except psycopg.Error:
        pass
