#!/usr/bin/env bash
# Benchmark: what manna_crypt.redact_log costs (README "Keeping plaintext out
# of the server log"), measured with pgbench. Not a test: it prints numbers.
#
# pgbench's own select-only transaction (-S) over the simple protocol
# (-M simple: every statement is parsed and analyzed, so the
# post_parse_analyze_hook runs each time), with redact_log off and on:
#   quiet   no statement logging: the cost of the analysis hook alone;
#   logged  log_statement = all: the emit_log_hook judges (lexes) every line;
#   crypt   log_statement = all, a statement that calls encrypt_gcm: every
#           line is judged sensitive and rewritten.
# Runs alternate off/on, BENCH_RUNS times each; the best TPS of each counts
# (a burst of load elsewhere then hits one run of each, not all of one).
#
# Assumes the extension is installed in $PG_CONFIG's PostgreSQL (the release
# build for meaningful numbers: scripts/bench.sh installs it first).
# Uses its own throwaway cluster in target/bench-redact on port 55477.
#
# Settings (environment): BENCH_RUNS (3), BENCH_SECONDS (10), BENCH_CLIENTS (2),
# BENCH_PORT (55477), BENCH_WORKLOADS ("quiet logged crypt").
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

RUNS=${BENCH_RUNS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
CLIENTS=${BENCH_CLIENTS:-2}
PORT=${BENCH_PORT:-55477}
read -r -a WORKLOADS <<<"${BENCH_WORKLOADS:-quiet logged crypt}"
DIR="$MC_ROOT/target/bench-redact"
DB=bench_redact
PGBENCH="$(pg_bindir)/pgbench"
[ -x "$PGBENCH" ] || die "pgbench not found in $(pg_bindir)"

WORK=$(mktemp -d)
chmod 755 "$WORK"
cleanup() {
    cluster_stop "$DIR"
    rm -rf "$WORK"
}
trap cleanup EXIT

log "starting a throwaway cluster in $DIR on port $PORT"
cluster_stop "$DIR"
rm -rf "$DIR"
cluster_start "$DIR" "$PORT" "synchronous_commit = off" "log_min_messages = warning" \
    "max_parallel_workers_per_gather = 0" "jit = off" >/dev/null
psql_() { cluster_psql "$DIR" "$PORT" "$@"; }
psql_ postgres -q -c "CREATE DATABASE $DB"
"$PGBENCH" -h "$DIR" -p "$PORT" -U postgres -i -s 2 -q "$DB" >/dev/null 2>&1
psql_ "$DB" -q -c "SET client_min_messages = warning" -c "CREATE EXTENSION manna_crypt" \
    -c "SELECT manna_crypt.create_keyring('bench')" >/dev/null
echo "SELECT manna_crypt.encrypt_gcm('access-sandbox-0123456789', 'bench');" >"$WORK/crypt.sql"
chmod a+r "$WORK/crypt.sql"

# set_config LOG_STATEMENT REDACT: server-wide, then a reload.
set_config() {
    psql_ postgres -q -c "ALTER SYSTEM SET log_statement = '$1'" \
        -c "ALTER SYSTEM SET manna_crypt.redact_log = '$2'" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
}

# tps WORKLOAD: one pgbench run; prints its TPS.
tps() {
    local args=(-S) out
    [ "$1" = crypt ] && args=(-f "$WORK/crypt.sql")
    out=$("$PGBENCH" -h "$DIR" -p "$PORT" -U postgres -n -M simple -c "$CLIENTS" -j "$CLIENTS" \
        -T "$SECONDS_PER_RUN" "${args[@]}" "$DB" 2>&1) \
        || { printf '%s\n' "$out" >&2; die "pgbench failed"; }
    printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -n 1
}

declare -A best
for workload in "${WORKLOADS[@]}"; do
    logging=all
    [ "$workload" = quiet ] && logging=none
    for ((i = 1; i <= RUNS; i++)); do
        for redact in off on; do
            set_config "$logging" "$redact"
            log "$workload, redact_log = $redact, run $i of $RUNS"
            t=$(tps "$workload")
            key="$workload/$redact"
            best[$key]=$(printf '%s\n%s\n' "${best[$key]:-0}" "$t" | sort -g -r | head -n 1)
        done
    done
done

echo
echo "== redact: pgbench -M simple -c $CLIENTS -T $SECONDS_PER_RUN," \
    "best of $RUNS alternating runs" \
    "(load average: $(cut -d' ' -f1-3 /proc/loadavg)) =="
printf '  %-8s %-44s %12s %12s %10s\n' workload statement "tps off" "tps on" "on/off"
for workload in "${WORKLOADS[@]}"; do
    case $workload in
        quiet) what="pgbench -S, log_statement = none" ;;
        logged) what="pgbench -S, log_statement = all" ;;
        crypt) what="encrypt_gcm literal, log_statement = all" ;;
    esac
    off=${best[$workload/off]} on=${best[$workload/on]}
    printf '  %-8s %-44s %12.1f %12.1f %10s\n' "$workload" "$what" "$off" "$on" \
        "$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')"
done
