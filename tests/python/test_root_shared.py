"""The root key loaded once per server (docs/DESIGN.md section 7.1): kept in
shared memory per setting value, loaded by the first backend that needs it
while the others wait, read by new connections and parallel workers without
running the command again; a failing command is retried with a back-off and
the error says when; a loaded key keeps serving while the source fails,
also through a backend crash; cancel and termination of the loader or of a
waiter; per-database settings; reload_root_key(); info() states; and the
refusal without shared_preload_libraries.

The root key command is a script that appends a line to a counter file on
every run, so "how many times did it run" is counted, not guessed.
"""

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from mc_cluster import Cluster, error_text, expect_error, new_root_key

# Shared memory, condition variables and crash restarts differ between
# PostgreSQL versions: run on every tested one.
pytestmark = pytest.mark.all_versions

E = expect_error
COMMAND = "manna_crypt.root_key_command"
ROUNDTRIP = "SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('v', 'k'))"


class Kms:
    """A root key command with a run counter, an artificial latency and a
    switch that makes it fail like a throttled or unreachable KMS."""

    def __init__(self, c: Cluster, name: str, key: str):
        self.c = c
        self.key_file = c.write_key_file(f"{name}.key", key + "\n")
        self.count = c.keys / f"{name}.count"
        self.fail = c.keys / f"{name}.fail"
        self.delay = c.keys / f"{name}.delay"
        self.count.write_text("")
        os.chown(self.count, *_pg_ids())
        self.script = c.write_script(
            f"{name}.sh",
            f"echo run >> '{self.count}'\n"
            f"[ -f '{self.delay}' ] && sleep \"$(cat '{self.delay}')\"\n"
            f"if [ -f '{self.fail}' ]; then echo 'ThrottlingException: Rate exceeded' >&2; exit 3; fi\n"
            f"cat '{self.key_file}'\n",
        )

    @property
    def command(self) -> str:
        return str(self.script)

    def runs(self) -> int:
        return len(self.count.read_text().splitlines())

    def set_failing(self, failing: bool):
        if failing:
            self.fail.write_text("1")
        elif self.fail.exists():
            self.fail.unlink()

    def set_delay(self, seconds: float | None):
        if seconds is None:
            if self.delay.exists():
                self.delay.unlink()
        else:
            self.delay.write_text(str(seconds))


def _pg_ids():
    import pwd

    p = pwd.getpwnam("postgres")
    return p.pw_uid, p.pw_gid


@pytest.fixture
def shared():
    """A cluster of its own (the tests restart and reconfigure it), with a
    command-sourced root key and a database holding one keyring."""
    with Cluster("rootshared", settings={"manna_crypt.root_key_retry_max": 4}) as c:
        c.kms = Kms(c, "kms", new_root_key())
        c.configure(**{COMMAND: c.kms.command})
        c.reload()
        c.create_db_with_extension("app")
        with c.connect("app") as x:
            x.execute("SELECT manna_crypt.create_keyring('k')")
        yield c


