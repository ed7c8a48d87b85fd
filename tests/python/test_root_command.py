"""The root key command's contract (docs/DESIGN.md section 2): it runs in a
process group of its own with only stdin, stdout and stderr open; the
timeout (manna_crypt.root_key_command_timeout) kills the whole group, also
when a grandchild holds its output; a cancel, statement_timeout or
termination stops it and the client gets PostgreSQL's own error (57014,
57P01); when it fails, the last line of its standard error goes to the
server log only. Runs on a cluster of its own, since it changes the
server's configuration.
"""

import os
import re
import secrets
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from mc_cluster import Cluster, error_text, expect_error, new_root_key

E = expect_error
COMMAND = "manna_crypt.root_key_command"
TIMEOUT = "manna_crypt.root_key_command_timeout"
KEY_OP = "SELECT manna_crypt.create_keyring('r')"


@pytest.fixture(scope="module")
def rc():
    with Cluster("rootcmd") as c:
        c.key = new_root_key()
        c.key_file = c.write_key_file("k.key", c.key + "\n")
        c.create_db_with_extension("base")  # creates the manna_crypt roles
        with c.connect() as x:
            x.execute("CREATE ROLE lowly LOGIN")
            x.execute("GRANT manna_crypt_user TO lowly")
        yield c


@pytest.fixture
def db(rc):
    name = "c_" + uuid.uuid4().hex[:10]
    rc.create_db_with_extension(name)
    yield name
    with rc.connect() as x:
        x.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def use_command(c: Cluster, command: str, timeout=None):
    """Configures the root key command (and its timeout) and reloads; new
    sessions see it."""
    c.configure(**{COMMAND: command, TIMEOUT: timeout})
    c.reload()


