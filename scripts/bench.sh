#!/usr/bin/env bash
# Benchmarks (not tests: they report numbers and never fail on them).
#
#   scripts/bench.sh              every section
#   scripts/bench.sh gcm          only the named sections
#
# Sections: gcm     - encrypt_gcm / decrypt_gcm (raw key and keyring) against
#                     pgcrypto's encrypt()/decrypt() with AES-256-CBC
#           protect - INSERT and COPY of MC_BENCH_ROWS/10 rows into a
#                     protected column (trigger) against explicit encrypt_gcm
#           columns - a column of ciphertexts made encrypted_text-only:
#                     ALTER ... TYPE manna_crypt.encrypted_text against a CHECK
#                     added NOT VALID and then validated (time, rewrite, locks)
#           migrate - in-place Fernet migration (scripts/bench_migrate.sh)
#           locking - the optimistic-locking trigger (scripts/bench_locking.sh)
#           rootkey - what loading the root key from a slow command (a KMS
#                     call) costs new connections and parallel workers,
#                     against the key file in the same run
#           orm     - SQLAlchemy inserts through EncryptedText against plain Text
#           blind   - blind indexes: lookup latency against a plaintext index,
#                     blind_index() calls/s against sha256(), the backfill
#                     against an UPDATE floor (scripts/bench_blind.sh)
#           redact  - manna_crypt.redact_log off against on under pgbench
#                     (scripts/bench_redact.sh)
#           grants  - keyring encrypt/decrypt by a role judged by keyring grants
#                     against the same functions without the grant check
#
# Builds and installs the release build (scripts/setup.sh), then runs in a
# throwaway cluster under target/bench (port 55480, or MC_BENCH_PORT) that is
# stopped when the script exits. One core: no parallel workers, no JIT.
# Each query is timed inside the server with clock_timestamp() over
# MC_BENCH_ROWS (1,000,000) rows: MC_BENCH_RUNS (5) rounds that run every
# query of the section once, round-robin; each query's best time counts.
# The numbers are only as good as the machine is idle: check the load.
#
# Adding a section: write a function bench_NAME that prepares its data,
# registers its queries with `record SECTION NAME SQL [FLOOR_NAME]`, calls
# `run SECTION` and prints its report (`report`, `ratios`); add NAME to
# SECTIONS.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

SECTIONS=(gcm access grants protect columns migrate locking rootkey orm blind redact)
BENCH_DIR=${MC_BENCH_DIR:-$MC_ROOT/target/bench}
BENCH_PORT=${MC_BENCH_PORT:-55480}
ROWS=${MC_BENCH_ROWS:-1000000}
RUNS=${MC_BENCH_RUNS:-5}

bpsql() { cluster_psql "$BENCH_DIR" "$BENCH_PORT" bench "$@"; }

# ---- the cluster and the shared data -----------------------------------------

start_cluster() {
    cluster_stop "$BENCH_DIR"
    rm -rf "$BENCH_DIR"
    cluster_start "$BENCH_DIR" "$BENCH_PORT" \
        "shared_buffers = 1GB" \
        "max_parallel_workers_per_gather = 0" \
        "jit = off" \
        "log_min_messages = warning"
    trap 'cluster_stop "$BENCH_DIR"' EXIT
    cluster_psql "$BENCH_DIR" "$BENCH_PORT" postgres -q -c "CREATE DATABASE bench"
    bpsql -q <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION manna_crypt;
CREATE EXTENSION pgcrypto;
CREATE SCHEMA bench;
-- One row per timed query: best-of-N milliseconds. `floor` names the query
-- that only reads the same input (the scan floor subtracted from it).
CREATE TABLE bench.results (
    seq serial, section text, name text, floor text, sql text, ms float8, rows bigint,
    PRIMARY KEY (section, name)
);
-- Runs every query of a section once per round, round-robin, and keeps
-- each query's best wall time: a burst of load from other processes then
-- hits one run of every query instead of all runs of one query.
CREATE PROCEDURE bench.run(sect text, rounds int) LANGUAGE plpgsql AS $$
DECLARE
    r record;
    t0 timestamptz;
BEGIN
    FOR i IN 1..rounds LOOP
        FOR r IN SELECT name, sql FROM bench.results WHERE section = sect ORDER BY seq LOOP
            t0 := clock_timestamp();
            EXECUTE r.sql;
            UPDATE bench.results
               SET ms = least(coalesce(ms, 'Infinity'), extract(epoch FROM clock_timestamp() - t0) * 1000)
             WHERE section = sect AND name = r.name;
        END LOOP;
        RAISE NOTICE 'round % of % done', i, rounds;
    END LOOP;
END $$;
-- The raw key is generated here and read through a one-row table (an
-- InitPlan: evaluated once per query); it is never printed.
CREATE TABLE bench.key AS SELECT gen_random_bytes(32) AS k;
SQL
}

# The 51-character tokens every section starts from.
ensure_tokens() {
    bpsql -q -c "SET client_min_messages = warning" -c "
        CREATE TABLE IF NOT EXISTS bench.tokens AS
            SELECT 'access-sandbox-' || gen_random_uuid() AS v FROM generate_series(1, $ROWS)" \
        -c "VACUUM ANALYZE bench.tokens"
}

