"""Interoperability with Python `cryptography` (docs/DESIGN.md section 1).

The version-1 envelope is

    0x01 | key id (u32 big-endian) | nonce (12) | ciphertext | tag (16)

with GCM associated data = envelope[0:5] + the caller's AAD, and the text
form "mc1:" + standard padded base64. A Python program holding the raw key
must read what the extension writes and write what the extension reads, in
both the text and the bytea form. Also: every encryption draws a fresh nonce,
within one query, across backends and across parallel workers.

Keys are random per test and never appear in an assertion message.
"""

import base64
import json
import os
import random
import struct
import uuid

import psycopg
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import connect, create_database

PREFIX = "mc1:"
VERSION = 1
HEADER_LEN, NONCE_LEN, TAG_LEN = 5, 12, 16
OVERHEAD = HEADER_LEN + NONCE_LEN + TAG_LEN


# ---- the format, written out independently of the extension ----------------


def header(key_id=0):
    return bytes([VERSION]) + struct.pack(">I", key_id)


def py_seal(key, plaintext: bytes, aad: bytes = b"", key_id=0, nonce=None) -> bytes:
    hdr = header(key_id)
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    return hdr + nonce + AESGCM(key).encrypt(nonce, plaintext, hdr + aad)


def py_open(key, envelope: bytes, aad: bytes = b"") -> bytes:
    assert len(envelope) >= OVERHEAD, "envelope shorter than its fixed overhead"
    assert envelope[0] == VERSION, "wrong version byte"
    return AESGCM(key).decrypt(
        envelope[HEADER_LEN : HEADER_LEN + NONCE_LEN],
        envelope[HEADER_LEN + NONCE_LEN :],
        envelope[:HEADER_LEN] + aad,
    )


def to_text(envelope: bytes) -> str:
    return PREFIX + base64.b64encode(envelope).decode("ascii")


def from_text(text: str) -> bytes:
    assert text.startswith(PREFIX), "text ciphertext lacks the mc1: prefix"
    b64 = text[len(PREFIX) :]
    env = base64.b64decode(b64, validate=True)
    # Canonical: standard alphabet, padded, no line breaks.
    assert base64.b64encode(env).decode("ascii") == b64, "base64 is not canonical"
    return env


# ---- random inputs -----------------------------------------------------------

RNG = random.Random(0x6D63)  # reproducible choice of shapes; keys/nonces use os.urandom

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz0123456789 -_:/",
    "äöüßéèçñøåÆŒ",
    "日本語中文한국어",
    "Ωλπσж́йщ",
    "🔐🎉😀👍🏽🧪",  # astral plane (4-byte UTF-8)
    "𝄞𝔸𝕏𐍈",  # astral plane, non-emoji
    "\t\n\r \u00a0\u200b",
]


def random_text(max_len):
    n = RNG.randrange(0, max_len + 1)
    return "".join(RNG.choice(RNG.choice(ALPHABETS)) for _ in range(n))


def random_aad():
    """None, empty, or random Unicode text (SQL's aad is text)."""
    r = RNG.random()
    if r < 0.15:
        return None
    if r < 0.25:
        return ""
    return random_text(64)


def aad_bytes(aad):
    return b"" if aad is None else aad.encode("utf-8")


def cases(n):
    """(key, plaintext, aad) triples, each with its own random key."""
    fixed = ["", "x", "🔐", "𝄞" * 100, "héllo wörld — 日本語 🔐𝄞", "\u0001\u007f"]
    out = []
    for i in range(n):
        pt = fixed[i] if i < len(fixed) else random_text(300)
        out.append((os.urandom(32), pt, random_aad()))
    return out


# ---- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def db():
    name = "t_interop_" + uuid.uuid4().hex[:8]
    create_database(name)
    yield name
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def cur(db):
    with connect(db) as c:
        with c.cursor() as cur:
            yield cur


# ---- extension -> Python -----------------------------------------------------------


