#!/usr/bin/env bash
# The whole test suite. Exits non-zero on any failure. Prints the time of
# each phase at the end.
#
# On PostgreSQL $PG_MAJOR (15; PG_MAJOR and PG_CONFIG in scripts/common.sh),
# everything:
#   1. style: cargo fmt --check, no Rust line over 100 columns, cargo clippy
#      -D warnings (once: no code is compiled differently per PostgreSQL
#      version, so one version's lints are every version's)
#   2. the pure core: cargo test -p manna_crypt_core (incl. Wycheproof, Fernet spec)
#   3. backend tests: cargo pgrx test (#[pg_test])
#   4. the release build installed into PG_CONFIG's PostgreSQL, and release
#      0.1.0 built into a private copy of it for the upgrade test
#      (scripts/prepare_upgrade.sh)
#   5. the SQL contract: pg_regress over tests/pg_regress against a real cluster
#   6. real clients: pytest over tests/python (psycopg, SQLAlchemy, Alembic,
#      Python cryptography), including multi-cluster tests and the upgrade
#      from 0.1.0 (test_upgrade.py)
# On each other version of MC_TEST_MAJORS (16 and 18, from target/pg/NN):
#   7. backend tests: cargo pgrx test pgNN
#   8. a debug build installed into that version, the SQL contract against a
#      cluster of it, and the client tests marked all_versions
#
# Clusters listen on MC_TEST_PORT (default 55432) and the next ports, one per
# version in MC_TEST_MAJORS order, then one for the upgrade test's cluster.
# Arguments are passed to the main run's pytest.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

PHASES=() PHASE="" PHASE_START=$SECONDS
# phase NAME: ends the running phase (its time goes into the summary) and
# starts NAME; `phase ""` only ends it.
phase() {
    [ -z "$PHASE" ] || PHASES+=("$(printf '%6ds  %s' $((SECONDS - PHASE_START)) "$PHASE")")
    PHASE=$1 PHASE_START=$SECONDS
    [ -z "$PHASE" ] || log "$PHASE  [at ${SECONDS}s]"
}
summary() {
    phase ""
    printf '\n%s\n' "time per phase:" >&2
    printf '%s\n' "${PHASES[@]}" >&2
    printf '%6ds  total\n' "$SECONDS" >&2
}

