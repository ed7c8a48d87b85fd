"""The root key from a real KMS API, end to end: AWS KMS as served by moto
on loopback, and scripts/kms/aws_kms_root_key.py (README, "Root key from
AWS KMS") as manna_crypt.root_key_command.

A KMS key and an AES_256 data key are made with boto3; only the data key's
CiphertextBlob is stored, in the cluster's keys directory (owner postgres,
0600). The server runs the script, which calls KMS Decrypt on the blob and
prints the plaintext as hex. The script reaches moto through a TCP proxy of
this module's: stopping the proxy makes the KMS unreachable while moto,
which keeps its keys in memory only, keeps running (a restarted moto could
not decrypt the stored blob).

With the library preloaded, the root key is loaded at most once per server
and setting value, and lives in shared memory: a KMS outage after the load
does not matter, not even across a backend crash; a failed load is retried
with back-off (manna_crypt.root_key_retry_max), and fails with 58030 in
between. The script counts its runs into a file (--count-file), so the
tests see how often the KMS was asked.
"""

import base64
import hashlib
import hmac
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from mc_cluster import (
    MC_ROOT,
    Cluster,
    _chown,
    as_server,
    error_text,
    expect_error,
    free_port,
    key_forms,
)

SCRIPT = MC_ROOT / "scripts" / "kms" / "aws_kms_root_key.py"
# The test environment's interpreter runs the script in the server too
# (scripts/common.sh makes target/venv from an interpreter the server's OS
# user can run, and readable by it).
PYTHON = sys.executable
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
REGION = "us-east-1"
CONTEXT = ("purpose", "manna_crypt-root-key")
# The server's environment: moto accepts any credentials; no AWS
# configuration file of any OS user is read.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
    # No error may carry a Rust backtrace, whatever the environment says.
    "RUST_BACKTRACE": "full",
}
COMMAND = "manna_crypt.root_key_command"
PREVIOUS_COMMAND = "manna_crypt.previous_root_key_command"
RETRY_MAX = 4  # manna_crypt.root_key_retry_max in these clusters, seconds
SQLSTATE_ROOT_KEY_IO = "58030"


def fingerprint(key_hex: str) -> str:
    mac = hmac.new(bytes.fromhex(key_hex), b"manna_crypt/root-key-fingerprint/v1", hashlib.sha256)
    return mac.hexdigest()[:16]


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


# ---- the KMS: moto, and a proxy in front of it ----------------------------------------


def wait_for_port(port: int, timeout: float = 30.0, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.1)


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of moto. `stop()` closes the
    listening socket and every open connection, so the KMS is unreachable
    (connection refused) until `start()` listens on the same port again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener = None
        self.start()

    def start(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self):
        with self.lock:
            s, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        if s is not None:
            s.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


