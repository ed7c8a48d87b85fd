"""Throwaway PostgreSQL clusters for tests that need clusters of their own.

A `Cluster` lives in a fresh directory under target/clusters/ (owned by the
`postgres` OS user when the tests run as root, since PostgreSQL refuses to run
as root). Its layout:

    DIR/data          the data directory
    DIR/server.log    the server log
    DIR/keys/         root key files (owner postgres, mode 0600 by default)
    DIR/.s.PGSQL.N    the Unix socket (the socket directory is DIR)

Settings the tests change (root key file/command, logging, ...) live in
DIR/data/mc_test.conf, included from postgresql.conf and rewritten by
`configure()`; then `reload()` or `restart()`.

A cluster runs the PostgreSQL programs of MC_PG_BIN (the server under test,
see `pg_bin`) unless it is given `bindir`, the bin directory of another
installation of PostgreSQL (the upgrade test's private copy holding an older
release of the extension).

Use as a context manager or through `cleanup()`; a cluster is always stopped
and removed, also when the test fails:

    with Cluster("dump_src", root_key=key) as c:
        c.create_db_with_extension("app")
        with c.connect("app") as conn:
            ...
"""

from __future__ import annotations

import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

MC_ROOT = Path(os.environ.get("MC_ROOT", Path(__file__).resolve().parents[2]))
CLUSTERS = MC_ROOT / "target" / "clusters"
SERVER_USER = "postgres"
IS_ROOT = os.geteuid() == 0


def pg_bin(program: str, bindir: str | os.PathLike | None = None) -> str:
    """The path of a PostgreSQL program (initdb, pg_ctl, psql, pg_dump, ...)
    of the server under test: every test reaches PostgreSQL's programs through
    here. They come from MC_PG_BIN, which scripts/test.sh sets to
    `pg_config --bindir` of PG_CONFIG (scripts/common.sh). There is no
    default: a guessed directory could silently test another major version.
    `bindir` names another installation's bin directory explicitly."""
    bindir = bindir or os.environ.get("MC_PG_BIN")
    if not bindir:
        raise RuntimeError(
            "MC_PG_BIN is not set: it must name the bin directory of the PostgreSQL "
            "under test (scripts/test.sh exports it from PG_CONFIG; run the suite "
            "with scripts/test.sh, or set MC_PG_BIN=$(pg_config --bindir))"
        )
    path = Path(bindir) / program
    if not path.is_file():
        raise RuntimeError(f"{program} not found in {bindir}")
    return str(path)


def new_root_key() -> str:
    """A random root key as 64 hex characters."""
    return secrets.token_hex(32)


def free_port() -> int:
    """A free port on 127.0.0.1. With MC_PORT_RANGE=LOW-HIGH set, one from
    that range (for people sharing a machine, each with a range of their
    own); otherwise one the OS picks."""
    span = os.environ.get("MC_PORT_RANGE")
    candidates = [0]
    if span:
        low, high = (int(p) for p in span.split("-"))
        candidates = list(range(low, high + 1))
        random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in MC_PORT_RANGE={span}")


def _server_ids():
    pw = pwd.getpwnam(SERVER_USER) if IS_ROOT else pwd.getpwuid(os.geteuid())
    return pw.pw_uid, pw.pw_gid


def as_server(cmd, **kw):
    """Runs a command as the OS user that owns the clusters."""
    if IS_ROOT:
        cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


def _chown(path, uid=None, gid=None):
    if IS_ROOT:
        su, sg = _server_ids()
        os.chown(path, su if uid is None else uid, sg if gid is None else gid)


