"""Wycheproof AES-GCM vectors through SQL `manna_crypt.aes_gcm_decrypt`.

Test vectors: C2SP/wycheproof `testvectors_v1/aes_gcm_test.json`, Apache
License 2.0, copied unmodified into tests/vectors/wycheproof/; source, commit
and licence are recorded in tests/vectors/README.md.

The envelope binds its header into the AAD, so published vectors cannot pass
through `decrypt_gcm` (docs/DESIGN.md section 1); the bare primitive takes the
vector's key, IV, ciphertext||tag and AAD as they are. Groups with AES-256,
96-bit IVs and 128-bit tags (66 tests: 39 valid, 27 invalid) must give `msg`
or SQLSTATE 39000. Every other group must be refused before any decryption:
a key that is not 32 bytes, or an IV that is not 12 bytes, is 22023.
"""

import json
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import connect, create_database

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "wycheproof" / "aes_gcm_test.json"

SQL = "SELECT manna_crypt.aes_gcm_decrypt(%s, %s, %s, %s)"


def load_groups():
    with open(VECTORS, encoding="utf-8") as f:
        data = json.load(f)
    assert data["algorithm"] == "AES-GCM"
    return data["testGroups"]


def is_ours(group):
    return group["keySize"] == 256 and group["ivSize"] == 96 and group["tagSize"] == 128


def args(t):
    return (
        bytes.fromhex(t["key"]),
        bytes.fromhex(t["iv"]),
        bytes.fromhex(t["ct"] + t["tag"]),
        bytes.fromhex(t["aad"]),
    )


@pytest.fixture(scope="module")
def cur():
    name = "t_wycheproof_" + uuid.uuid4().hex[:8]
    create_database(name)
    with connect(name) as c:
        with c.cursor() as cur:
            yield cur
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_aes256_iv96_vectors(cur):
    tests = [t for g in load_groups() if is_ours(g) for t in g["tests"]]
    counts = {"valid": 0, "invalid": 0}
    failures = []
    for t in tests:
        result = t["result"]
        assert result in ("valid", "invalid"), f"tcId {t['tcId']}: unexpected result {result}"
        counts[result] += 1
        try:
            cur.execute(SQL, args(t))
            got = cur.fetchone()[0]
        except psycopg.Error as e:
            if result == "valid" or e.sqlstate != "39000":
                failures.append(f"tcId {t['tcId']} ({result}, {t['flags']}): SQLSTATE {e.sqlstate}")
            continue
        if result == "invalid":
            failures.append(f"tcId {t['tcId']} (invalid, {t['flags']}): accepted")
        elif got != bytes.fromhex(t["msg"]):
            failures.append(f"tcId {t['tcId']} (valid): wrong plaintext")
    assert counts == {"valid": 39, "invalid": 27}
    assert not failures, "\n".join(failures)


def test_vectors_also_pass_with_null_aad_when_empty(cur):
    """A NULL aad is the empty aad."""
    tests = [t for g in load_groups() if is_ours(g) for t in g["tests"] if t["result"] == "valid" and t["aad"] == ""]
    assert tests
    for t in tests:
        key, iv, sealed, _ = args(t)
        cur.execute("SELECT manna_crypt.aes_gcm_decrypt(%s, %s, %s)", (key, iv, sealed))
        assert cur.fetchone()[0] == bytes.fromhex(t["msg"]), f"tcId {t['tcId']}"
        cur.execute(SQL, (key, iv, sealed, None))
        assert cur.fetchone()[0] == bytes.fromhex(t["msg"]), f"tcId {t['tcId']}"


def expect_22023(cur, t):
    try:
        cur.execute(SQL, args(t))
    except psycopg.Error as e:
        return e.sqlstate, e.diag.message_primary
    return "accepted", None


def test_other_key_sizes_are_refused(cur):
    tests = [t for g in load_groups() if g["keySize"] != 256 and g["ivSize"] == 96 for t in g["tests"]]
    assert len(tests) > 100
    outcomes = {}
    for t in tests:
        state, msg = expect_22023(cur, t)
        outcomes.setdefault(state, []).append(t["tcId"])
        if state == "22023":
            assert "key" in msg
    assert list(outcomes) == ["22023"], {k: v[:5] for k, v in outcomes.items()}


def test_other_iv_sizes_are_refused(cur):
    tests = [t for g in load_groups() if g["keySize"] == 256 and g["ivSize"] != 96 for t in g["tests"]]
    sizes = {len(bytes.fromhex(t["iv"])) for t in tests}
    assert 0 in sizes and 16 in sizes
    outcomes = {}
    for t in tests:
        state, msg = expect_22023(cur, t)
        outcomes.setdefault(state, []).append(t["tcId"])
        if state == "22023":
            assert "nonce" in msg
    assert list(outcomes) == ["22023"], {k: v[:5] for k, v in outcomes.items()}