# record SECTION NAME SQL [FLOOR]: add SQL to the section's queries.
record() {
    local section=$1 name=$2 sql=$3 floor=${4:-}
    bpsql -q -v section="$section" -v name="$name" -v floor="$floor" -v q="$sql" -v rows="$ROWS" <<'SQL'
INSERT INTO bench.results (section, name, floor, sql, rows)
VALUES (:'section', :'name', nullif(:'floor', ''), :'q', :rows)
ON CONFLICT (section, name) DO UPDATE SET sql = excluded.sql, floor = excluded.floor, rows = excluded.rows, ms = NULL;
SQL
}

# run SECTION: time the section's queries, RUNS rounds, best time of each.
run() {
    log "section $1: timing, $RUNS rounds"
    bpsql -q -c "SET client_min_messages = notice" -c "CALL bench.run('$1', $RUNS)"
}

# report SECTION: rows/s, and time minus the scan floor, for every query.
report() {
    bpsql -P footer=off -v section="$1" <<'SQL'
SELECT r.name AS query,
       round(r.ms)::bigint AS "ms (best)",
       to_char(r.rows / (r.ms / 1000), '999,999,990') AS "rows/s",
       r.floor AS "floor query",
       CASE WHEN f.ms IS NOT NULL THEN round(r.ms - f.ms)::bigint END AS "ms minus floor",
       CASE WHEN f.ms IS NOT NULL THEN to_char(r.rows / ((r.ms - f.ms) / 1000), '999,999,990') END AS "rows/s minus floor"
FROM bench.results r LEFT JOIN bench.results f ON f.section = r.section AND f.name = r.floor
WHERE r.section = :'section'
ORDER BY r.seq;
SQL
}

# ratio SECTION LABEL NUM DEN TARGET: NUM/DEN in raw time and after
# subtracting each query's own scan floor.
ratios() {
    local section=$1; shift
    local values=() row
    for row in "$@"; do values+=("($row)"); done
    local IFS=,
    bpsql -P footer=off -v section="$section" <<SQL
WITH wanted(label, num, den, target, ord) AS (VALUES ${values[*]}),
t AS (
    SELECT r.name, r.ms, r.ms - coalesce(f.ms, 0) AS net
    FROM bench.results r LEFT JOIN bench.results f ON f.section = r.section AND f.name = r.floor
    WHERE r.section = :'section'
)
SELECT w.label AS ratio,
       round((n.ms / d.ms)::numeric, 3) AS "raw time",
       round((n.net / d.net)::numeric, 3) AS "minus floor",
       '<= ' || w.target AS target,
       CASE WHEN n.net / d.net <= w.target THEN 'yes' ELSE 'NO' END AS "meets (minus floor)"
FROM wanted w JOIN t n ON n.name = w.num JOIN t d ON d.name = w.den
ORDER BY w.ord;
SQL
}

# ---- sections ------------------------------------------------------------------