@pytest.fixture(scope="module")
def moto():
    port = free_port()
    proc = subprocess.Popen(
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def kms(moto):
    import boto3

    return boto3.client(
        "kms", region_name=REGION, endpoint_url=f"http://127.0.0.1:{moto}",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


@pytest.fixture
def proxy(moto):
    p = Proxy(moto)
    yield p
    p.stop()


@pytest.fixture(scope="module", autouse=True)
def _server_can_run_the_script():
    """The server's OS user must be able to run this interpreter with boto3
    and read the script (scripts/common.sh ensure_venv): say so plainly
    instead of failing later with a 58030."""
    r = as_server([PYTHON, "-c", f"import boto3; open({str(SCRIPT)!r}).close()"])
    assert r.returncode == 0, (
        f"the server's OS user cannot run {PYTHON} with boto3 or read {SCRIPT} "
        f"(directory permissions? recreate target/venv with scripts/common.sh ensure_venv): "
        f"{r.stderr.strip()[-300:]}"
    )


class DataKey:
    """A KMS key and an AES_256 data key under it: the blob to store and,
    for the assertions only, the plaintext."""

    def __init__(self, kms, description: str):
        self.key_id = kms.create_key(Description=description)["KeyMetadata"]["Arn"]
        r = kms.generate_data_key(
            KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=dict([CONTEXT])
        )
        self.blob = r["CiphertextBlob"]
        self.hex = r["Plaintext"].hex()
        self.fingerprint = fingerprint(self.hex)


# ---- a cluster whose root key comes from KMS ------------------------------------------


def install(c: Cluster, name: str, data: bytes, mode: int) -> Path:
    """Writes a file into the cluster's keys directory (owner postgres)."""
    path = c.keys / name
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    _chown(path)
    os.chmod(path, mode)
    return path


def kms_command(c: Cluster, proxy: Proxy, blob_name: str, key: DataKey) -> str:
    """The root key command for `key`'s blob (already in the keys
    directory), through the proxy, counting its runs."""
    return (
        f"{PYTHON} {c.keys / 'aws_kms_root_key.py'} {c.keys / blob_name}"
        f" --key-id {key.key_id} --context {CONTEXT[0]}={CONTEXT[1]}"
        f" --region {REGION} --endpoint-url http://127.0.0.1:{proxy.port}"
        f" --connect-timeout 1 --read-timeout 2 --attempts 1"
        f" --count-file {c.keys / 'kms_calls'}"
    )


def kms_cluster(name: str, proxy: Proxy, key: DataKey) -> Cluster:
    """A started cluster with manna_crypt preloaded and its root key from
    `key`'s blob through KMS; database `app` has the extension."""
    c = Cluster(
        name,
        settings={
            "shared_preload_libraries": "manna_crypt",
            "manna_crypt.root_key_retry_max": RETRY_MAX,
        },
        server_env=AWS_ENV,
        start=False,
    )
    try:
        install(c, "aws_kms_root_key.py", SCRIPT.read_bytes(), 0o700)
        install(c, "root.blob", key.blob, 0o600)
        install(c, "kms_calls", b"", 0o600)
        c.configure(**{COMMAND: kms_command(c, proxy, "root.blob", key)})
        c.start()
        c.create_db_with_extension("app")
    except BaseException:
        c.cleanup()
        raise
    return c


def kms_calls(c: Cluster) -> int:
    """How many times the root key command has asked KMS so far."""
    return len((c.keys / "kms_calls").read_text().splitlines())


def reset_calls(c: Cluster):
    (c.keys / "kms_calls").write_text("")


def root_info(c: Cluster, db="app") -> dict:
    with c.connect(db) as x:
        return one(x, "SELECT manna_crypt.info()->'root_key'")


def assert_no_secret(text: str, *keys: DataKey):
    for key in keys:
        for form in key_forms(bytes.fromhex(key.hex)):
            assert form not in text, "a root key appears in the output"
    for leak in ("panicked", "RUST_BACKTRACE", "stack backtrace", ".rs:"):
        assert leak not in text, f"{leak!r} in {text!r}"


def wait_until_accepting(c: Cluster, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with c.connect("app") as x:
                x.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def encrypt_rows(c: Cluster, n=5) -> dict:
    """Keyring `tokens` and a table of n values encrypted under it."""
    with c.connect("app") as x:
        x.execute("SELECT manna_crypt.create_keyring('tokens')")
        x.execute("CREATE TABLE items (id int PRIMARY KEY, tok manna_crypt.encrypted_text)")
        x.execute(
            "INSERT INTO items SELECT g, manna_crypt.encrypt_gcm('token-' || g, 'tokens', g::text)"
            " FROM generate_series(1, %s) g", (n,),
        )
    return {i: f"token-{i}" for i in range(1, n + 1)}


DECRYPT_ALL = "SELECT id, manna_crypt.decrypt_gcm(tok, id::text) FROM items ORDER BY id"


def decrypted(c: Cluster) -> dict:
    with c.connect("app") as x:
        return dict(x.execute(DECRYPT_ALL).fetchall())


# ---- the script on its own --------------------------------------------------------------


def test_script_prints_the_data_key_and_fails_in_one_line(kms, proxy, tmp_path):
    key = DataKey(kms, "script")
    blob = tmp_path / "root.blob"
    blob.write_bytes(key.blob)
    args = [PYTHON, str(SCRIPT), str(blob), "--key-id", key.key_id,
            "--context", "=".join(CONTEXT), "--region", REGION,
            "--endpoint-url", f"http://127.0.0.1:{proxy.port}",
            "--connect-timeout", "1", "--read-timeout", "2", "--attempts", "1"]
    env = {**os.environ, **AWS_ENV}
    run = lambda *extra: subprocess.run(  # noqa: E731
        [*args, *extra], env=env, capture_output=True, text=True, timeout=60
    )
    # (Assertions never show standard output: it holds the key.)
    ok = run()
    assert ok.returncode == 0, ok.stderr
    prints_the_key = ok.stdout == key.hex + "\n"
    assert prints_the_key and ok.stderr == ""

    # The blob in base64 (as `aws kms ... --output text` prints it) works too.
    blob.write_text(base64.b64encode(key.blob).decode() + "\n")
    prints_the_key = run().stdout == key.hex + "\n"
    assert prints_the_key

    failures = {
        "another encryption context": ["--context", "purpose=other"],
        "another KMS key": ["--key-id", DataKey(kms, "other").key_id],
        "a missing blob file": [],
    }
    for what, extra in failures.items():
        if what == "a missing blob file":
            blob.unlink()
        r = run(*extra)
        rc, silent = r.returncode, r.stdout == ""
        assert rc == 1 and silent, what
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("aws_kms_root_key: "), (what, r.stderr)
        assert_no_secret(r.stderr, key)

    blob.write_bytes(key.blob)
    proxy.stop()
    t0 = time.monotonic()
    r = run()
    assert time.monotonic() - t0 < 10
    rc, silent = r.returncode, r.stdout == ""
    assert rc == 1 and silent
    assert r.stderr.startswith("aws_kms_root_key: KMS Decrypt failed: EndpointConnectionError")
    assert len(r.stderr.splitlines()) == 1


# ---- the server ----------------------------------------------------------------------------


def test_keys_created_and_used_with_a_kms_root_key(kms, proxy):
    key = DataKey(kms, "use")
    with kms_cluster("kms_use", proxy, key) as c:
        values = encrypt_rows(c)
        assert decrypted(c) == values
        with c.connect("app") as x:
            ct = one(x, "SELECT manna_crypt.encrypt_gcm('another secret', 'tokens')::text")
            assert one(x, "SELECT manna_crypt.decrypt_gcm(%s)", (ct,)) == "another secret"
            x.execute("SELECT manna_crypt.rotate_keyring('tokens')")
            assert one(x, "SELECT manna_crypt.decrypt_gcm(%s)", (ct,)) == "another secret"
        root = root_info(c)
        assert root["source"] == "command"
        assert root["fingerprint"] == key.fingerprint  # the script printed the data key
        assert root["state"] == "loaded"
        # Loaded once for the server: new sessions (each of them a new
        # backend) and other databases do not ask KMS again.
        c.create_db_with_extension("other")
        for _ in range(5):
            assert decrypted(c) == values
        with c.connect("other") as x:
            x.execute("SELECT manna_crypt.create_keyring('o')")
        assert kms_calls(c) == 1
        # reload_root_key() asks KMS again, and returns the fingerprint.
        with c.connect("app") as x:
            assert one(x, "SELECT manna_crypt.reload_root_key()") == key.fingerprint
        assert kms_calls(c) == 2
        assert decrypted(c) == values
        assert kms_calls(c) == 2
        assert_no_secret(c.log_text(), key)


def test_loaded_key_serves_through_an_outage_and_a_backend_crash(kms, proxy):
    key = DataKey(kms, "outage")
    with kms_cluster("kms_outage", proxy, key) as c:
        values = encrypt_rows(c)
        assert kms_calls(c) == 1
        proxy.stop()
        # The KMS is really gone: the command itself fails now.
        r = as_server(["sh", "-c", c.settings[COMMAND]], env={**os.environ, **AWS_ENV})
        rc, err = r.returncode, r.stderr
        assert rc == 1 and "EndpointConnectionError" in err, err
        reset_calls(c)

        # New sessions, new keys, rotation: all without KMS.
        for _ in range(3):
            assert decrypted(c) == values
        with c.connect("app") as x:
            x.execute("SELECT manna_crypt.create_keyring('during_outage')")
            ct = one(x, "SELECT manna_crypt.encrypt_gcm('in the outage', 'during_outage')::text")
            x.execute("SELECT manna_crypt.rotate_keyring('tokens')")
        assert root_info(c)["state"] == "loaded"

        # A backend dies (SIGKILL): the postmaster ends every backend and
        # reinitialises shared memory. The key survives it.
        with c.connect("app") as x:
            pid = x.info.backend_pid
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while "reinitializing" not in c.log_text():
                assert time.monotonic() < deadline, c.log_tail()
                time.sleep(0.1)
        wait_until_accepting(c)
        assert f"(PID {pid}) was terminated by signal 9" in c.log_text()
        assert decrypted(c) == values
        with c.connect("app") as x:
            assert one(x, "SELECT manna_crypt.decrypt_gcm(%s)", (ct,)) == "in the outage"
            ct2 = one(x, "SELECT manna_crypt.encrypt_gcm('after the crash', 'tokens')::text")
            assert one(x, "SELECT manna_crypt.decrypt_gcm(%s)", (ct2,)) == "after the crash"
        root = root_info(c)
        assert root["state"] == "loaded" and root["fingerprint"] == key.fingerprint
        assert kms_calls(c) == 0, "the KMS was asked during the outage"
        assert_no_secret(c.log_text(), key)


def test_start_during_an_outage_backs_off_then_recovers(kms, proxy):
    key = DataKey(kms, "backoff")
    with kms_cluster("kms_backoff", proxy, key) as c:
        values = encrypt_rows(c)
        c.stop()
        proxy.stop()
        reset_calls(c)
        c.start()  # the server starts without its root key

        # The first key use asks KMS, which does not answer: 58030, saying
        # how many attempts failed since when and when the next one is.
        with c.connect("app") as x:
            e = expect_error(x, SQLSTATE_ROOT_KEY_IO, DECRYPT_ALL)
        t_fail = time.monotonic()
        text = error_text(e)
        assert re.search(r"\b1 (failed )?attempt", text), text
        assert re.search(r"next attempt", text, re.I), text
        assert_no_secret(text, key)
        assert kms_calls(c) == 1
        root = root_info(c)
        assert root["state"] == "failing", root

        # Many key uses in new sessions within the back-off: few KMS calls.
        queries = 0
        while time.monotonic() - t_fail < 2.5:
            with c.connect("app") as x:
                expect_error(x, SQLSTATE_ROOT_KEY_IO, DECRYPT_ALL)
            queries += 1
            time.sleep(0.05)
        calls = kms_calls(c)
        assert queries >= 10, queries
        # Attempts at 0 s, then after 1 s and 2 s more: at most 2 in 2.5 s.
        assert 1 <= calls <= 2, (calls, queries)

        # The KMS answers again: the next attempt after the back-off step
        # (at most root_key_retry_max) loads the key.
        proxy.start()
        deadline = time.monotonic() + RETRY_MAX + 10
        while True:
            with c.connect("app") as x:
                try:
                    rows = dict(x.execute(DECRYPT_ALL).fetchall())
                    break
                except psycopg.Error as err:
                    assert err.sqlstate == SQLSTATE_ROOT_KEY_IO, error_text(err)
            assert time.monotonic() < deadline, "no recovery within the back-off"
            time.sleep(0.2)
        assert rows == values
        root = root_info(c)
        assert root["state"] == "loaded" and root["fingerprint"] == key.fingerprint
        loaded_after = kms_calls(c)
        for _ in range(3):
            assert decrypted(c) == values
        assert kms_calls(c) == loaded_after
        # The script's own line (never the key) is in the server log.
        log = c.log_text()
        assert "aws_kms_root_key: KMS Decrypt failed: EndpointConnectionError" in log
        assert_no_secret(log, key)


def test_root_key_rotation_to_a_new_kms_data_key(kms, proxy):
    old = DataKey(kms, "rotation old")
    with kms_cluster("kms_rotate", proxy, old) as c:
        values = encrypt_rows(c)
        # A new data key under a new KMS key; its blob beside the old one.
        new = DataKey(kms, "rotation new")
        install(c, "root.new.blob", new.blob, 0o600)
        c.configure(**{
            COMMAND: kms_command(c, proxy, "root.new.blob", new),
            PREVIOUS_COMMAND: kms_command(c, proxy, "root.blob", old),
        })
        c.reload()
        with c.connect("app") as x:
            assert one(x, "SELECT manna_crypt.info()->'root_key'->>'rotation_pending'") == "true"
            assert one(x, "SELECT manna_crypt.rewrap_keys()") >= 1
            root = one(x, "SELECT manna_crypt.info()->'root_key'")
            assert root["fingerprint"] == new.fingerprint
            assert root["rotation_pending"] is False and root["matches_stored_keys"] is True
        assert decrypted(c) == values

        # Retire the previous root key (set to '', see README).
        c.configure(**{PREVIOUS_COMMAND: ""})
        c.reload()
        with c.connect("app") as x:
            assert one(x, f"SHOW {PREVIOUS_COMMAND}") == ""
        assert decrypted(c) == values

        # Nothing needs the old data key any more: its blob deleted and the
        # server restarted, everything still decrypts. (moto's Decrypt
        # ignores a disabled key, so disabling the old KMS key would prove
        # nothing here.)
        (c.keys / "root.blob").unlink()
        c.restart()
        assert decrypted(c) == values
        assert root_info(c)["fingerprint"] == new.fingerprint
        assert_no_secret(c.log_text(), old, new)
