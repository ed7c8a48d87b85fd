#!/usr/bin/env bash
# Benchmark: blind indexes (README "Blind indexes", "Performance"). Not a
# test: it prints numbers, each beside its baseline from the same run.
#
#   1. lookups: the latency of one equality lookup through the blind index,
#      end to end from a Python client (psycopg, TCP to 127.0.0.1, a
#      prepared statement), on BENCH_ROWS (1,000,000) rows, against the same
#      lookup on a plaintext column with a btree index (the floor); lookups
#      alternate between the two; p50 and p99 over BENCH_LOOKUPS (5,000) each.
#   2. blind_index() calls per second over BENCH_ROWS short values, against
#      PostgreSQL's own sha256() on the same values, both net of the scan
#      (count(v)); best of 5, one core.
#   3. backfill: CALL backfill_blind_index after rotate_index_key (every row
#      rewritten), against an UPDATE that sets an indexed bytea column on the
#      same rows of a copy of the table (non-HOT, like the backfill: the
#      floor); best of BENCH_RUNS (3) alternating rounds.
#
# Assumes the extension is installed in $PG_CONFIG's PostgreSQL (the release
# build for meaningful numbers: scripts/bench.sh installs it first). Its own
# throwaway cluster in target/bench-blind on port BENCH_PORT (55476).
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

ROWS=${BENCH_ROWS:-1000000}
LOOKUPS=${BENCH_LOOKUPS:-5000}
RUNS=${BENCH_RUNS:-3}
PORT=${BENCH_PORT:-55476}
DIR="$MC_ROOT/target/bench-blind"
DB=bench_blind
PY="$MC_ROOT/target/venv/bin/python"
[ -x "$PY" ] || die "no venv at target/venv (scripts/test.sh or scripts/bench.sh creates it)"

trap 'cluster_stop "$DIR"' EXIT
log "starting a throwaway cluster in $DIR on port $PORT"
cluster_stop "$DIR"
rm -rf "$DIR"
cluster_start "$DIR" "$PORT" "shared_buffers = 1GB" "max_parallel_workers_per_gather = 0" \
    "jit = off" "log_min_messages = warning" >/dev/null
psql_() { cluster_psql "$DIR" "$PORT" "$DB" "$@"; }
cluster_psql "$DIR" "$PORT" postgres -q -c "CREATE DATABASE $DB"

log "preparing $ROWS rows (each encrypted and indexed by the protect trigger)"
psql_ -q >/dev/null <<SQL
SET client_min_messages = warning;
CREATE EXTENSION manna_crypt;
SELECT manna_crypt.create_keyring('pii');
CREATE TABLE vals AS SELECT g AS id, 'user' || g || '@example.com' AS v FROM generate_series(1, $ROWS) g;
CREATE TABLE users (id bigint PRIMARY KEY, email text, email_bidx bytea);
SELECT manna_crypt.protect_column('users', 'email', 'pii', 'id',
       blind_index_column => 'email_bidx', normalization => 'email');
INSERT INTO users (id, email) SELECT id, v FROM vals;
CREATE INDEX users_bidx ON users (email_bidx);
CREATE TABLE plain_users (id bigint PRIMARY KEY, email text);
INSERT INTO plain_users SELECT id, v FROM vals;
CREATE INDEX plain_users_email ON plain_users (email);
-- The backfill's floor: the same rows, an indexed bytea column set by UPDATE.
CREATE TABLE floor_users AS SELECT * FROM users;
ALTER TABLE floor_users ADD PRIMARY KEY (id);
CREATE INDEX floor_users_bidx ON floor_users (email_bidx);
VACUUM ANALYZE vals, users, plain_users, floor_users;
SQL

# ---- 1. lookups -------------------------------------------------------------------
log "lookups: $LOOKUPS each, alternating"
"$PY" - "$PORT" "$DB" "$ROWS" "$LOOKUPS" <<'PY'
import random, statistics, sys, time
import psycopg
port, db, rows, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conn = psycopg.connect(f"host=127.0.0.1 port={port} dbname={db} user=postgres", autocommit=True)
blind = "SELECT id FROM users WHERE email_bidx = ANY(manna_crypt.blind_index_all(%s, 'pii', 'email'))"
plain = "SELECT id FROM plain_users WHERE email = %s"
times = {"blind": [], "plain": []}
rng = random.Random(7)
for i in range(n + 200):
    k = rng.randint(1, rows)
    for name, sql, value in (("plain", plain, f"user{k}@example.com"),
                             ("blind", blind, f"USER{k}@Example.com ")):
        t0 = time.perf_counter()
        got = conn.execute(sql, (value,), prepare=True).fetchall()
        dt = (time.perf_counter() - t0) * 1000
        assert got == [(k,)], (name, k, got)
        if i >= 200:  # warm-up: plans prepared, caches filled
            times[name].append(dt)
plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + blind, ("x",)))
assert "Index Cond" in plan, plan
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]
print(f"\n== blind index lookups: {rows:,} rows, {n:,} lookups each, psycopg over TCP 127.0.0.1 ==")
print(f"  {'lookup':44} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
for name, label in (("plain", "plaintext column, btree (floor)"),
                    ("blind", "blind_index_all(), btree on the term column")):
    xs = times[name]
    print(f"  {label:44} {pct(xs, 50):8.3f} {pct(xs, 99):8.3f} {statistics.mean(xs):8.3f}")
print("  target: blind p50 <= 1 ms, p99 <= 3 ms")
PY

# ---- 2. blind_index() throughput ------------------------------------------------------
log "blind_index() calls per second: best of 5"
psql_ -q -P footer=off <<'SQL'
SET client_min_messages = warning;
CREATE TEMP TABLE t (name text PRIMARY KEY, ms float8);
DO $$
DECLARE t0 timestamptz; q record;
BEGIN
  FOR i IN 1..5 LOOP
    FOR q IN SELECT * FROM (VALUES
        ('scan: count(v) (floor)', 'SELECT count(v) FROM vals'),
        ('sha256(v::bytea)', 'SELECT count(sha256(v::bytea)) FROM vals'),
        ('manna_crypt.blind_index(v, ''pii'', ''none'')', 'SELECT count(manna_crypt.blind_index(v, ''pii'', ''none'')) FROM vals'),
        ('manna_crypt.blind_index(v, ''pii'', ''email'')', 'SELECT count(manna_crypt.blind_index(v, ''pii'', ''email'')) FROM vals')
      ) AS x(name, sql) LOOP
      t0 := clock_timestamp();
      EXECUTE q.sql;
      INSERT INTO t VALUES (q.name, extract(epoch FROM clock_timestamp() - t0) * 1000)
      ON CONFLICT (name) DO UPDATE SET ms = least(t.ms, excluded.ms);
    END LOOP;
  END LOOP;
END $$;
\echo
\echo == blind_index() throughput: one core, best of 5 ==
SELECT t.name AS query, round(t.ms)::int AS "ms (best)",
       CASE WHEN t.name LIKE 'scan%' THEN NULL
            ELSE to_char((SELECT count(*) FROM vals) / ((t.ms - f.ms) / 1000), '999,999,990') END
         AS "calls/s net of the scan"
  FROM t, t f WHERE f.name LIKE 'scan%' ORDER BY t.ms;
\echo target: blind_index() >= 1,000,000 calls/s
SQL

# ---- 3. backfill ----------------------------------------------------------------------
ms() { date +%s%N | cut -c1-13; }
best_floor="" best_fill=""
for round in $(seq 1 "$RUNS"); do
    log "backfill round $round of $RUNS"
    psql_ -q -c "VACUUM floor_users" >/dev/null
    t0=$(ms)
    psql_ -q -c "UPDATE floor_users SET email_bidx = sha256(email::bytea)" >/dev/null
    t1=$(ms)
    psql_ -q -c "VACUUM users" -c "SELECT manna_crypt.rotate_index_key('pii')" >/dev/null
    t2=$(ms)
    psql_ -q -c "SET client_min_messages = warning" \
        -c "CALL manna_crypt.backfill_blind_index('users', 'email')" >/dev/null
    t3=$(ms)
    floor=$((t1 - t0)) fill=$((t3 - t2))
    if [ -z "$best_floor" ] || [ "$floor" -lt "$best_floor" ]; then best_floor=$floor; fi
    if [ -z "$best_fill" ] || [ "$fill" -lt "$best_fill" ]; then best_fill=$fill; fi
done
left=$(psql_ -qAt -c "SELECT count(*) FROM users WHERE substr(email_bidx, 2, 4) <> (
    SELECT int4send(key_id) FROM manna_crypt.keys WHERE keyring = 'pii' AND purpose = 'index' AND status = 'active')")
[ "$left" = 0 ] || die "the backfill left $left rows under an older index key"
echo
echo "== backfill: $ROWS rows, best of $RUNS rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
printf '  %-58s %10s\n' "operation" "ms (best)"
printf '  %-58s %10s\n' "UPDATE ... SET indexed bytea column = sha256(email) (floor)" "$best_floor"
printf '  %-58s %10s\n' "CALL backfill_blind_index (after rotate_index_key)" "$best_fill"
awk -v a="$best_fill" -v b="$best_floor" 'BEGIN { printf "  ratio %.2f (target <= 1.5)\n", a / b }'