bench_gcm() {
    log "section gcm: preparing $ROWS rows"
    ensure_tokens
    bpsql -q -c "SET client_min_messages = warning" -c "
        SELECT manna_crypt.create_keyring('bench');
        CREATE TABLE bench.gcm_raw AS
            SELECT manna_crypt.encrypt_gcm(v, (SELECT k FROM bench.key))::text AS c FROM bench.tokens;
        CREATE TABLE bench.gcm_ring AS
            SELECT manna_crypt.encrypt_gcm(v, 'bench')::text AS c FROM bench.tokens;
        CREATE TABLE bench.pgc AS
            SELECT encrypt(convert_to(v, 'UTF8'), (SELECT k FROM bench.key), 'aes') AS c FROM bench.tokens;" \
        -c "VACUUM ANALYZE bench.gcm_raw, bench.gcm_ring, bench.pgc" >/dev/null

    local key="(SELECT k FROM bench.key)"
    # Every query is count(octet_length(...)) so each one reads and returns
    # its values the same way. (length() on text counts UTF-8 characters, a
    # per-byte walk that would charge the 116-character mc1: text more than
    # pgcrypto's bytea, which has nothing to do with the crypto.)
    # Scan floors: read the same column, no crypto.
    record gcm "floor: tokens"   "SELECT count(octet_length(v)) FROM bench.tokens"
    record gcm "floor: gcm_raw"  "SELECT count(octet_length(c)) FROM bench.gcm_raw"
    record gcm "floor: gcm_ring" "SELECT count(octet_length(c)) FROM bench.gcm_ring"
    record gcm "floor: pgcrypto" "SELECT count(octet_length(c)) FROM bench.pgc"
    record gcm "encrypt_gcm raw key" \
        "SELECT count(octet_length(manna_crypt.encrypt_gcm(v, $key))) FROM bench.tokens" "floor: tokens"
    record gcm "encrypt_gcm keyring" \
        "SELECT count(octet_length(manna_crypt.encrypt_gcm(v, 'bench'))) FROM bench.tokens" "floor: tokens"
    # The same without the usage counter (docs/DESIGN.md 7.2), in the same
    # build and run: only the benchmark build has this function.
    record gcm "encrypt_gcm keyring, uncounted" \
        "SELECT count(octet_length(manna_crypt._bench_encrypt_gcm_uncounted(v, 'bench'))) FROM bench.tokens" "floor: tokens"
    record gcm "pgcrypto encrypt aes-256-cbc" \
        "SELECT count(octet_length(encrypt(convert_to(v, 'UTF8'), $key, 'aes'))) FROM bench.tokens" "floor: tokens"
    record gcm "decrypt_gcm raw key" \
        "SELECT count(octet_length(manna_crypt.decrypt_gcm(c, $key))) FROM bench.gcm_raw" "floor: gcm_raw"
    record gcm "decrypt_gcm keyring" \
        "SELECT count(octet_length(manna_crypt.decrypt_gcm(c))) FROM bench.gcm_ring" "floor: gcm_ring"
    record gcm "pgcrypto decrypt aes-256-cbc" \
        "SELECT count(octet_length(convert_from(decrypt(c, $key, 'aes'), 'UTF8'))) FROM bench.pgc" "floor: pgcrypto"

    run gcm

    # The decrypting queries must really decrypt (a benchmark of errors or
    # NULLs would be meaningless).
    local ok
    ok=$(bpsql -qAt -c "SELECT
        (SELECT count(*) FROM bench.gcm_raw WHERE manna_crypt.decrypt_gcm(c, $key) LIKE 'access-sandbox-%') = $ROWS
        AND (SELECT count(*) FROM bench.gcm_ring WHERE manna_crypt.decrypt_gcm(c) LIKE 'access-sandbox-%') = $ROWS
        AND (SELECT count(*) FROM bench.pgc WHERE convert_from(decrypt(c, $key, 'aes'), 'UTF8') LIKE 'access-sandbox-%') = $ROWS")
    [ "$ok" = t ] || die "a benchmarked decryption did not return the plaintexts"

    echo
    echo "== gcm: $ROWS rows of 51-character tokens, one core, best of $RUNS rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
    echo "   ('minus floor' subtracts the time of reading the same column without crypto)"
    report gcm
    echo "Ratios of times (lower is faster). 'raw time' compares whole query times;"
    echo "'minus floor' compares only the crypto part (each query minus its own scan floor)."
    ratios gcm \
        "'encrypt_gcm raw / pgcrypto encrypt', 'encrypt_gcm raw key', 'pgcrypto encrypt aes-256-cbc', 0.5, 1" \
        "'decrypt_gcm raw / pgcrypto decrypt', 'decrypt_gcm raw key', 'pgcrypto decrypt aes-256-cbc', 0.5, 2" \
        "'encrypt_gcm keyring / raw key', 'encrypt_gcm keyring', 'encrypt_gcm raw key', 1.1, 3" \
        "'keyring counted / uncounted', 'encrypt_gcm keyring', 'encrypt_gcm keyring, uncounted', 1.05, 5" \
        "'decrypt_gcm keyring / raw key', 'decrypt_gcm keyring', 'decrypt_gcm raw key', 1.1, 4"
}

# Key access statistics (README "Who used which key"): keyring encrypt and
# decrypt with the per-call recording and without it, in the same build and
# session: the benchmark build's _bench_record_key_access(false) turns the
# recording off for the session. Every query sets it (and the LOG mode)
# itself in an InitPlan evaluated once, so the order of the queries does not
# matter and all have the same shape. The LOG mode writes a line per call:
# measured on a tenth of the rows.
bench_access() {
    local n=$((ROWS / 10))
    log "section access: preparing $ROWS rows"
    ensure_tokens
    bpsql -q -c "SET client_min_messages = warning" -c "
        SELECT manna_crypt.create_keyring('bench_a');
        CREATE TABLE bench.acc_ring AS
            SELECT manna_crypt.encrypt_gcm(v, 'bench_a')::text AS c FROM bench.tokens;
        CREATE TABLE bench.acc_small AS SELECT c FROM bench.acc_ring LIMIT $n;" \
        -c "VACUUM ANALYZE bench.acc_ring, bench.acc_small" >/dev/null
    local on="WHERE (SELECT manna_crypt._bench_record_key_access(true)
                      AND set_config('manna_crypt.key_access_log', 'off', false) = 'off')"
    local off="WHERE (SELECT NOT manna_crypt._bench_record_key_access(false)
                       AND set_config('manna_crypt.key_access_log', 'off', false) = 'off')"
    local logged="WHERE (SELECT manna_crypt._bench_record_key_access(true)
                          AND set_config('manna_crypt.key_access_log', 'on', false) = 'on')"
    record access "floor: tokens" "SELECT count(octet_length(v)) FROM bench.tokens $on"
    record access "floor: acc_ring" "SELECT count(octet_length(c)) FROM bench.acc_ring $on"
    record access "floor: acc_small" "SELECT count(octet_length(c)) FROM bench.acc_small $on"
    record access "encrypt keyring, recorded" \
        "SELECT count(octet_length(manna_crypt.encrypt_gcm(v, 'bench_a'))) FROM bench.tokens $on" \
        "floor: tokens"
    record access "encrypt keyring, not recorded" \
        "SELECT count(octet_length(manna_crypt.encrypt_gcm(v, 'bench_a'))) FROM bench.tokens $off" \
        "floor: tokens"
    record access "decrypt keyring, recorded" \
        "SELECT count(octet_length(manna_crypt.decrypt_gcm(c))) FROM bench.acc_ring $on" \
        "floor: acc_ring"
    record access "decrypt keyring, not recorded" \
        "SELECT count(octet_length(manna_crypt.decrypt_gcm(c))) FROM bench.acc_ring $off" \
        "floor: acc_ring"
    record access "decrypt keyring, recorded, $n rows" \
        "SELECT count(octet_length(manna_crypt.decrypt_gcm(c))) FROM bench.acc_small $on" \
        "floor: acc_small"
    record access "decrypt keyring, key_access_log = on, $n rows" \
        "SELECT count(octet_length(manna_crypt.decrypt_gcm(c))) FROM bench.acc_small $logged" \
        "floor: acc_small"

    run access

    # The recorded runs were counted: RUNS rounds of each recorded decrypt
    # query (and of the LOG mode's), in the view; the others were not.
    local want=$(( RUNS * (ROWS + n + n) )) got
    got=$(bpsql -qAt -c "SELECT sum(calls) FROM manna_crypt.key_access
                          WHERE keyring = 'bench_a' AND operation = 'decrypt'")
    [ "$got" = "$want" ] || die "the view counts $got decryptions, expected $want"

    echo
    echo "== access: $ROWS rows, one core, best of $RUNS rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
    report access
    ratios access \
        "'encrypt recorded / not recorded', 'encrypt keyring, recorded', 'encrypt keyring, not recorded', 1.02, 1" \
        "'decrypt recorded / not recorded', 'decrypt keyring, recorded', 'decrypt keyring, not recorded', 1.02, 2"
    # Whole queries on a shared 2-core machine vary by a few percent from
    # round to round, more than the recording costs; so the recording's own
    # cost is also timed alone (10^8 calls in one backend, best of 5) and
    # set against the time of one keyring decryption measured above.
    bpsql -P footer=off -v n="$n" -v rows="$ROWS" <<'SQL'
SELECT round(((l.ms - r.ms) * 1000 / :n)::numeric, 2) AS "key_access_log = on: extra µs per call"
FROM bench.results l, bench.results r
WHERE l.section = 'access' AND l.name LIKE 'decrypt keyring, key_access_log = on%'
  AND r.section = 'access' AND r.name LIKE 'decrypt keyring, recorded, %';
WITH rec AS (
    SELECT min(manna_crypt._bench_record_key_access_ns(100000000)) AS ns
    FROM generate_series(1, 5)
), dec AS (
    SELECT (ms - (SELECT ms FROM bench.results WHERE section = 'access'
                   AND name = 'floor: acc_ring')) * 1e6 / :rows AS ns
    FROM bench.results WHERE section = 'access' AND name = 'decrypt keyring, not recorded'
)
SELECT round(rec.ns::numeric, 2) AS "recording: ns per call",
       round(dec.ns::numeric, 1) AS "keyring decrypt: ns per call",
       round((1 + rec.ns / dec.ns)::numeric, 4) AS "ratio (<= 1.02)"
FROM rec, dec;
SQL
}

