#!/usr/bin/env bash
# Benchmarks (not tests: they report numbers and never fail on them).
#
#   scripts/bench.sh              every section
#   scripts/bench.sh gcm          only the named sections
#
# Sections: gcm - encrypt_gcm / decrypt_gcm (raw key and keyring) against
#                 pgcrypto's encrypt()/decrypt() with AES-256-CBC
#           columns - a column of ciphertexts made encrypted_text-only:
#                 ALTER ... TYPE manna_crypt.encrypted_text against a CHECK
#                 added NOT VALID and then validated (time, rewrite, locks)
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

SECTIONS=(gcm columns migrate locking)
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
        "'decrypt_gcm keyring / raw key', 'decrypt_gcm keyring', 'decrypt_gcm raw key', 1.1, 4"
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

# Cost of the optimistic-locking trigger under pgbench (its own cluster; see
# scripts/bench_locking.sh).
bench_locking() {
    "$MC_ROOT/scripts/bench_locking.sh"
}

# ---- main ----------------------------------------------------------------------

main() {
    local wanted=("$@") s
    [ ${#wanted[@]} -gt 0 ] || wanted=("${SECTIONS[@]}")
    for s in "${wanted[@]}"; do
        declare -F "bench_$s" >/dev/null || die "unknown section '$s' (sections: ${SECTIONS[*]})"
    done
    "$MC_ROOT/scripts/setup.sh"
    start_cluster
    for s in "${wanted[@]}"; do
        "bench_$s"
    done
}

main "$@"