def test_new_connections_and_parallel_workers_share_one_load(shared):
    c, kms = shared, shared.kms
    c.restart()  # nothing loaded yet
    kms.set_delay(0.3)
    assert kms.runs() == 1  # the load that created the keyring
    results, errors = [], []

    def one():
        try:
            with c.connect("app") as x:
                results.append(x.execute(ROUNDTRIP).fetchone()[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == ["v"] * 30
    # 30 connections at once, one command run (0.1.0: one per connection).
    assert kms.runs() == 2
    with c.connect("app") as x:
        major = int(x.execute("SHOW server_version_num").fetchone()[0]) // 10000
        x.execute("SET force_parallel_mode = on" if major < 16 else "SET debug_parallel_query = on")
        x.execute("SET parallel_setup_cost = 0")
        for _ in range(5):
            plan = x.execute("EXPLAIN (ANALYZE, COSTS OFF) " + ROUNDTRIP).fetchall()
            assert any("Workers Launched: 1" in r[0] for r in plan), plan
    # Parallel workers read the key from shared memory: no further run.
    assert kms.runs() == 2


def test_failing_command_backs_off_and_says_when(shared):
    c, kms = shared, shared.kms
    c.restart()
    kms.set_failing(True)
    before = kms.runs()
    with c.connect("app") as x:
        errors = [E(x, "58030", ROUNDTRIP) for _ in range(20)]
    # Twenty queries within the first back-off step: one attempt.
    assert kms.runs() - before == 1
    text = error_text(errors[-1])
    assert "1 attempt to load the root key failed since" in text
    assert "next attempt" in text
    assert "exit status 3" in text
    # The command's standard error reaches the server log, never the client.
    assert "ThrottlingException" not in text
    assert "ThrottlingException: Rate exceeded" in c.log_text()
    time.sleep(1.2)
    with c.connect("app") as x:
        e = E(x, "58030", ROUNDTRIP)
        assert "2 attempts" in error_text(e)
        info = x.execute("SELECT manna_crypt.info()->'root_key'").fetchone()[0]
    assert kms.runs() - before == 2
    assert info["state"] == "failing" and info["configured"] is True
    assert info["attempts"] == 2 and "exit status 3" in info["last_error"]
    assert info["next_attempt"] and info["failing_since"]
    # Back-off doubles: 1 s, 2 s, ... up to root_key_retry_max (4 s here).
    kms.set_failing(False)
    with c.connect("app") as x:
        E(x, "58030", ROUNDTRIP)  # still inside the 2 s step
        assert kms.runs() - before == 2
        deadline = time.monotonic() + 10
        while True:
            try:
                assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
                break
            except psycopg.errors.IoError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert x.execute("SELECT manna_crypt.info()->'root_key'->>'state'").fetchone()[0] == "loaded"
    assert kms.runs() - before == 3


def test_loaded_key_serves_through_outage_and_backend_crash(shared):
    c, kms = shared, shared.kms
    with c.connect("app") as x:
        assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
    kms.set_failing(True)
    runs = kms.runs()
    # A backend crash: the postmaster re-creates the main shared memory.
    victim = c.connect("app")
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with c.connect("app") as x:
                assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
                info = x.execute("SELECT manna_crypt.info()->'root_key'").fetchone()[0]
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    assert "terminated by signal 9" in c.log_text()
    assert info["state"] == "loaded"
    assert kms.runs() == runs  # served from the page that survived
    # reload_root_key() while the source fails: an error, and the loaded
    # key keeps serving.
    with c.connect("app") as x:
        E(x, "58030", "SELECT manna_crypt.reload_root_key()")
        assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
        # No back-off starts while a key serves: a second reload runs again,
        # and info() still says loaded, with its time.
        E(x, "58030", "SELECT manna_crypt.reload_root_key()")
        info = x.execute("SELECT manna_crypt.info()->'root_key'").fetchone()[0]
    assert info["state"] == "loaded" and info["loaded_at"]
    assert kms.runs() == runs + 2


def test_reload_root_key_runs_the_command_once_and_is_admin_only(shared):
    c, kms = shared, shared.kms
    with c.connect("app") as x:
        x.execute(ROUNDTRIP)
        runs = kms.runs()
        fp = x.execute("SELECT manna_crypt.reload_root_key()").fetchone()[0]
        assert fp == x.execute("SELECT manna_crypt.info()->'root_key'->>'fingerprint'").fetchone()[0]
        assert kms.runs() == runs + 1
        x.execute("CREATE ROLE app_user LOGIN IN ROLE manna_crypt_user")
        x.execute("SELECT manna_crypt.grant_keyring_access('k', 'app_user', 'all')")
    with c.connect("app", user="app_user") as u:
        assert u.execute(ROUNDTRIP).fetchone()[0] == "v"
        E(u, "42501", "SELECT manna_crypt.reload_root_key()")
        E(u, "42501", "SELECT manna_crypt.info()")
        health = u.execute("SELECT manna_crypt.health()").fetchone()[0]
        assert health == {"version": health["version"], "ok": True, "root_key_state": "loaded"}
    # A failing source with nothing loaded: the health check says so.
    c.restart()
    kms.set_failing(True)
    with c.connect("app", user="app_user") as u:
        health = u.execute("SELECT manna_crypt.health()").fetchone()[0]
    assert health["ok"] is False and health["root_key_state"] == "failing"
    assert "exit status 3" in health["error"]


def _backend_running(c: Cluster, query_like: str) -> int | None:
    with c.connect("app") as x:
        r = x.execute(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (query_like,),
        ).fetchone()
    return r and r[0]


def _start_loader(c: Cluster, sql: str):
    """Runs `sql` in a thread (the loader); returns (thread, outcome list)."""
    out = []

    def run():
        try:
            with c.connect("app") as x:
                out.append(x.execute(sql).fetchone()[0])
        except psycopg.Error as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _wait_runs(kms: Kms, n: int, within: float = 10):
    deadline = time.monotonic() + within
    while kms.runs() < n:
        assert time.monotonic() < deadline, f"command ran {kms.runs()} times, expected {n}"
        time.sleep(0.05)


def test_waiter_can_be_cancelled_while_another_backend_loads(shared):
    c, kms = shared, shared.kms
    c.restart()
    runs = kms.runs()
    kms.set_delay(4)
    loader, out = _start_loader(c, ROUNDTRIP + " /* loader */")
    _wait_runs(kms, runs + 1)
    with c.connect("app") as x:
        x.execute("SET statement_timeout = '500ms'")
        t0 = time.monotonic()
        E(x, "57014", ROUNDTRIP)
        assert time.monotonic() - t0 < 2.5
    loader.join()
    assert out == ["v"]
    assert kms.runs() == runs + 1  # the waiter never ran it


def test_loader_cancelled_or_terminated_hands_over_to_a_waiter(shared):
    c, kms = shared, shared.kms
    c.restart()
    runs = kms.runs()
    kms.set_delay(30)
    tag = uuid.uuid4().hex[:8]
    loader, out = _start_loader(c, ROUNDTRIP + f" /* loader {tag} */")
    _wait_runs(kms, runs + 1)
    waiter, wout = _start_loader(c, ROUNDTRIP + f" /* waiter {tag} */")
    time.sleep(0.5)
    kms.set_delay(None)
    pid = _backend_running(c, f"%loader {tag}%")
    with c.connect("app") as x:
        x.execute("SELECT pg_terminate_backend(%s)", (pid,))
    loader.join()
    waiter.join(timeout=15)
    assert isinstance(out[0], psycopg.Error) and out[0].sqlstate == "57P01"
    # The waiter took over at once (the loader cleared its mark on exit).
    assert wout == ["v"]
    assert kms.runs() == runs + 2
    # A loader killed outright: the server restarts its backends and the
    # next query loads again.
    c.restart()
    kms.set_delay(30)
    runs = kms.runs()
    loader, out = _start_loader(c, ROUNDTRIP + f" /* killed {tag} */")
    _wait_runs(kms, runs + 1)
    os.kill(_backend_running(c, f"%killed {tag}%"), signal.SIGKILL)
    loader.join()
    kms.set_delay(None)
    deadline = time.monotonic() + 30
    while True:
        try:
            with c.connect("app") as x:
                assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_per_database_settings_get_their_own_slots(shared):
    c = shared
    other = Kms(c, "other", new_root_key())
    c.create_db_with_extension("second")
    with c.connect() as x:
        x.execute(f"ALTER DATABASE second SET {COMMAND} = '{other.command}'")
    with c.connect("second") as x:
        x.execute("SELECT manna_crypt.create_keyring('k')")
        assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
        fp2 = x.execute("SELECT manna_crypt.info()->'root_key'->>'fingerprint'").fetchone()[0]
    with c.connect("app") as x:
        assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
        fp1 = x.execute("SELECT manna_crypt.info()->'root_key'->>'fingerprint'").fetchone()[0]
    assert fp1 != fp2
    runs = (c.kms.runs(), other.runs())
    for db in ("app", "second", "app", "second"):
        with c.connect(db) as x:
            assert x.execute(ROUNDTRIP).fetchone()[0] == "v"
    assert (c.kms.runs(), other.runs()) == runs


def test_replaced_key_file_is_read_again():
    with Cluster("rootfile", root_key=new_root_key()) as c:
        c.create_db_with_extension("app")
        with c.connect("app") as x:
            fp1 = x.execute("SELECT manna_crypt.info()->'root_key'->>'fingerprint'").fetchone()[0]
        c.write_key_file("root.key", new_root_key())
        with c.connect("app") as x:
            fp2 = x.execute("SELECT manna_crypt.info()->'root_key'->>'fingerprint'").fetchone()[0]
        assert fp1 != fp2


def test_not_preloaded_is_refused_with_a_hint():
    key = new_root_key()
    with Cluster("nopreload", root_key=key, settings={"shared_preload_libraries": ""}) as c:
        c.create_db_with_extension("app")
        with c.connect("app") as x:
            e = E(x, "55000", "SELECT manna_crypt.create_keyring('k')")
            assert "shared_preload_libraries" in (e.diag.message_hint or "")
            info = x.execute("SELECT manna_crypt.info()->'root_key'").fetchone()[0]
            assert info["state"] == "not preloaded"
            # Raw-key functions need no root key.
            k = bytes(range(32))
            ct = x.execute("SELECT manna_crypt.encrypt_gcm('v', %s::bytea)", (k,)).fetchone()[0]
            assert x.execute("SELECT manna_crypt.decrypt_gcm(%s, %s::bytea)", (ct, k)).fetchone()[0] == "v"


def test_info_not_configured():
    with Cluster("noroot") as c:
        c.create_db_with_extension("app")
        with c.connect("app") as x:
            info = x.execute("SELECT manna_crypt.info()->'root_key'").fetchone()[0]
    assert info["state"] == "not configured" and info["configured"] is False