# Protected columns: the trigger against calling encrypt_gcm in the INSERT
# itself, and COPY (a BEFORE ROW trigger turns off COPY's multi-row
# inserts) against COPY of ciphertexts into a plain table.
bench_protect() {
    local n=$((ROWS / 10)) csv="$BENCH_DIR/protect_tokens.csv"
    log "section protect: preparing $n rows"
    ensure_tokens
    bpsql -q -c "SET client_min_messages = warning" -c "
        SELECT manna_crypt.create_keyring('bench_p');
        CREATE TABLE bench.t_src AS SELECT row_number() OVER () AS id, v FROM bench.tokens LIMIT $n;
        CREATE TABLE bench.p_plain (id bigint, token text);
        CREATE TABLE bench.p_explicit (id bigint, token text);
        CREATE TABLE bench.p_protected (id bigint, token text);
        SELECT manna_crypt.protect_column('bench.p_protected', 'token', 'bench_p', 'id');
        COPY bench.t_src TO '$csv' (FORMAT csv);
        CREATE PROCEDURE bench.refill(tbl text, q text) LANGUAGE plpgsql AS \$\$
        BEGIN EXECUTE format('TRUNCATE %s', tbl); EXECUTE q; END \$\$;" >/dev/null
    record protect "insert: plain text (floor)" \
        "CALL bench.refill('bench.p_plain', 'INSERT INTO bench.p_plain SELECT id, v FROM bench.t_src')"
    record protect "insert: encrypt_gcm(v, keyring, id::text)" \
        "CALL bench.refill('bench.p_explicit', 'INSERT INTO bench.p_explicit SELECT id, manna_crypt.encrypt_gcm(v, ''bench_p'', id::text) FROM bench.t_src')" \
        "insert: plain text (floor)"
    record protect "insert: protected column (trigger)" \
        "CALL bench.refill('bench.p_protected', 'INSERT INTO bench.p_protected SELECT id, v FROM bench.t_src')" \
        "insert: plain text (floor)"
    record protect "copy: plain text (floor)" \
        "CALL bench.refill('bench.p_plain', 'COPY bench.p_plain FROM ''$csv'' (FORMAT csv)')"
    record protect "copy: protected column (trigger)" \
        "CALL bench.refill('bench.p_protected', 'COPY bench.p_protected FROM ''$csv'' (FORMAT csv)')" \
        "copy: plain text (floor)"
    run protect
    local ok
    ok=$(bpsql -qAt -c "SELECT count(*) = $n AND bool_and(manna_crypt.decrypt_gcm(token, id::text) LIKE 'access-sandbox-%')
                          FROM bench.p_protected")
    [ "$ok" = t ] || die "the protected table does not hold the encrypted tokens"
    echo
    echo "== protect: $n rows, one core, best of $RUNS rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
    report protect
    ratios protect \
        "'INSERT: trigger / explicit encrypt_gcm', 'insert: protected column (trigger)', 'insert: encrypt_gcm(v, keyring, id::text)', 1.3, 1" \
        "'COPY: trigger / plain COPY (cost of the trigger)', 'copy: protected column (trigger)', 'copy: plain text (floor)', 99, 2"
}

# Making a text column of ciphertexts accept only ciphertexts (README,
# "Plaintext column to encrypted_text"): the domain by ALTER ... TYPE
# against a CHECK added NOT VALID, then validated. DDL runs once per table,
# so each round times every statement on a fresh copy of ROWS ciphertexts;
# best of RUNS. Also reported: whether the table was rewritten (its
# relfilenode changed) and the lock each statement holds (pg_locks, read
# inside the statement's own transaction).
bench_columns() {
    log "section columns: preparing $ROWS rows"
    ensure_tokens
    bpsql -q -c "SET client_min_messages = warning" -c "
        SELECT manna_crypt.create_keyring('bench_columns', if_not_exists => true);
        DROP TABLE IF EXISTS bench.col_source;
        CREATE TABLE bench.col_source AS
            SELECT row_number() OVER () AS id, manna_crypt.encrypt_gcm(v, 'bench_columns')::text AS c
              FROM bench.tokens;" >/dev/null
    bpsql -q <<'SQL'
SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS bench.col_results (
    step text PRIMARY KEY, ord int, ms float8, rewrote boolean, lock_mode text);
TRUNCATE bench.col_results;
-- col_step(step, ord, table, ddl): one timed DDL statement on a table,
-- with whether it rewrote the table and the strongest lock it held.
CREATE OR REPLACE PROCEDURE bench.col_step(p_step text, p_ord int, tbl regclass, ddl text)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    t_ms float8;
    before oid;
    held text;
BEGIN
    before := pg_relation_filenode(tbl);
    t0 := clock_timestamp();
    EXECUTE ddl;
    t_ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
    SELECT string_agg(DISTINCT mode, ', ') INTO held
      FROM pg_locks WHERE relation = tbl AND pid = pg_backend_pid() AND granted;
    INSERT INTO bench.col_results AS r VALUES (p_step, p_ord, t_ms, pg_relation_filenode(tbl) <> before, held)
        ON CONFLICT (step) DO UPDATE SET ms = least(r.ms, excluded.ms),
                                         rewrote = excluded.rewrote, lock_mode = excluded.lock_mode;
    COMMIT;
END $$;
SQL
    local i
    for ((i = 1; i <= RUNS; i++)); do
        bpsql -q <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS bench.col_alter, bench.col_check;
CREATE TABLE bench.col_alter AS SELECT * FROM bench.col_source;
CREATE TABLE bench.col_check AS SELECT * FROM bench.col_source;
VACUUM ANALYZE bench.col_alter, bench.col_check;
CALL bench.col_step('ALTER COLUMN c TYPE manna_crypt.encrypted_text', 1, 'bench.col_alter',
    'ALTER TABLE bench.col_alter ALTER COLUMN c TYPE manna_crypt.encrypted_text');
CALL bench.col_step('ADD CONSTRAINT ... CHECK (manna_crypt.is_encrypted(c)) NOT VALID', 2, 'bench.col_check',
    'ALTER TABLE bench.col_check ADD CONSTRAINT c_is_encrypted CHECK (manna_crypt.is_encrypted(c)) NOT VALID');
CALL bench.col_step('VALIDATE CONSTRAINT c_is_encrypted', 3, 'bench.col_check',
    'ALTER TABLE bench.col_check VALIDATE CONSTRAINT c_is_encrypted');
CALL bench.col_step('floor: SELECT count(*) WHERE NOT is_encrypted(c)', 4, 'bench.col_source',
    'SELECT count(*) FROM bench.col_source WHERE NOT manna_crypt.is_encrypted(c)');
SQL
        log "columns: round $i of $RUNS done"
    done
    # Both tables end with the same guarantee: plaintext is refused (23514).
    local refused
    refused=$(bpsql -qAt -c "SET client_min_messages = warning" -c "DO \$\$
        DECLARE n int := 0;
        BEGIN
            BEGIN INSERT INTO bench.col_alter VALUES (0, 'plain'); EXCEPTION WHEN check_violation THEN n := n + 1; END;
            BEGIN INSERT INTO bench.col_check VALUES (0, 'plain'); EXCEPTION WHEN check_violation THEN n := n + 1; END;
            IF n <> 2 THEN RAISE EXCEPTION 'plaintext was accepted'; END IF;
        END \$\$" -c "SELECT 'ok'")
    [ "$refused" = ok ] || die "a column accepted plaintext"
    echo
    echo "== columns: $ROWS rows of mc1 ciphertexts, best of $RUNS rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
    bpsql -P footer=off -c "
        SELECT step, round(ms)::bigint AS \"ms (best)\", rewrote AS \"table rewritten\",
               lock_mode AS \"lock held\"
          FROM bench.col_results ORDER BY ord"
}

# In-place Fernet migration against the client-side way and the UPDATE floor
# (its own cluster; see scripts/bench_migrate.sh).
bench_migrate() {
    ensure_venv
    "$MC_ROOT/scripts/bench_migrate.sh"
}

# Blind indexes (their own cluster; see scripts/bench_blind.sh).
bench_blind() {
    ensure_venv
    "$MC_ROOT/scripts/bench_blind.sh"
}

# What log redaction costs under pgbench (its own cluster; see
# scripts/bench_redact.sh).
bench_redact() {
    "$MC_ROOT/scripts/bench_redact.sh"
}

# Cost of the optimistic-locking trigger under pgbench (its own cluster; see
# scripts/bench_locking.sh).
bench_locking() {
    "$MC_ROOT/scripts/bench_locking.sh"
}

# SQLAlchemy ORM: 10,000 session.add() + commit through EncryptedText (a
# protect_column'd column) against a plain Text column, on the shared
# cluster (scripts/bench_orm.py; MC_BENCH_ORM_ROWS, MC_BENCH_ORM_RUNS).
bench_orm() {
    ensure_venv
    log "section orm: SQLAlchemy inserts, EncryptedText against Text"
    "$MC_ROOT/target/venv/bin/python" "$MC_ROOT/scripts/bench_orm.py" \
        "host=$BENCH_DIR port=$BENCH_PORT dbname=bench" "${MC_BENCH_ORM_ROWS:-10000}" "${MC_BENCH_ORM_RUNS:-5}"
    echo "   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
}

# ---- rootkey: the root key from a command that takes as long as a KMS call ------

RK_ROWS=${MC_BENCH_ROOTKEY_ROWS:-200000}
RK_CONNS=${MC_BENCH_ROOTKEY_CONNS:-50}
RK_PAR_RUNS=${MC_BENCH_ROOTKEY_PAR_RUNS:-5}
RK_PGBENCH_SECONDS=${MC_BENCH_ROOTKEY_SECONDS:-10}
RK_ONE="SELECT length(manna_crypt.decrypt_gcm(c)) FROM bench.rk_one"
# A real parallel sequential scan (2 workers planned and launched), with the
# decryption in the workers' filter: each worker needs the data key, so the
# root key, itself.
RK_PARALLEL="SELECT count(*) FROM bench.rk_par WHERE manna_crypt.decrypt_gcm(c) LIKE 'access-%'"
RK_PARALLEL_SETTINGS="SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0;
    SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0; SET parallel_leader_participation = on;"

rk_count() { as_pg cat "$BENCH_DIR/keys/rootcmd.count" | wc -l; }
rk_reset_count() { as_pg sh -c ": > '$BENCH_DIR/keys/rootcmd.count'"; }

# rk_source file|command: switches the root key source (ALTER SYSTEM and a
# reload) and waits until new sessions see it.
rk_source() {
    local cmd=""
    if [ "$1" = command ]; then
        cmd="$BENCH_DIR/keys/rootcmd.sh"
        bpsql -q -c "ALTER SYSTEM SET manna_crypt.root_key_file = ''" \
            -c "ALTER SYSTEM SET manna_crypt.root_key_command = '$cmd'" -c "SELECT pg_reload_conf()" >/dev/null
    else
        bpsql -q -c "ALTER SYSTEM RESET manna_crypt.root_key_command" \
            -c "ALTER SYSTEM RESET manna_crypt.root_key_file" -c "SELECT pg_reload_conf()" >/dev/null
    fi
    local i
    for i in $(seq 1 100); do
        [ "$(bpsql -qAt -c "SHOW manna_crypt.root_key_command")" = "$cmd" ] && return 0
        sleep 0.1
    done
    die "the root key source did not switch to $1"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# rk_connections SOURCE: RK_CONNS new sessions, one keyring decryption
# each; prints "command-runs median-ms max-ms" of the first (and only)
# query of each session.
rk_connections() {
    rk_source "$1"
    rk_reset_count
    local times=() i t
    for i in $(seq 1 "$RK_CONNS"); do
        t=$(bpsql -qAt -c '\timing on' -c "$RK_ONE" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
        [ -n "$t" ] || die "no timing from psql"
        times+=("$t")
    done
    echo "$(rk_count) $(printf '%s\n' "${times[@]}" | median) $(printf '%s\n' "${times[@]}" | sort -g | tail -n 1)"
}

# rk_parallel SOURCE: the parallel query once (the first load), then
# RK_PAR_RUNS times in the same session; prints "command-runs-per-execution
# median-ms workers-launched" of those runs. Parallel workers are new
# processes: without a root key shared by the server, each one loads it.
rk_parallel() {
    rk_source "$1"
    bpsql -qAt -c "$RK_ONE" >/dev/null   # the first load, outside the measurement
    local out workers
    workers=$(bpsql -qAt -c "$RK_PARALLEL_SETTINGS" -c "EXPLAIN (ANALYZE, COSTS OFF) $RK_PARALLEL" \
        | sed -n 's/.*Workers Launched: \([0-9]*\).*/\1/p')
    # One session: a first execution (the leader's and the workers' first
    # load), the counter emptied, then the timed executions.
    local args=(-c "$RK_PARALLEL_SETTINGS" -c "$RK_PARALLEL"
                -c "\\! : > '$BENCH_DIR/keys/rootcmd.count'" -c '\timing on') i
    for i in $(seq 1 "$RK_PAR_RUNS"); do args+=(-c "$RK_PARALLEL"); done
    out=$(bpsql -qAt "${args[@]}" 2>&1)
    local times
    times=$(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -n "$RK_PAR_RUNS")
    printf '%s\n' "$out" | grep -qx "$RK_ROWS" || { printf '%s\n' "$out" >&2; die "the parallel query did not decrypt every row"; }
    echo "$(awk -v n="$(rk_count)" -v r="$RK_PAR_RUNS" 'BEGIN { printf "%.1f", n / r }') $(printf '%s\n' "$times" | median) ${workers:-?}"
}

# rk_pgbench SOURCE: pgbench -C (a new connection per transaction), one
# keyring decryption per transaction; prints "tps command-runs transactions".
rk_pgbench() {
    rk_source "$1"
    rk_reset_count
    local out tps xacts
    out=$("$(pg_bindir)/pgbench" -h "$BENCH_DIR" -p "$BENCH_PORT" -n -C -c 2 -j 2 -T "$RK_PGBENCH_SECONDS" \
        -f "$BENCH_DIR/rk_one.sql" bench 2>&1) || { printf '%s\n' "$out" >&2; die "pgbench failed"; }
    tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -n 1)
    xacts=$(printf '%s\n' "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
    [ -n "$tps" ] && [ -n "$xacts" ] || { printf '%s\n' "$out" >&2; die "could not parse pgbench output"; }
    echo "$tps $(rk_count) $xacts"
}

# rk_best "TPS RUNS XACTS" "TPS RUNS XACTS": the line with the higher TPS.
rk_best() {
    printf '%s\n%s\n' "$1" "$2" | sort -g -r -k1,1 | head -n 1
}

bench_rootkey() {
    log "section rootkey: preparing $RK_ROWS rows"
    # The command: as long as a KMS call (0.3 s), then the same key as the
    # file; each run appends a line to rootcmd.count.
    as_pg sh -c "umask 077; printf '%s\n' '#!/bin/sh' \
        'echo run >> \"$BENCH_DIR/keys/rootcmd.count\"' 'sleep 0.3' 'cat \"$BENCH_DIR/keys/root.key\"' \
        > '$BENCH_DIR/keys/rootcmd.sh'; chmod 700 '$BENCH_DIR/keys/rootcmd.sh'; : > '$BENCH_DIR/keys/rootcmd.count'"
    printf '%s;\n' "$RK_ONE" >"$BENCH_DIR/rk_one.sql"
    chmod a+r "$BENCH_DIR/rk_one.sql"
    bpsql -q -c "SET client_min_messages = warning" -c "
        SELECT manna_crypt.create_keyring('rk');
        CREATE TABLE bench.rk_par AS
            SELECT manna_crypt.encrypt_gcm('access-sandbox-' || gen_random_uuid(), 'rk')::text AS c
            FROM generate_series(1, $RK_ROWS);
        CREATE TABLE bench.rk_one AS SELECT c FROM bench.rk_par LIMIT 1;" \
        -c "VACUUM ANALYZE bench.rk_par, bench.rk_one" >/dev/null

    local conn_cmd conn_file par_cmd par_file pgb_cmd pgb_file
    log "section rootkey: $RK_CONNS new connections, command source, then file source"
    conn_cmd=$(rk_connections command)
    conn_file=$(rk_connections file)
    log "section rootkey: parallel query (2 workers), $RK_PAR_RUNS runs per source"
    par_cmd=$(rk_parallel command)
    par_file=$(rk_parallel file)
    log "section rootkey: pgbench -C, ${RK_PGBENCH_SECONDS} s per source"
    # Alternating, twice each, best TPS of each source: a burst of load from
    # elsewhere then hits one run of each rather than all runs of one.
    pgb_file=$(rk_pgbench file)
    pgb_cmd=$(rk_pgbench command)
    pgb_file=$(rk_best "$pgb_file" "$(rk_pgbench file)")
    pgb_cmd=$(rk_best "$pgb_cmd" "$(rk_pgbench command)")

    local c1 c2 c3 f1 f2 f3
    echo
    echo "== rootkey: root key from a command that takes 0.3 s (a KMS call) vs the key file (load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
    read -r c1 c2 c3 <<<"$conn_cmd"; read -r f1 f2 f3 <<<"$conn_file"
    printf '%s\n' "$RK_CONNS new connections, each: $RK_ONE"
    printf '  %-8s %14s %22s %16s\n' source "command runs" "median first query ms" "slowest ms"
    printf '  %-8s %14s %22s %16s\n' command "$c1" "$c2" "$c3" file "-" "$f2" "$f3"
    read -r c1 c2 c3 <<<"$par_cmd"; read -r f1 f2 f3 <<<"$par_file"
    printf '%s\n' "parallel query ($c3 workers launched), $RK_ROWS rows, $RK_PAR_RUNS executions in one session after the first load:"
    printf '%s\n' "  $RK_PARALLEL"
    printf '  %-8s %26s %16s\n' source "command runs per execution" "median ms"
    printf '  %-8s %26s %16s\n' command "$c1" "$c2" file "-" "$f2"
    read -r c1 c2 c3 <<<"$pgb_cmd"; read -r f1 f2 f3 <<<"$pgb_file"
    printf '%s\n' "pgbench -C -c 2 -j 2 -T $RK_PGBENCH_SECONDS (a new connection per transaction), one decryption per transaction, best of 2 alternating runs:"
    printf '  %-8s %10s %14s %14s\n' source tps "command runs" transactions
    printf '  %-8s %10.1f %14s %14s\n' command "$c1" "$c2" "$c3" file "$f1" "-" "$f3"
    rk_source file
}

# Keyring grants (README "Keyring access"): encrypt_gcm/decrypt_gcm under a
# keyring as an application role that holds per-keyring grants (not an
# administrator, whose check is a flag), against the same functions without
# the check (benchmark build only), in the same run. Both count the
# encryption; only the grant check differs.
bench_grants() {
    log "section grants: preparing $ROWS rows"
    ensure_tokens
    bpsql -q -c "SET client_min_messages = warning" -c "
        SELECT manna_crypt.create_keyring('bench_grants');
        DO \$\$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_app') THEN
                CREATE ROLE bench_app IN ROLE manna_crypt_user;
            END IF;
        END \$\$;
        SELECT manna_crypt.grant_keyring_access('bench_grants', 'bench_app', 'encrypt'),
               manna_crypt.grant_keyring_access('bench_grants', 'bench_app', 'decrypt');
        -- Other keyrings and grants, so the role's map is not a single entry.
        SELECT manna_crypt.create_keyring('bench_other_' || i),
               manna_crypt.grant_keyring_access('bench_other_' || i, 'bench_app', 'decrypt')
          FROM generate_series(1, 20) i;
        CREATE TABLE bench.grants_ring AS
            SELECT manna_crypt.encrypt_gcm(v, 'bench_grants')::text AS c FROM bench.tokens;
        GRANT USAGE ON SCHEMA bench TO bench_app;
        GRANT SELECT ON bench.tokens, bench.grants_ring TO bench_app;
        GRANT SELECT, UPDATE ON bench.results TO bench_app;
        GRANT EXECUTE ON FUNCTION manna_crypt._bench_encrypt_gcm_unchecked(text, text),
                                  manna_crypt._bench_decrypt_gcm_unchecked(text) TO bench_app;" \
        -c "VACUUM ANALYZE bench.grants_ring" >/dev/null

    record grants "floor: tokens"      "SELECT count(octet_length(v)) FROM bench.tokens"
    record grants "floor: grants_ring" "SELECT count(octet_length(c)) FROM bench.grants_ring"
    record grants "encrypt_gcm keyring, checked" \
        "SELECT count(octet_length(manna_crypt.encrypt_gcm(v, 'bench_grants'))) FROM bench.tokens" "floor: tokens"
    record grants "encrypt_gcm keyring, unchecked" \
        "SELECT count(octet_length(manna_crypt._bench_encrypt_gcm_unchecked(v, 'bench_grants'))) FROM bench.tokens" "floor: tokens"
    record grants "decrypt_gcm keyring, checked" \
        "SELECT count(octet_length(manna_crypt.decrypt_gcm(c))) FROM bench.grants_ring" "floor: grants_ring"
    record grants "decrypt_gcm keyring, unchecked" \
        "SELECT count(octet_length(manna_crypt._bench_decrypt_gcm_unchecked(c))) FROM bench.grants_ring" "floor: grants_ring"

    log "section grants: timing, $RUNS rounds, as bench_app"
    bpsql -q -c "SET client_min_messages = notice" -c "SET ROLE bench_app" -c "CALL bench.run('grants', $RUNS)"

    # The role really is checked (refused without a grant) and really decrypts.
    local ok
    ok=$(bpsql -qAt -c "SET ROLE bench_app" -c "SELECT
        (SELECT count(*) FROM bench.grants_ring WHERE manna_crypt.decrypt_gcm(c) LIKE 'access-sandbox-%') = $ROWS")
    [ "$ok" = t ] || die "the benchmarked decryption did not return the plaintexts"
    if bpsql -qAt -c "SET ROLE bench_app" -c "SELECT manna_crypt.encrypt_gcm('x', 'bench_other_1')" >/dev/null 2>&1; then
        die "bench_app encrypted without a grant: the check is not in the benchmarked build"
    fi

    echo
    echo "== grants: $ROWS rows of 51-character tokens as a role with keyring grants, one core, best of $RUNS rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
    report grants
    ratios grants \
        "'encrypt: checked / unchecked', 'encrypt_gcm keyring, checked', 'encrypt_gcm keyring, unchecked', 1.05, 1" \
        "'decrypt: checked / unchecked', 'decrypt_gcm keyring, checked', 'decrypt_gcm keyring, unchecked', 1.05, 2"
}

# ---- main ----------------------------------------------------------------------

main() {
    local wanted=("$@") s
    [ ${#wanted[@]} -gt 0 ] || wanted=("${SECTIONS[@]}")
    for s in "${wanted[@]}"; do
        declare -F "bench_$s" >/dev/null || die "unknown section '$s' (sections: ${SECTIONS[*]})"
    done
    # The benchmark build: the release build plus the baselines of the gcm
    # section (uncounted), the access section's switch and the grants
    # section (unchecked): functions no release has.
    MC_CARGO_FEATURES="bench_uncounted bench_unchecked" "$MC_ROOT/scripts/setup.sh"
    start_cluster
    for s in "${wanted[@]}"; do
        "bench_$s"
    done
}

main "$@"
