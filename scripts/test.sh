#!/usr/bin/env bash
# The whole test suite. Exits non-zero on any failure.
#
#   1. style: cargo fmt --check, cargo clippy -D warnings
#   2. the pure core: cargo test -p manna_crypt_core (incl. Wycheproof, Fernet spec)
#   3. backend tests: cargo pgrx test (#[pg_test])
#   4. the SQL contract: pg_regress over tests/pg_regress against a real cluster
#   5. real clients: pytest over tests/python (psycopg, SQLAlchemy, Alembic,
#      Python cryptography), including multi-cluster tests
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

"$MC_ROOT/scripts/setup.sh" --deps
log "PostgreSQL $PG_MAJOR: $PG_CONFIG"

log "style: cargo fmt --check"
cargo fmt --all -- --check
# rustfmt silently leaves alone any statement holding a line it cannot fit
# in 100 columns (a long string literal): no such line may exist, so every
# statement is really formatted. SQL goes in named constants with `\`
# continuation lines.
long=$(grep -rn --include='*.rs' '.\{101,\}' src core/src || true)
[ -z "$long" ] || { printf '%s\n' "$long" >&2; die "Rust lines over 100 columns (rustfmt skips them)"; }
log "style: cargo clippy -D warnings"
# Cargo.toml's default feature is pg15: switch it off so exactly one pgNN
# feature, the one for PG_MAJOR (scripts/common.sh), is on.
cargo clippy --workspace --all-targets --no-default-features --features "pg$PG_MAJOR pg_test" -- -D warnings

log "core unit tests"
cargo test -p manna_crypt_core --release

log "backend tests: cargo pgrx test"
PGRX_DATA="$MC_ROOT/target/pgrx-test-data"
mkdir -p "$PGRX_DATA"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$PGRX_DATA"
if [ "$(id -u)" = 0 ]; then
    CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA="$PGRX_DATA" cargo pgrx test "pg$PG_MAJOR"
else
    cargo pgrx test "pg$PG_MAJOR"
fi

log "installing the release build for the cluster tests"
install_extension

CLUSTER="$MC_ROOT/target/mc-test"
PORT=${MC_TEST_PORT:-55432}
cluster_stop "$CLUSTER"
rm -rf "$CLUSTER"
cluster_start "$CLUSTER" "$PORT" "log_min_messages = warning"
trap 'cluster_stop "$CLUSTER"' EXIT

log "SQL contract: pg_regress"
REGRESS_OUT="$MC_ROOT/target/pg_regress"
rm -rf "$REGRESS_OUT"; mkdir -p "$REGRESS_OUT"
tests=$(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$//' | sort)
PGXS=$(dirname "$("$PG_CONFIG" --pgxs)")
"$PGXS/../test/regress/pg_regress" \
    --inputdir=tests/pg_regress --outputdir="$REGRESS_OUT" \
    --host="$CLUSTER" --port="$PORT" --dbname=mc_regress \
    --bindir="$(pg_bindir)" $tests \
    || { cat "$REGRESS_OUT/regression.diffs" 2>/dev/null | head -n 200; die "pg_regress failed"; }

log "client tests: pytest"
VENV="$MC_ROOT/target/venv"
ensure_venv
# The PostgreSQL programs the client tests run (initdb, pg_ctl, psql,
# pg_dump, pg_restore, pg_basebackup) come from PG_CONFIG's bin directory.
export MC_PG_BIN
MC_PG_BIN="$(pg_bindir)"
MC_PGHOST="$CLUSTER" MC_PGPORT="$PORT" MC_CLUSTER_DIR="$CLUSTER" MC_ROOT="$MC_ROOT" \
    "$VENV/bin/pytest" -q --tb=short -p no:cacheprovider tests/python "$@"
