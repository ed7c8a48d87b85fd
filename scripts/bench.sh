#!/usr/bin/env bash
# Benchmarks (not tests: they report numbers and never fail on them).
#
#   scripts/bench.sh              every section
#   scripts/bench.sh gcm          only the named sections
#
# Sections: gcm - encrypt_gcm / decrypt_gcm (raw key and keyring) against
#                 pgcrypto's encrypt()/decrypt() with AES-256-CBC
#           protect - INSERT and COPY of MC_BENCH_ROWS/10 rows into a
#                 protected column (trigger) against explicit encrypt_gcm
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

SECTIONS=(gcm protect migrate locking)
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
    # The benchmark build: the release build plus the uncounted baseline of
    # the gcm section (a function no release has).
    MC_CARGO_FEATURES=bench_uncounted "$MC_ROOT/scripts/setup.sh"
    start_cluster
    for s in "${wanted[@]}"; do
        "bench_$s"
    done
}

main "$@"