def test_extension_text_decrypts_in_python(cur):
    data = cases(300)
    cur.execute(
        "SELECT manna_crypt.encrypt_gcm(p, k, a) FROM unnest(%s::text[], %s::bytea[], %s::text[]) "
        "WITH ORDINALITY AS u(p, k, a, i) ORDER BY i",
        ([d[1] for d in data], [d[0] for d in data], [d[2] for d in data]),
    )
    rows = cur.fetchall()
    assert len(rows) == len(data)
    for i, ((key, pt, aad), (text,)) in enumerate(zip(data, rows)):
        env = from_text(text)
        assert env[:HEADER_LEN] == header(0), f"case {i}: header is not version 1, key id 0"
        assert len(env) == OVERHEAD + len(pt.encode("utf-8")), f"case {i}: wrong envelope length"
        assert py_open(key, env, aad_bytes(aad)) == pt.encode("utf-8"), f"case {i}: plaintext differs"


def test_extension_bytea_decrypts_in_python(cur):
    data = [(os.urandom(32), os.urandom(RNG.randrange(0, 200)), random_aad()) for _ in range(200)]
    data[0] = (data[0][0], b"", data[0][2])
    cur.execute(
        "SELECT manna_crypt.encrypt_gcm(p, k, a) FROM unnest(%s::bytea[], %s::bytea[], %s::text[]) "
        "WITH ORDINALITY AS u(p, k, a, i) ORDER BY i",
        ([d[1] for d in data], [d[0] for d in data], [d[2] for d in data]),
    )
    rows = cur.fetchall()
    assert len(rows) == len(data)
    for i, ((key, pt, aad), (env,)) in enumerate(zip(data, rows)):
        assert isinstance(env, bytes)
        assert env[:HEADER_LEN] == header(0), f"case {i}: header is not version 1, key id 0"
        assert len(env) == OVERHEAD + len(pt), f"case {i}: wrong envelope length"
        assert py_open(key, env, aad_bytes(aad)) == pt, f"case {i}: plaintext differs"


def test_extension_header_is_authenticated(cur):
    """The extension's AAD really is header + caller AAD: Python refuses the
    value under the caller AAD alone, or with the key id changed."""
    key = os.urandom(32)
    cur.execute("SELECT manna_crypt.encrypt_gcm(%s::bytea, %s, %s)", (b"payload", key, "ctx"))
    (env,) = cur.fetchone()
    assert py_open(key, env, b"ctx") == b"payload"
    nonce, sealed = env[HEADER_LEN : HEADER_LEN + NONCE_LEN], env[HEADER_LEN + NONCE_LEN :]
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(nonce, sealed, b"ctx")
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(nonce, sealed, header(1) + b"ctx")


# ---- Python -> extension -----------------------------------------------------------


def test_python_text_decrypts_in_extension(cur):
    data = cases(300)
    texts = [to_text(py_seal(k, pt.encode("utf-8"), aad_bytes(a))) for k, pt, a in data]
    cur.execute(
        "SELECT manna_crypt.decrypt_gcm(c, k, a) FROM unnest(%s::text[], %s::bytea[], %s::text[]) "
        "WITH ORDINALITY AS u(c, k, a, i) ORDER BY i",
        (texts, [d[0] for d in data], [d[2] for d in data]),
    )
    got = [r[0] for r in cur.fetchall()]
    assert len(got) == len(data)
    for i, ((_, pt, _), g) in enumerate(zip(data, got)):
        assert g == pt, f"case {i}: plaintext differs"


def test_python_text_is_accepted_by_domain(cur):
    text = to_text(py_seal(os.urandom(32), b"x"))
    cur.execute("SELECT %s::manna_crypt.encrypted_text IS NOT NULL, manna_crypt.is_encrypted(%s)", (text, text))
    assert cur.fetchone() == (True, True)


