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

import base64
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
        # Syntax errors and type errors around a secret.
        expect_error(conn, "42601", f"SELECT manna_crypt.encrypt_gcm('{s['plain-syn']}', 'pii' ;")
        expect_error(conn, "42601", f"SELECT manna_crypt.encrypt_gcm('{s['plain-unterm']}")
        expect_error(conn, "22P02", f"INSERT INTO items (id, tok) VALUES ('{s['plain-type']}', 'x')")
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
    assert "INSERT INTO items (id, tok) VALUES (<n>, '<redacted>')" in log
    assert "UPDATE items SET tok = '<redacted>' WHERE id = <n>" in log
    assert "SELECT manna_crypt.encrypt_gcm('<redacted>', '<redacted>'::bytea)" in log
    assert "$1 = '<redacted>'" in log
    assert 'invalid input syntax for type integer: "<redacted>"' in log
    assert "Key (email)=(<redacted>) already exists." in log
    assert "STATEMENT:  SELECT manna_crypt.encrypt_gcm('<redacted>', '<redacted>' ;" in log


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
    assert plain in log
    assert every not in log
    assert "SELECT '<redacted>' AS ordinary" in log


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


@pytest.mark.skipif(not HAS_AUTO_EXPLAIN, reason=NO_AUTO_EXPLAIN)
@pytest.mark.parametrize("fmt", ["text", "json", "yaml", "xml"])
def test_auto_explain_plans(cluster, fmt):
    w = LogWindow(cluster)
    lit, param, nested = _fresh("plain-ae"), _fresh("plain-aeparam"), _fresh("plain-aenest")
    with cluster.connect("app") as conn:
        conn.execute(f"SET auto_explain.log_format = {fmt}")
        conn.execute(f"SELECT manna_crypt.encrypt_gcm('{lit}', 'pii'), 123456789")
        conn.execute("SELECT manna_crypt.encrypt_gcm(%s::text, 'pii')", [param], prepare=True)
        conn.execute(f"INSERT INTO items (id, tok) VALUES (20, '{nested}')")
        conn.execute("DELETE FROM items WHERE id = 20")
    log = w.flush()
    assert "plan:" in log
    for s in (lit, param, nested, "123456789"):
        assert s not in log


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
    time.sleep(1.0)
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
    assert "Failed process was running: SELECT manna_crypt.encrypt_gcm('<redacted>'" in log
    assert secret not in log


def _quietly(conn, sql):
    try:
        conn.execute(sql)
    except psycopg.Error:
        pass
