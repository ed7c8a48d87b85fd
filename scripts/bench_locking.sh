#!/usr/bin/env bash
# Benchmark: the cost of the optimistic-locking trigger (manna_crypt.version_bump)
# on single-row UPDATEs, measured with pgbench. Not a test: it prints numbers.
#
# Two tables with the same schema and rows,
#     id int PRIMARY KEY, cursor bigint NOT NULL, version bigint NOT NULL DEFAULT 1
# one with manna_crypt.enable_optimistic_locking(), one without, and the same
# pgbench script against each:
#     \set id random(1, :rows)
#     UPDATE <table> SET cursor = cursor + 1 WHERE id = :id;
# Runs alternate between the tables; the summary gives every run's TPS, the
# median per table and the overhead (tps_plain - tps_trigger) / tps_plain.
# Target: <= 10 %.
#
# Assumes the extension is installed in $PG_CONFIG's PostgreSQL (the release
# build for meaningful numbers: scripts/bench.sh installs it first).
# Uses its own throwaway cluster in target/bench-locking on port 55478.
#
# Settings (environment): BENCH_RUNS (3), BENCH_SECONDS (10), BENCH_CLIENTS (2),
# BENCH_ROWS (10000), BENCH_PORT (55478).
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

RUNS=${BENCH_RUNS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
CLIENTS=${BENCH_CLIENTS:-2}
ROWS=${BENCH_ROWS:-10000}
PORT=${BENCH_PORT:-55478}
DIR="$MC_ROOT/target/bench-locking"
DB=bench_locking
BIN=$(pg_bindir)
PGBENCH="$BIN/pgbench"
[ -x "$PGBENCH" ] || die "pgbench not found in $BIN"
LIB="$("$PG_CONFIG" --pkglibdir)/manna_crypt.so"
[ -f "$LIB" ] || die "manna_crypt is not installed ($LIB missing): run cargo pgrx install first"

LIB_STAMP_START=$(stat -c '%s %Y' "$LIB")

WORK=$(mktemp -d)
cleanup() {
    cluster_stop "$DIR"
    rm -rf "$WORK"
}
trap cleanup EXIT

log "starting a throwaway cluster in $DIR on port $PORT"
cluster_stop "$DIR"
rm -rf "$DIR"
cluster_start "$DIR" "$PORT" "synchronous_commit = off" "log_min_messages = warning" >/dev/null
psql_() { cluster_psql "$DIR" "$PORT" "$@"; }

psql_ postgres -q -c "CREATE DATABASE $DB"
psql_ "$DB" -q >/dev/null <<SQL
SET client_min_messages = warning;
CREATE EXTENSION manna_crypt;
CREATE TABLE plain_t   (id int PRIMARY KEY, cursor bigint NOT NULL, version bigint NOT NULL DEFAULT 1);
CREATE TABLE trigger_t (id int PRIMARY KEY, cursor bigint NOT NULL, version bigint NOT NULL DEFAULT 1);
INSERT INTO plain_t   (id, cursor) SELECT g, 0 FROM generate_series(1, $ROWS) g;
INSERT INTO trigger_t (id, cursor) SELECT g, 0 FROM generate_series(1, $ROWS) g;
SELECT manna_crypt.enable_optimistic_locking('trigger_t');
-- reference for the paired run only: an empty PL/pgSQL BEFORE ROW trigger,
-- the cost any BEFORE UPDATE row trigger has in PostgreSQL (the executor
-- fetches and locks the old row for it) before the trigger does anything
CREATE TABLE noop_t (id int PRIMARY KEY, cursor bigint NOT NULL, version bigint NOT NULL DEFAULT 1);
INSERT INTO noop_t (id, cursor) SELECT g, 0 FROM generate_series(1, $ROWS) g;
CREATE FUNCTION noop_trigger() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
CREATE TRIGGER noop BEFORE INSERT OR UPDATE ON noop_t FOR EACH ROW EXECUTE FUNCTION noop_trigger();
VACUUM ANALYZE plain_t, trigger_t, noop_t;
SQL

for t in plain_t trigger_t noop_t; do
    printf '\\set id random(1, %d)\nUPDATE %s SET cursor = cursor + 1 WHERE id = :id;\n' "$ROWS" "$t" >"$WORK/$t.sql"
done

# run TABLE SECONDS -> prints "tps transactions"
run() {
    local table=$1 secs=$2 out
    psql_ "$DB" -q -c "VACUUM plain_t, trigger_t" -c "CHECKPOINT" >/dev/null
    out=$("$PGBENCH" -h "$DIR" -p "$PORT" -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$secs" \
        -f "$WORK/$table.sql" "$DB" 2>&1) || { printf '%s\n' "$out" >&2; die "pgbench failed"; }
    local tps xacts
    tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -n 1)
    xacts=$(printf '%s\n' "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
    [ -n "$tps" ] && [ -n "$xacts" ] || { printf '%s\n' "$out" >&2; die "could not parse pgbench output"; }
    echo "$tps $xacts"
}

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

log "warm-up (2 s per table)"
run plain_t 2 >/dev/null
run trigger_t 2 >/dev/null

declare -A tps_list=([plain_t]="" [trigger_t]="")
declare -A xact_total=([plain_t]=0 [trigger_t]=0)
# the warm-up updates count too for the version check below
psql_ "$DB" -qAt -c "SELECT sum(version) - count(*) FROM trigger_t" >"$WORK/warm"
warm_bumps=$(cat "$WORK/warm")

report_lines=()
for i in $(seq 1 "$RUNS"); do
    # alternate the order so neither table always runs first
    if [ $((i % 2)) = 1 ]; then order="plain_t trigger_t"; else order="trigger_t plain_t"; fi
    for t in $order; do
        log "run $i/$RUNS: $t (${SECONDS_PER_RUN} s, $CLIENTS clients)"
        read -r tps xacts < <(run "$t" "$SECONDS_PER_RUN")
        tps_list[$t]+=" $tps"
        xact_total[$t]=$(( ${xact_total[$t]} + xacts ))
        report_lines+=("$(printf '  run %d  %-10s %10.0f tps  (%d updates)' "$i" "$t" "$tps" "$xacts")")
    done
done

# sanity: the trigger really ran (every update bumped the version exactly
# once) and the plain table was not touched by it
read -r trig_bumps plain_bumps < <(psql_ "$DB" -qAt -F ' ' -c \
    "SELECT (SELECT sum(version) - count(*) FROM trigger_t), (SELECT sum(version) - count(*) FROM plain_t)")
expected_bumps=$(( warm_bumps + ${xact_total[trigger_t]} ))
sanity="ok"
if [ "$trig_bumps" != "$expected_bumps" ] || [ "$plain_bumps" != 0 ]; then
    sanity="FAILED: trigger_t versions advanced by $trig_bumps, expected $expected_bumps; plain_t by $plain_bumps, expected 0"
fi

# A cross-check that is robust against other load on the machine: one run
# with the scripts interleaved at random (pgbench -f a -f b -f c), so all
# tables see the same conditions; pgbench reports each script's mean latency.
# Per-client throughput is 1/latency, so the overhead is 1 - lat_plain/lat_trigger.
# noop_t (an empty PL/pgSQL trigger) shows what any BEFORE ROW trigger costs.
log "paired run: the three tables interleaved in one pgbench run ($((SECONDS_PER_RUN * 2)) s)"
psql_ "$DB" -q -c "VACUUM plain_t, trigger_t, noop_t" >/dev/null
paired=$("$PGBENCH" -h "$DIR" -p "$PORT" -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T $((SECONDS_PER_RUN * 2)) \
    -f "$WORK/plain_t.sql" -f "$WORK/trigger_t.sql" -f "$WORK/noop_t.sql" "$DB" 2>&1) || { printf '%s\n' "$paired" >&2; die "pgbench failed"; }
# per script: "SQL script N: <file>" ... " - latency average = X ms"
read -r lat_plain lat_trig lat_noop < <(printf '%s\n' "$paired" | awk '
    /^SQL script [0-9]+:/ { script = ($0 ~ /trigger_t/) ? "t" : ($0 ~ /noop_t/) ? "n" : "p" }
    /^ - latency average = / { lat[script] = $5 }
    END { print lat["p"], lat["t"], lat["n"] }')
[ -n "$lat_plain" ] && [ -n "$lat_trig" ] && [ -n "$lat_noop" ] || { printf '%s\n' "$paired" >&2; die "could not parse the paired pgbench output"; }
paired_overhead=$(awk -v p="$lat_plain" -v t="$lat_trig" 'BEGIN { printf "%.1f", (1 - p / t) * 100 }')
noop_overhead=$(awk -v p="$lat_plain" -v t="$lat_noop" 'BEGIN { printf "%.1f", (1 - p / t) * 100 }')

med_plain=$(echo "${tps_list[plain_t]}" | median)
med_trig=$(echo "${tps_list[trigger_t]}" | median)
overhead=$(awk -v p="$med_plain" -v t="$med_trig" 'BEGIN { printf "%.1f", (p - t) / p * 100 }')
verdict=$(awk -v o="$overhead" 'BEGIN { print (o <= 10 ? "within the 10 % target" : "ABOVE the 10 % target") }')
lib_info=$(stat -c '%s %y' "$LIB" | awk '{ printf "%.1f MB, installed %s %s", $1 / 1048576, $2, substr($3, 1, 8) }')
if [ "$(stat -c '%s %Y' "$LIB")" != "$LIB_STAMP_START" ]; then
    lib_info+="; WARNING: reinstalled during the benchmark, the numbers mix two builds"
fi

cat <<EOF

=== manna_crypt optimistic-locking trigger overhead (pgbench) ===
  library     $LIB ($lib_info)
  server      PostgreSQL $("$BIN/postgres" --version | awk '{ print $3 }'), fsync = off, synchronous_commit = off
  workload    single-row UPDATE ... SET cursor = cursor + 1 WHERE id = random(1, $ROWS)
              -M prepared -c $CLIENTS -j $CLIENTS, $RUNS runs x $SECONDS_PER_RUN s per table, alternating
$(printf '%s\n' "${report_lines[@]}")
  median      plain_t   $(printf '%10.0f' "$med_plain") tps
              trigger_t $(printf '%10.0f' "$med_trig") tps
  overhead    $overhead %  ($verdict)
  paired      one $((SECONDS_PER_RUN * 2)) s run, the tables' scripts interleaved at random (less sensitive
              to other load on the machine); mean latency per script:
                plain_t    $lat_plain ms
                trigger_t  $lat_trig ms   overhead $paired_overhead %
                noop_t     $lat_noop ms   overhead $noop_overhead %  (reference: empty PL/pgSQL BEFORE ROW trigger)
  check       $sanity
EOF
[ "$sanity" = ok ] || exit 1