def test_python_bytea_decrypts_in_extension(cur):
    data = [(os.urandom(32), os.urandom(RNG.randrange(0, 200)), random_aad()) for _ in range(200)]
    envs = [py_seal(k, pt, aad_bytes(a)) for k, pt, a in data]
    cur.execute(
        "SELECT manna_crypt.decrypt_gcm(c, k, a) FROM unnest(%s::bytea[], %s::bytea[], %s::text[]) "
        "WITH ORDINALITY AS u(c, k, a, i) ORDER BY i",
        (envs, [d[0] for d in data], [d[2] for d in data]),
    )
    got = [r[0] for r in cur.fetchall()]
    for i, ((_, pt, _), g) in enumerate(zip(data, got)):
        assert g == pt, f"case {i}: plaintext differs"


def test_null_and_empty_aad_are_the_same_both_ways(cur):
    key = os.urandom(32)
    env = py_seal(key, "same".encode(), b"")
    for aad in (None, ""):
        cur.execute("SELECT manna_crypt.decrypt_gcm(%s::text, %s, %s)", (to_text(env), key, aad))
        assert cur.fetchone()[0] == "same"
    cur.execute("SELECT manna_crypt.decrypt_gcm(%s::text, %s)", (to_text(env), key))
    assert cur.fetchone()[0] == "same"
    for aad in (None, ""):
        cur.execute("SELECT manna_crypt.encrypt_gcm('same', %s, %s)", (key, aad))
        assert py_open(key, from_text(cur.fetchone()[0]), b"") == b"same"


# ---- large values ----------------------------------------------------------------


def large_text(mib):
    unit = "Größe 日本 🔐𝄞 abcdefghijklmnopqrstuvwxyz 0123456789\n"
    n = mib * 1024 * 1024 // len(unit.encode("utf-8")) + 1
    return unit * n


def test_large_text_both_ways(cur):
    key = os.urandom(32)
    pt = large_text(4)
    assert len(pt.encode("utf-8")) > 4 * 1024 * 1024
    cur.execute("SELECT manna_crypt.encrypt_gcm(%s, %s, 'big')", (pt, key))
    env = from_text(cur.fetchone()[0])
    assert py_open(key, env, b"big") == pt.encode("utf-8")

    cur.execute("SELECT manna_crypt.decrypt_gcm(%s::text, %s, 'big') = %s", (to_text(py_seal(key, pt.encode(), b"big")), key, pt))
    assert cur.fetchone()[0] is True


def test_large_bytea_both_ways(cur):
    key = os.urandom(32)
    pt = os.urandom(6 * 1024 * 1024)
    cur.execute("SELECT manna_crypt.encrypt_gcm(%s::bytea, %s)", (pt, key))
    env = cur.fetchone()[0]
    assert py_open(key, env) == pt
    cur.execute("SELECT manna_crypt.decrypt_gcm(%s::bytea, %s) = %s::bytea", (py_seal(key, pt), key, pt))
    assert cur.fetchone()[0] is True


# ---- rejection of Python-made values -------------------------------------------------


def expect_sqlstate(cur, sqlstate, query, params):
    with pytest.raises(psycopg.Error) as exc:
        cur.execute(query, params)
    assert exc.value.sqlstate == sqlstate, f"expected {sqlstate}, got {exc.value.sqlstate}: {exc.value.diag.message_primary}"
    return exc.value