def marker(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def sleep_arg(seconds: int) -> str:
    """A `sleep` argument unique to this test (40.123456 sleeps 40 s), so
    `pgrep -f` finds this test's processes and no one else's."""
    return f"{seconds}.{secrets.randbelow(10**6):06d}"


def running(pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-a", "-f", pattern], capture_output=True, text=True)
    return r.stdout.splitlines()


def gone(pattern: str, within: float = 3.0) -> bool:
    """Whether no process matches `pattern` (allowing a SIGKILLed process a
    moment to disappear)."""
    deadline = time.monotonic() + within
    while running(pattern):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def children_of(pid: int) -> list[str]:
    """The backend's child processes (a zombie included)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def kill_matching(pattern: str):
    """Cleanup after a failed test: kills, by pid, what this test started
    (the pattern holds the test's unique sleep argument)."""
    for line in running(pattern):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def in_thread(fn):
    out = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as e:  # examined by the caller
            out["error"] = e
        out["done"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# ---- the timeout --------------------------------------------------------------------------


def test_timeout_kills_a_grandchild_that_holds_stdout(rc, db):
    """The shell prints the key and exits, but a background `sleep` keeps
    standard output open: the command has not finished until the timeout,
    which then kills the whole process group."""
    arg = sleep_arg(40)
    use_command(rc, f"sleep {arg} & cat {rc.key_file}", timeout=2)
    try:
        with rc.connect(db) as x:
            t0 = time.monotonic()
            e = E(x, "58030", KEY_OP)
            elapsed = time.monotonic() - t0
            assert children_of(x.info.backend_pid) == [], "a child was not reaped"
        assert elapsed < 15, f"took {elapsed:.1f} s"
        assert "did not finish within 2 seconds" in e.diag.message_primary
        assert gone(f"sleep {arg}"), running(f"sleep {arg}")
    finally:
        kill_matching(f"sleep {arg}")


def test_timeout_setting_is_superuser_only_and_bounded(rc, db):
    use_command(rc, f"cat {rc.key_file}")
    with rc.connect(db, user="lowly") as x:
        # Load the library in this session, so the setting is defined.
        x.execute("SELECT manna_crypt.is_encrypted('x')")
        E(x, "42501", f"SET {TIMEOUT} = 5")
        E(x, "42501", f"SHOW {TIMEOUT}")
        E(x, "42501", "SELECT set_config(%s, '5', false)", (TIMEOUT,))
    with rc.connect(db) as su:
        su.execute("SELECT manna_crypt.is_encrypted('x')")
        assert su.execute(f"SHOW {TIMEOUT}").fetchone()[0] == "30s"
        row = su.execute(
            "SELECT min_val, max_val, unit, context FROM pg_settings WHERE name = %s", (TIMEOUT,)
        ).fetchone()
        assert row == ("1", "3600", "s", "superuser")
        for bad in ("0", "-1", "3601", "'2h'"):
            E(su, "22023", f"SET {TIMEOUT} = {bad}")
        su.execute(f"SET {TIMEOUT} = '1min'")
        assert su.execute(f"SHOW {TIMEOUT}").fetchone()[0] == "1min"


# ---- cancel, statement_timeout, termination -----------------------------------------------


def test_cancel_stops_the_command(rc, db):
    arg = sleep_arg(30)
    use_command(rc, f"sleep {arg}; cat {rc.key_file}")
    try:
        with rc.connect(db) as x, rc.connect(db) as other:
            pid = x.info.backend_pid
            t, out = in_thread(lambda: x.execute(KEY_OP))
            time.sleep(1)
            assert running(f"sleep {arg}"), "the command is not running"
            cancelled = time.monotonic()
            assert other.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()[0]
            t.join(20)
            assert "done" in out, "the key operation did not return"
            assert out["done"] - cancelled < 5, f"took {out['done'] - cancelled:.1f} s"
            e = out.get("error")
            assert isinstance(e, psycopg.Error), out
            assert e.sqlstate == "57014", (e.sqlstate, e.diag.message_primary)
            assert "canceling statement due to user request" in e.diag.message_primary
            assert children_of(pid) == [], "a child was not reaped"
            assert gone(f"sleep {arg}"), running(f"sleep {arg}")
            # The session goes on; the key loads once the command is quick.
            use_command(rc, f"cat {rc.key_file}")
            x.execute(KEY_OP)
    finally:
        kill_matching(f"sleep {arg}")


def test_statement_timeout_stops_the_command(rc, db):
    arg = sleep_arg(30)
    use_command(rc, f"sleep {arg}; cat {rc.key_file}")
    try:
        with rc.connect(db) as x:
            x.execute("SET statement_timeout = '1s'")
            t0 = time.monotonic()
            e = E(x, "57014", KEY_OP)
            elapsed = time.monotonic() - t0
            assert elapsed < 5, f"took {elapsed:.1f} s"
            assert "statement timeout" in e.diag.message_primary
            assert children_of(x.info.backend_pid) == [], "a child was not reaped"
            assert gone(f"sleep {arg}"), running(f"sleep {arg}")
    finally:
        kill_matching(f"sleep {arg}")


def test_termination_stops_the_command(rc, db):
    arg = sleep_arg(30)
    use_command(rc, f"sleep {arg}; cat {rc.key_file}")
    try:
        with rc.connect(db) as x, rc.connect(db) as other:
            pid = x.info.backend_pid
            t, out = in_thread(lambda: x.execute(KEY_OP))
            time.sleep(1)
            assert running(f"sleep {arg}"), "the command is not running"
            terminated = time.monotonic()
            assert other.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            t.join(20)
            assert "done" in out, "the key operation did not return"
            assert out["done"] - terminated < 5
            e = out.get("error")
            assert isinstance(e, psycopg.Error), out
            assert e.sqlstate == "57P01", (e.sqlstate, str(e))
            assert gone(f"sleep {arg}"), running(f"sleep {arg}")
    finally:
        kill_matching(f"sleep {arg}")


# ---- what the command inherits ------------------------------------------------------------


def test_command_sees_only_stdin_stdout_stderr(rc, db):
    """`ls -l /proc/self/fd` lists what ls inherited from the command's
    shell, plus the directory ls itself opened to list (/proc/PID/fd)."""
    listing = rc.keys / f"fds-{uuid.uuid4().hex[:8]}.txt"
    use_command(rc, f"ls -l /proc/self/fd > {listing}; cat {rc.key_file}")
    with rc.connect(db) as x:
        x.execute(KEY_OP)  # works: the key came through
    fds = {}
    for line in listing.read_text().splitlines():
        m = re.search(r" (\d+) -> (.*)$", line)
        if m:
            fds[int(m.group(1))] = m.group(2)
    own_dir = [fd for fd, target in fds.items() if re.fullmatch(r"/proc/\d+/fd", target)]
    assert len(own_dir) == 1, fds
    del fds[own_dir[0]]
    assert sorted(fds) == [0, 1, 2], f"inherited descriptors: {fds}"
    assert fds[0] == "/dev/null"
    assert fds[1] == str(listing)
    assert fds[2].startswith("pipe:"), fds[2]


# ---- standard error -----------------------------------------------------------------------


def notices_of(conn):
    got = []
    conn.add_notice_handler(lambda d: got.append(f"{d.message_primary} {d.message_detail}"))
    conn.execute("SET client_min_messages = debug5")
    return got


def script_command(c: Cluster, body: str, timeout=None):
    """Configures a script as the root key command. Markers and keys go in
    the script, not in the setting: PostgreSQL logs a changed setting's new
    value on reload."""
    use_command(c, str(c.write_script(f"s-{uuid.uuid4().hex[:8]}.sh", body)), timeout)


def test_stderr_goes_to_the_server_log_only_and_only_on_failure(rc, db):
    chatter = marker("chatter")
    script_command(rc, f"echo 'progress: {chatter}' >&2\ncat {rc.key_file}\n")
    with rc.connect(db) as x:
        notices = notices_of(x)
        x.execute(KEY_OP)
    assert chatter not in rc.log_text(), "a successful command's stderr was logged"
    assert not any(chatter in n for n in notices)

    last, earlier = marker("marker-xyz"), marker("earlier")
    script_command(rc, f"echo '{earlier}' >&2\necho 'KMS throttled: {last}' >&2\nexit 3\n")
    with rc.connect(db) as x:
        notices = notices_of(x)
        e = E(x, "58030", "SELECT manna_crypt.create_keyring('r2')")
    text = error_text(e)
    assert last not in text and earlier not in text, "stderr reached the client"
    assert not any(last in n for n in notices), "stderr reached the client as a notice"
    log = rc.log_text()
    assert log.count(last) == 1, "the last stderr line must be logged exactly once"
    assert f"KMS throttled: {last}" in log
    assert earlier not in log, "only the last line is logged"
    assert "exit status 3" in e.diag.message_primary
    assert "server log" in (e.diag.message_hint or "")


def test_logged_stderr_line_is_bounded_and_stripped(rc, db):
    last = marker("bounded")
    leaked = new_root_key()
    # printf, in a script, turns the escapes into ESC and BEL.
    line = f"{last} \\033[31mred\\007 token={leaked} " + "x" * 500
    script_command(rc, f"printf '{line}\\n\\n' >&2\nexit 1\n")
    with rc.connect(db) as x:
        E(x, "58030", KEY_OP)
    log = rc.log_text()
    assert log.count(last) == 1
    logged = next(ln for ln in log.splitlines() if last in ln)
    assert "\x1b" not in logged and "\x07" not in logged
    assert "[31mred" in logged
    # Something shaped like a key is masked; the line is cut.
    assert leaked not in log and leaked[:32] not in log
    assert len(logged[logged.index(last):].encode()) <= 200


def test_the_key_is_never_logged(rc, db):
    """Printed on stdout by a command that then fails, a key is neither in
    the error nor in the log; the command's stderr line is in the log."""
    other = new_root_key()
    note = marker("note")
    script_command(rc, f"echo {other}\necho '{note}' >&2\nexit 4\n")
    with rc.connect(db) as x:
        e = E(x, "58030", KEY_OP)
    assert other not in error_text(e)
    log = rc.log_text()
    assert note in log
    assert other not in log and rc.key not in log