# Clusters started so far ("dir pg_config" lines), all stopped on exit.
STARTED=()
stop_all() {
    local entry
    for entry in "${STARTED[@]}"; do
        PG_CONFIG=${entry#* } cluster_stop "${entry%% *}"
    done
}
trap 'stop_all; summary' EXIT

PGRX_DATA="$MC_ROOT/target/pgrx-test-data"
mkdir -p "$PGRX_DATA"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$PGRX_DATA"
# pgrx_test MAJOR: the #[pg_test] backend tests on PostgreSQL MAJOR (its
# pg_config from PGRX_HOME's config.toml, written by scripts/setup.sh).
pgrx_test() {
    if [ "$(id -u)" = 0 ]; then
        CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA="$PGRX_DATA" cargo pgrx test "pg$1"
    else
        cargo pgrx test "pg$1"
    fi
}

# fresh_cluster DIR PORT: a new cluster of PG_CONFIG's PostgreSQL.
fresh_cluster() {
    cluster_stop "$1"
    rm -rf "$1"
    STARTED+=("$1 $PG_CONFIG")
    cluster_start "$1" "$2" "log_min_messages = warning"
}

# regress DIR PORT: the SQL contract against the cluster in DIR. Output
# that legitimately differs by PostgreSQL version has an alternative
# expected file (expected/NAME_1.out), which pg_regress accepts as well.
regress() {
    local out="$MC_ROOT/target/pg_regress/pg$PG_MAJOR" tests pgxs
    rm -rf "$out"; mkdir -p "$out"
    tests=$(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$//' | sort)
    pgxs=$(dirname "$("$PG_CONFIG" --pgxs)")
    "$pgxs/../test/regress/pg_regress" \
        --inputdir=tests/pg_regress --outputdir="$out" \
        --host="$1" --port="$2" --dbname=mc_regress \
        --bindir="$(pg_bindir)" $tests \
        || { head -n 200 "$out/regression.diffs" 2>/dev/null; die "pg_regress failed on PostgreSQL $PG_MAJOR"; }
}

# client_tests DIR PORT [pytest args...]: tests/python against the cluster
# in DIR; the PostgreSQL programs the tests run (initdb, pg_ctl, psql,
# pg_dump, pg_restore, pg_basebackup) come from PG_CONFIG's bin directory.
client_tests() {
    local dir=$1 port=$2; shift 2
    MC_PG_BIN="$(pg_bindir)" MC_PGHOST="$dir" MC_PGPORT="$port" MC_CLUSTER_DIR="$dir" MC_ROOT="$MC_ROOT" \
        "$MC_ROOT/target/venv/bin/pytest" -q --tb=short -p no:cacheprovider --strict-markers \
        tests/python "$@"
}

phase "dependencies: scripts/setup.sh --deps"
"$MC_ROOT/scripts/setup.sh" --deps
ensure_venv
log "PostgreSQL $PG_MAJOR: $PG_CONFIG; also tested: $(for m in $MC_TEST_MAJORS; do [ "$m" = "$PG_MAJOR" ] || printf '%s ' "$m"; done)"
PORT=${MC_TEST_PORT:-55432}

phase "style: cargo fmt --check"
cargo fmt --all -- --check
# rustfmt silently leaves alone any statement holding a line it cannot fit
# in 100 columns (a long string literal): no such line may exist, so every
# statement is really formatted. SQL goes in named constants with `\`
# continuation lines.
long=$(grep -rn --include='*.rs' '.\{101,\}' src core/src || true)
[ -z "$long" ] || { printf '%s\n' "$long" >&2; die "Rust lines over 100 columns (rustfmt skips them)"; }
phase "style: cargo clippy -D warnings"
# Cargo.toml's default feature is pg15: switch it off so exactly one pgNN
# feature, the one for PG_MAJOR (scripts/common.sh), is on.
cargo clippy --workspace --all-targets --no-default-features --features "pg$PG_MAJOR pg_test" -- -D warnings

phase "core unit tests"
cargo test -p manna_crypt_core --release

phase "PostgreSQL $PG_MAJOR: backend tests (cargo pgrx test pg$PG_MAJOR)"
pgrx_test "$PG_MAJOR"

phase "PostgreSQL $PG_MAJOR: installing the release build"
install_extension

phase "PostgreSQL $PG_MAJOR: release 0.1.0 for the upgrade test (scripts/prepare_upgrade.sh)"
MC_UPGRADE_PG_CONFIG=$("$MC_ROOT/scripts/prepare_upgrade.sh")

phase "PostgreSQL $PG_MAJOR: SQL contract (pg_regress)"
CLUSTER="$MC_ROOT/target/mc-test"
fresh_cluster "$CLUSTER" "$PORT"
regress "$CLUSTER" "$PORT"

phase "PostgreSQL $PG_MAJOR: client tests (pytest)"
MC_PG_CONFIG="$PG_CONFIG" MC_UPGRADE_PG_CONFIG="$MC_UPGRADE_PG_CONFIG" MC_UPGRADE_PORT=$((PORT + 3)) \
    client_tests "$CLUSTER" "$PORT" "$@"
cluster_stop "$CLUSTER"

# other_version MAJOR PORT: what runs on every other tested version. The
# helpers of scripts/common.sh read PG_MAJOR and PG_CONFIG, so both are
# local to this call.
other_version() {
    local major=$1 port=$2 pgc
    pgc=$(pg_config_for "$major")
    local PG_MAJOR=$major PG_CONFIG=$pgc
    check_pg_config

    phase "PostgreSQL $major: backend tests (cargo pgrx test pg$major)"
    pgrx_test "$major"

    phase "PostgreSQL $major: installing a debug build"
    cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null

    phase "PostgreSQL $major: SQL contract (pg_regress)"
    local dir="$MC_ROOT/target/mc-test-pg$major"
    fresh_cluster "$dir" "$port"
    regress "$dir" "$port"

    phase "PostgreSQL $major: client tests marked all_versions (pytest -m all_versions)"
    client_tests "$dir" "$port" -m all_versions
    cluster_stop "$dir"
}

n=0
for major in $MC_TEST_MAJORS; do
    n=$((n + 1))
    [ "$major" = "$PG_MAJOR" ] || other_version "$major" $((PORT + n - 1))
done
log "all tests passed on PostgreSQL $MC_TEST_MAJORS"
