#!/usr/bin/env bash
# Installs everything manna_crypt needs on a fresh Debian 12 machine (as root,
# or as a user with sudo), then builds the extension and installs it into
# PostgreSQL. Idempotent: a second run only rebuilds.
#
#   scripts/setup.sh            system packages, cargo-pgrx, build, install
#   scripts/setup.sh --deps     system packages and cargo-pgrx only
set -euo pipefail
source "$(dirname "$0")/common.sh"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

need_pkgs=()
for p in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-contrib libclang-dev clang pkg-config \
         sudo python3-venv postgresql-$PG_MAJOR-cron bc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing system packages: ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# The Debian package starts a default cluster on port 5432; manna_crypt's
# scripts use their own clusters and do not need it.
check_pg_config

if ! command -v cargo >/dev/null; then
    die "cargo not found: install Rust (rustup) first"
fi
if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
    log "installing cargo-pgrx $PGRX_VERSION (about 4 minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
# cargo pgrx test/run find PostgreSQL through this entry: it must name
# PG_CONFIG itself, not just any pg_config of the same major version.
if ! grep -qxF "pg$PG_MAJOR = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
    log "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
    cargo pgrx init --pg"$PG_MAJOR" "$PG_CONFIG" >/dev/null
fi

[ "${1:-}" = "--deps" ] && exit 0

log "building and installing manna_crypt into PostgreSQL $PG_MAJOR"
cd "$MC_ROOT"
install_extension
log "installed: $("$PG_CONFIG" --sharedir)/extension/manna_crypt.control"