def _quote_conf(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _remove_later(path: Path):
    if not path.exists():
        return
    trash = CLUSTERS / f".trash-{path.name}-{secrets.token_hex(4)}"
    try:
        path.rename(trash)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return
    subprocess.Popen(["rm", "-rf", str(trash)], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _sweep_trash():
    """Removes what an interrupted earlier run left in the trash."""
    if CLUSTERS.exists():
        for p in CLUSTERS.glob(".trash-*"):
            subprocess.Popen(["rm", "-rf", str(p)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_sweep_trash()


class Cluster:
    """One throwaway cluster. See the module docstring."""

    def __init__(
        self,
        name: str = "c",
        *,
        root_key: str | None = None,
        root_key_command: str | None = None,
        settings: dict | None = None,
        server_env: dict | None = None,
        start: bool = True,
        bindir: str | os.PathLike | None = None,
        port: int | None = None,
        _init: bool = True,
    ):
        CLUSTERS.mkdir(parents=True, exist_ok=True)
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=CLUSTERS))
        _chown(self.dir)
        self.data = self.dir / "data"
        self.keys = self.dir / "keys"
        self.keys.mkdir(mode=0o700)
        _chown(self.keys)
        self.log_path = self.dir / "server.log"
        self.port = port or free_port()
        self.host = str(self.dir)
        self.settings: dict = {}
        self.root_key = root_key
        # Environment variables the server gets on top of ours (it inherits
        # the environment of the pg_ctl that starts it).
        self.server_env = dict(server_env or {})
        self._running = False
        if not _init:
            return
        try:
            self._initdb()
            base = {
                "port": self.port,
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(self.dir),
                "fsync": False,
                "max_connections": 40,
                "shared_buffers": "32MB",
                "wal_level": "replica",
                "max_wal_senders": 5,
                # Root keys and the encryption counters live in shared
                # memory, which needs preloading (a test may override it).
                "shared_preload_libraries": "manna_crypt",
            }
            if root_key is not None:
                base["manna_crypt.root_key_file"] = str(self.write_key_file("root.key", root_key))
            if root_key_command is not None:
                base["manna_crypt.root_key_command"] = root_key_command
            base.update(settings or {})
            self.configure(**base)
            if start:
                self.start()
        except BaseException:
            self.cleanup()
            raise

    def bin(self, program: str) -> str:
        """The path of one of this cluster's PostgreSQL programs."""
        return pg_bin(program, self.bindir)

    # ---- setup -------------------------------------------------------------

    def _initdb(self):
        r = as_server(
            [self.bin("initdb"), "-D", str(self.data), "-U", SERVER_USER,
             "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\ninclude_if_exists = 'mc_test.conf'\n")
        # initdb's defaults already allow replication connections; make it
        # explicit so make_standby() does not depend on them.
        with open(self.data / "pg_hba.conf", "a") as f:
            f.write("local replication all trust\n")
            f.write("host replication all 127.0.0.1/32 trust\n")

    def write_key_file(self, name: str, content: str, mode: int = 0o600,
                       owner_uid: int | None = None) -> Path:
        """Writes a root key file (by default owner postgres, mode 0600)."""
        path = self.keys / name
        if path.exists():
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content)
        _chown(path, uid=owner_uid)
        os.chmod(path, mode)
        return path

    def write_script(self, name: str, body: str) -> Path:
        """Writes an executable shell script (for root_key_command)."""
        path = self.keys / name
        path.write_text("#!/bin/sh\n" + body)
        _chown(path)
        os.chmod(path, 0o700)
        return path

    def configure(self, **settings):
        """Sets (value None: removes) settings in mc_test.conf. Keys may use
        '__' for '.' (manna_crypt__root_key_file) or be passed via **{...}."""
        for k, v in settings.items():
            k = k.replace("__", ".")
            if v is None:
                self.settings.pop(k, None)
            else:
                self.settings[k] = v
        text = "".join(f"{k} = {_quote_conf(v)}\n" for k, v in self.settings.items())
        path = self.data / "mc_test.conf"
        path.write_text(text)
        _chown(path)

    # ---- control -------------------------------------------------------------

    def pg_ctl(self, *args, check=True):
        env = {**os.environ, **self.server_env}
        r = as_server([self.bin("pg_ctl"), "-D", str(self.data), *args], env=env)
        if check and r.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed: {r.stderr[-1000:]}\n{self.log_tail()}"
            )
        return r

    def start(self):
        self.pg_ctl("-l", str(self.log_path), "-w", "-t", "60", "start")
        self._running = True

    def stop(self, mode="fast"):
        if (self.data / "postmaster.pid").exists():
            r = self.pg_ctl("-m", mode, "-w", "-t", "30", "stop", check=False)
            if r.returncode != 0 and (self.data / "postmaster.pid").exists():
                self.pg_ctl("-m", "immediate", "-w", "stop", check=False)
        self._running = False

    def restart(self):
        self.stop()
        self.start()

    def reload(self):
        """Reloads the configuration and waits until the postmaster re-read it.
        Backends pick it up at their next command; open new sessions."""
        with self.connect("postgres") as c:
            before = c.execute("SELECT pg_conf_load_time()").fetchone()[0]
            c.execute("SELECT pg_reload_conf()")
            deadline = time.time() + 10
            while time.time() < deadline:
                # A new session sees the postmaster's load time.
                with self.connect("postgres") as c2:
                    now = c2.execute("SELECT pg_conf_load_time()").fetchone()[0]
                if now > before:
                    return
                time.sleep(0.05)
        raise RuntimeError("configuration reload not observed within 10 s")

    # ---- clients -------------------------------------------------------------

    def dsn(self, db="postgres", user=SERVER_USER) -> str:
        return f"host={self.host} port={self.port} dbname={db} user={user}"

    def connect(self, db="postgres", user=SERVER_USER, autocommit=True, **kw):
        return psycopg.connect(self.dsn(db, user), autocommit=autocommit, **kw)

    def psql(self, db, *args, sql=None, check=True, user=SERVER_USER):
        """Runs psql (as the current OS user, connecting as `user`)."""
        cmd = [self.bin("psql"), "-X", "-q", "-h", self.host, "-p", str(self.port),
               "-U", user, "-d", db, "-v", "ON_ERROR_STOP=1", *args]
        if sql is not None:
            cmd += ["-c", sql]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr[-2000:]}")
        return r

    def pg_tool(self, tool, *args, check=True, **kw):
        """Runs a client program (pg_dump, pg_restore, ...) against this cluster."""
        cmd = [self.bin(tool), "-h", self.host, "-p", str(self.port), "-U", SERVER_USER, *args]
        r = subprocess.run(cmd, capture_output=True, **kw)
        if check and r.returncode != 0:
            err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
            raise RuntimeError(f"{tool} failed: {err[-2000:]}")
        return r

    def create_db_with_extension(self, name):
        with self.connect("postgres") as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        with self.connect(name) as c:
            c.execute("CREATE EXTENSION manna_crypt")
        return name

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def server_environ(self) -> dict:
        """The environment of the running postmaster, as the OS reports it."""
        pid = (self.data / "postmaster.pid").read_text().splitlines()[0].strip()
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        return dict(
            item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
        )

    def log_tail(self, n=30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ---- replication -----------------------------------------------------------

    def make_standby(self, name="standby", start=True) -> "Cluster":
        """A hot standby of this (running) cluster via pg_basebackup -R, in a
        cluster directory of its own on another port, with the same root key
        configuration (key files copied into its own directory)."""
        sb = Cluster(name, bindir=self.bindir, _init=False)
        try:
            r = as_server(
                [self.bin("pg_basebackup"), "-h", self.host, "-p", str(self.port),
                 "-U", SERVER_USER, "-D", str(sb.data), "-R", "-X", "stream",
                 "-c", "fast", "--no-sync"]
            )
            if r.returncode != 0:
                raise RuntimeError(f"pg_basebackup failed: {r.stderr[-2000:]}")
            settings = dict(self.settings)
            for k in ("manna_crypt.root_key_file", "manna_crypt.previous_root_key_file"):
                if k in settings:
                    src = Path(settings[k])
                    dst = sb.keys / src.name
                    shutil.copy2(src, dst)
                    _chown(dst)
                    os.chmod(dst, 0o600)
                    settings[k] = str(dst)
            settings.update(
                port=sb.port, unix_socket_directories=str(sb.dir), hot_standby=True
            )
            sb.root_key = self.root_key
            sb.configure(**settings)
            if start:
                sb.start()
        except BaseException:
            sb.cleanup()
            raise
        return sb

    def wait_for(self, db, sql, params=None, timeout=30, interval=0.1):
        """Polls until `sql` returns a true first column (e.g. replay)."""
        deadline = time.time() + timeout
        while True:
            with self.connect(db) as c:
                row = c.execute(sql, params).fetchone()
            if row and row[0]:
                return
            if time.time() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)

    # ---- teardown ----------------------------------------------------------------

    def cleanup(self):
        """Stops the server (synchronously) and removes the directory. The
        removal runs in the background: unlinking a cluster's ~1000 files
        takes seconds on slow disks, and nothing waits for it."""
        try:
            self.stop()
        finally:
            _remove_later(self.dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False


# ---- helpers shared by the key tests ------------------------------------------

WRAP_AAD_LABEL = b"manna_crypt/data-key/v1"


def expect_error(conn, sqlstate, sql, params=None):
    """Runs `sql`, asserts it fails with `sqlstate`; returns the exception.
    The connection must be in autocommit mode (or the caller rolls back)."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        assert e.sqlstate == sqlstate, (
            f"expected SQLSTATE {sqlstate}, got {e.sqlstate}: "
            f"{e.diag.message_primary}"
        )
        return e
    raise AssertionError(f"expected SQLSTATE {sqlstate}, but the statement succeeded")


def error_text(e: psycopg.Error) -> str:
    """Everything a client sees of an error: message, detail, hint, context."""
    d = e.diag
    return "\n".join(
        x or "" for x in (d.message_primary, d.message_detail, d.message_hint, d.context)
    )


class Wrapped:
    """A stored wrapped key with what its wrap is bound to (see wrapped_keys)."""

    def __init__(self, keyring: str, kind: str, data: bytes):
        self.keyring, self.kind, self.data = keyring, kind, bytes(data)

    def __bytes__(self):
        return self.data


# kind: 'gcm', 'fernet' or 'index' (a blind-index key; 0.1.0 has none).
WRAPPED_KEYS = (
    "SELECT k.key_id, r.name, CASE WHEN to_jsonb(k)->>'purpose' = 'index' THEN 'index' "
    "ELSE r.kind END, k.wrapped FROM manna_crypt.data_keys k "
    "JOIN manna_crypt.keyrings r USING (keyring_id) WHERE k.wrapped IS NOT NULL"
)


def wrapped_keys(conn, key_id=None) -> dict:
    """{key id: Wrapped} of every stored wrapped key (or just one)."""
    sql = WRAPPED_KEYS + ("" if key_id is None else " AND k.key_id = %s")
    rows = conn.execute(sql, () if key_id is None else (key_id,)).fetchall()
    return {kid: Wrapped(name, kind, w) for kid, name, kind, w in rows}


def unwrap_data_key(root_key_hex: str, key_id: int, wrapped, keyring=None, kind=None) -> bytes:
    """Unwraps a stored data key the way core/src/keywrap.rs wraps it.

    Version 2: 0x02 | nonce(12) | AES-256-GCM(root, key) | tag(16), with
    AAD = "manna_crypt/data-key/v2" | key_id (u32 BE) | kind ('g', 'f', 'i') |
    len(keyring) (1 byte) | keyring. Version 1 (0.1.0): 0x01 | ..., with
    AAD = envelope header (0x01, key id 0) | "manna_crypt/data-key/v1" | key_id.
    `wrapped` is bytes (then keyring and kind are needed for version 2) or a
    Wrapped from wrapped_keys()."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if isinstance(wrapped, Wrapped):
        keyring, kind, wrapped = wrapped.keyring, wrapped.kind, wrapped.data
    assert len(wrapped) == 61 and wrapped[0] in (1, 2)
    if wrapped[0] == 1:
        aad = bytes([1, 0, 0, 0, 0]) + WRAP_AAD_LABEL + key_id.to_bytes(4, "big")
    else:
        name = keyring.encode()
        aad = (b"manna_crypt/data-key/v2" + key_id.to_bytes(4, "big")
               + {"fernet": b"f", "index": b"i"}.get(kind, b"g") + bytes([len(name)]) + name)
    return AESGCM(bytes.fromhex(root_key_hex)).decrypt(wrapped[1:13], wrapped[13:], aad)


def envelope_of(ct_text: str) -> bytes:
    import base64

    assert ct_text.startswith("mc1:")
    return base64.b64decode(ct_text[4:], validate=True)


def text_of(envelope: bytes) -> str:
    import base64

    return "mc1:" + base64.b64encode(envelope).decode()


def seal(key: bytes, key_id: int, plaintext: bytes, aad: bytes = b"") -> bytes:
    """A version-1 envelope made in Python (docs/DESIGN.md section 1)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = bytes([1]) + key_id.to_bytes(4, "big")
    nonce = secrets.token_bytes(12)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header + aad)


def open_envelope(key: bytes, envelope: bytes, aad: bytes = b"") -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).decrypt(envelope[5:17], envelope[17:], envelope[:5] + aad)


def key_forms(key: bytes) -> list[str]:
    """Textual forms a leaked key could take in a log or a message."""
    import base64

    h = key.hex()
    return [
        h, h.upper(), "\\x" + h,
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode(),
        base64.b64encode(key).decode().rstrip("="),
    ]