def test_tampered_python_envelope_is_rejected(cur):
    key = os.urandom(32)
    pt = "tamper-evident ✓".encode()
    env = py_seal(key, pt, b"row:7")
    # Every byte after the version byte, one flipped bit each, both forms.
    for pos in range(1, len(env)):
        bad = bytearray(env)
        bad[pos] ^= 1 << (pos % 8)
        bad = bytes(bad)
        err = expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::bytea, %s, 'row:7')", (bad, key))
        assert "decryption failed" in err.diag.message_primary
        expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text, %s, 'row:7')", (to_text(bad), key))
    # Truncated and extended.
    expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::bytea, %s, 'row:7')", (env[:-1], key))
    expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::bytea, %s, 'row:7')", (env + b"\0", key))
    # The version byte is a format error, not an authentication failure.
    expect_sqlstate(cur, "22P02", "SELECT manna_crypt.decrypt_gcm(%s::bytea, %s, 'row:7')", (b"\x02" + env[1:], key))
    # And the untouched envelope does decrypt.
    cur.execute("SELECT manna_crypt.decrypt_gcm(%s::bytea, %s, 'row:7')", (env, key))
    assert cur.fetchone()[0] == pt


def test_python_envelope_with_wrong_aad_or_key_is_rejected(cur):
    key = os.urandom(32)
    text = to_text(py_seal(key, b"secret", "ctx 🔐".encode()))
    expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text, %s, %s)", (text, key, "ctx"))
    expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text, %s, %s)", (text, key, "ctx 🔓"))
    expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text, %s)", (text, key))
    expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::text, %s, %s)", (text, os.urandom(32), "ctx 🔐"))
    # A GCM value whose AAD lacks the header (plain AESGCM with the caller's
    # AAD only) is not a version-1 envelope and is refused.
    nonce = os.urandom(NONCE_LEN)
    bare = header(0) + nonce + AESGCM(key).encrypt(nonce, b"secret", b"ctx")
    expect_sqlstate(cur, "39000", "SELECT manna_crypt.decrypt_gcm(%s::bytea, %s, 'ctx')", (bare, key))
    cur.execute("SELECT manna_crypt.decrypt_gcm(%s::text, %s, %s)", (text, key, "ctx 🔐"))
    assert cur.fetchone()[0] == "secret"


def test_python_malformed_text_is_rejected(cur):
    key = os.urandom(32)
    env = py_seal(key, b"x")  # 34 bytes: padded base64
    b64 = base64.b64encode(env).decode()
    assert b64.endswith("==")
    for bad in (
        "mc2:" + b64,
        b64,
        PREFIX + b64.rstrip("="),
        PREFIX + base64.urlsafe_b64encode(b"\x01" + b"\xfb" * 40).decode(),
        PREFIX + base64.encodebytes(env * 3).decode(),  # with line breaks
        PREFIX + base64.b64encode(env[:OVERHEAD - 1]).decode(),
    ):
        expect_sqlstate(cur, "22P02", "SELECT manna_crypt.decrypt_gcm(%s::text, %s)", (bad, key))


# ---- nonces ----------------------------------------------------------------------


NONCE_SQL = "substr(decode(substr({}, 5), 'base64'), 6, 12)"


def test_same_plaintext_twice_gives_different_nonces(cur):
    key = os.urandom(32)
    cur.execute("SELECT manna_crypt.encrypt_gcm('same', %s), manna_crypt.encrypt_gcm('same', %s)", (key, key))
    a, b = (from_text(t) for t in cur.fetchone())
    assert a[HEADER_LEN : HEADER_LEN + NONCE_LEN] != b[HEADER_LEN : HEADER_LEN + NONCE_LEN]
    assert py_open(key, a) == py_open(key, b) == b"same"


def test_no_nonce_repeats_in_one_query(cur):
    key = os.urandom(32)
    n = 20_000
    cur.execute(
        f"SELECT count(*), count(DISTINCT n) FROM (SELECT {NONCE_SQL.format('manna_crypt.encrypt_gcm(%s, %s)')} AS n "
        f"FROM generate_series(1, {n})) s",
        ("same plaintext", key),
    )
    assert cur.fetchone() == (n, n)
    cur.execute(
        f"SELECT count(DISTINCT substr(manna_crypt.encrypt_gcm('\\x00'::bytea, %s), 6, 12)) FROM generate_series(1, {n})",
        (key,),
    )
    assert cur.fetchone()[0] == n


def test_no_nonce_repeats_across_backends(db):
    key = os.urandom(32)
    seen = []
    for _ in range(20):
        with connect(db) as c:
            rows = c.execute(
                f"SELECT {NONCE_SQL.format('manna_crypt.encrypt_gcm(%s, %s)')} FROM generate_series(1, 200)",
                ("x", key),
            ).fetchall()
            seen.extend(r[0] for r in rows)
    assert len(seen) == 4000
    assert len(set(seen)) == len(seen)


PARALLEL = [
    "SET max_parallel_workers_per_gather = 2",
    "SET parallel_setup_cost = 0",
    "SET parallel_tuple_cost = 0",
    "SET min_parallel_table_scan_size = 0",
]


def test_no_nonce_repeats_across_parallel_workers(db):
    key = os.urandom(32)
    n = 100_000
    with connect(db) as c:
        c.execute("DROP TABLE IF EXISTS par_src")
        c.execute(f"CREATE TABLE par_src AS SELECT i, 'token-' || i AS v FROM generate_series(1, {n}) i")
        c.execute("ANALYZE par_src")
        for s in PARALLEL:
            c.execute(s)
        query = f"SELECT i, {NONCE_SQL.format('manna_crypt.encrypt_gcm(v, %s)')} FROM par_src"
        # The plan is parallel, and the encryption runs below the Gather,
        # in more than one process.
        (plan,) = c.execute("EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) " + query, (key,)).fetchone()
        if isinstance(plan, str):
            plan = json.loads(plan)
        top = plan[0]["Plan"]
        assert top["Node Type"] == "Gather", f"plan is not parallel: {top['Node Type']}"
        assert top["Workers Launched"] >= 1
        scan = top["Plans"][0]
        assert scan["Node Type"] == "Seq Scan" and scan.get("Parallel Aware")
        assert any("encrypt_gcm" in o for o in scan["Output"]), "encryption is not evaluated in the workers"
        producers = [w for w in scan.get("Workers", []) if w.get("Actual Rows", 0) > 0]
        assert len(producers) >= 1, "no worker produced rows"

        rows = c.execute(query, (key,)).fetchall()
        assert sorted(r[0] for r in rows) == list(range(1, n + 1))
        nonces = [r[1] for r in rows]
        assert len(set(nonces)) == n, f"{n - len(set(nonces))} repeated nonces across parallel workers"

        # The values the workers wrote decrypt, in Python, to the right rows.
        rows = c.execute(
            "SELECT i, manna_crypt.encrypt_gcm(v, %s, i::text) FROM par_src WHERE i %% 997 = 0", (key,)
        ).fetchall()
        assert rows
        for i, text in rows:
            assert py_open(key, from_text(text), str(i).encode()) == f"token-{i}".encode()
        c.execute("DROP TABLE par_src")


def test_parallel_decrypt_matches(db):
    """Decryption in parallel workers (raw-key cache per process) is correct."""
    key = os.urandom(32)
    n = 50_000
    with connect(db) as c:
        c.execute("DROP TABLE IF EXISTS par_dec")
        c.execute(
            f"CREATE TABLE par_dec AS SELECT i, 'v' || i AS v, manna_crypt.encrypt_gcm('v' || i, %s) AS c "
            f"FROM generate_series(1, {n}) i",
            (key,),
        )
        c.execute("ANALYZE par_dec")
        for s in PARALLEL:
            c.execute(s)
        query = "SELECT count(*) FILTER (WHERE manna_crypt.decrypt_gcm(c, %s) = v) FROM par_dec"
        (plan,) = c.execute("EXPLAIN (VERBOSE, FORMAT JSON) " + query, (key,)).fetchone()
        if isinstance(plan, str):
            plan = json.loads(plan)
        assert "Gather" in json.dumps(plan), "plan is not parallel"
        assert c.execute(query, (key,)).fetchone()[0] == n
        c.execute("DROP TABLE par_dec")

