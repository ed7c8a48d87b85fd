#!/usr/bin/env bash
# Prepares the upgrade test (tests/python/test_upgrade.py): release 0.1.0,
# built from its commit in this repository's history, installed into a
# private copy of PG_CONFIG's PostgreSQL under target/upgrade/, where it
# cannot clobber the installation the other tests use. Prints the private
# copy's pg_config, the only line on standard output (scripts/test.sh
# exports it as MC_UPGRADE_PG_CONFIG); the build's output goes to stderr.
#
#   target/upgrade/src-0.1.0     `git archive` of the release commit
#   target/upgrade/files-0.1.0   the files 0.1.0 installs (library, control
#                                file, SQL script), kept while the commit,
#                                the PostgreSQL version and the toolchain are
#                                the same: a second run builds nothing
#   target/upgrade/pg            the private PostgreSQL, copied afresh every
#                                run with 0.1.0 installed, so no file of an
#                                earlier run's upgrade is left in it
#
# 0.1.0 is built in the repository's own target directory: its Cargo.lock
# and profiles are the current ones, so only its two crates are compiled
# (the dependencies' release builds are shared, and cargo keeps the two
# workspaces' crates apart by their paths). Except one output: a cdylib's
# file name carries no hash, so both builds write
# target/release/{,deps/}libmanna_crypt.so, and cargo takes whatever is
# there for the output of a build it finds fresh. So the current build's
# files are moved aside during the 0.1.0 build (which, finding no output,
# really builds 0.1.0) and moved back after it (times kept: cargo finds the
# current build fresh, with its own library).
set -euo pipefail
source "$(dirname "$0")/common.sh"

OLD_VERSION=0.1.0
OLD_COMMIT=6c6e0c3c3f7f357b9fd22daecc4402f2a9e67466
UP="$MC_ROOT/target/upgrade"
SRC="$UP/src-$OLD_VERSION" FILES="$UP/files-$OLD_VERSION" PRIVATE="$UP/pg"

check_pg_config

# The old release must come from history; without it there is no upgrade
# test, and a suite that silently skipped it would claim one.
require_old_commit() {
    git -C "$MC_ROOT" rev-parse --git-dir >/dev/null 2>&1 \
        || die "the upgrade test builds $OLD_VERSION from commit $OLD_COMMIT, but $MC_ROOT is not a git clone"
    git -C "$MC_ROOT" cat-file -e "$OLD_COMMIT^{commit}" 2>/dev/null && return 0
    if [ "$(git -C "$MC_ROOT" rev-parse --is-shallow-repository)" = true ]; then
        die "the upgrade test builds $OLD_VERSION from commit $OLD_COMMIT, which this shallow clone lacks: run 'git fetch --unshallow' (or clone without --depth)"
    fi
    die "the upgrade test builds $OLD_VERSION from commit $OLD_COMMIT, which is not in this clone's history"
}

# private_copy: PG_CONFIG's installation copied under $PRIVATE with its
# layout (bindir, pkglibdir, sharedir and server headers at the same places
# relative to their common ancestor). PostgreSQL finds its directories
# relative to its own programs, so the copy's pg_config, postgres and
# extension directory all point into the copy. Prints the copy's pg_config.
private_copy() {
    local dirs root d rel
    dirs=("$("$PG_CONFIG" --bindir)" "$("$PG_CONFIG" --pkglibdir)"
          "$("$PG_CONFIG" --sharedir)" "$("$PG_CONFIG" --includedir-server)")
    root=$(python3 -c 'import os, sys; print(os.path.commonpath(sys.argv[1:]))' "${dirs[@]}")
    rm -rf "$PRIVATE"
    for d in "${dirs[@]}"; do
        rel=${d#"$root"}
        mkdir -p "$(dirname "$PRIVATE$rel")"
        cp -a "$d" "$PRIVATE$rel"
    done
    chmod -R a+rX "$PRIVATE"
    local pgc="$PRIVATE${dirs[0]#"$root"}/pg_config"
    # Whatever PG_CONFIG's installation holds of manna_crypt is not 0.1.0.
    rm -f "$("$pgc" --sharedir)"/extension/manna_crypt[.-]* "$("$pgc" --pkglibdir)/manna_crypt.so"
    [ "$("$pgc" --sharedir)" = "$PRIVATE${dirs[2]#"$root"}" ] \
        || die "the copy of $PG_CONFIG is not relocatable: its pg_config reports $("$pgc" --sharedir)"
    echo "$pgc"
}

# The outputs named after the library alone (no hash): the cdylib, uplifted
# and in deps/, and their dep-info files.
SHARED_OUTPUTS=(release/libmanna_crypt.so release/libmanna_crypt.d
                release/deps/libmanna_crypt.so release/deps/manna_crypt.d)
set_aside() {
    local f
    for f in "${SHARED_OUTPUTS[@]}"; do
        f="$MC_ROOT/target/$f"
        rm -f "$f.current"
        if [ -e "$f" ]; then mv "$f" "$f.current"; fi
    done
}
put_back() {
    local f
    for f in "${SHARED_OUTPUTS[@]}"; do
        f="$MC_ROOT/target/$f"
        if [ -e "$f.current" ]; then mv -f "$f.current" "$f"; else rm -f "$f"; fi
    done
}

pgc=$(private_copy)
extdir="$("$pgc" --sharedir)/extension" libdir=$("$pgc" --pkglibdir)
stamp="$OLD_COMMIT $("$PG_CONFIG" --version) $(rustc --version) cargo-pgrx $(cargo pgrx --version)"

if [ "$(cat "$FILES/.stamp" 2>/dev/null)" != "$stamp" ]; then
    require_old_commit
    log "building manna_crypt $OLD_VERSION (commit ${OLD_COMMIT:0:7}) for the upgrade test"
    rm -rf "$SRC" "$FILES"
    mkdir -p "$SRC"
    git -C "$MC_ROOT" archive "$OLD_COMMIT" | tar -x -C "$SRC"
    grep -qx "version = \"$OLD_VERSION\"" "$SRC/Cargo.toml" \
        || die "commit $OLD_COMMIT is not release $OLD_VERSION (its Cargo.toml says otherwise)"
    set_aside
    (cd "$SRC" && CARGO_TARGET_DIR="$MC_ROOT/target" cargo pgrx install --release --pg-config "$pgc" >&2) \
        || { put_back; die "building $OLD_VERSION failed"; }
    put_back
    mkdir -p "$FILES/lib" "$FILES/extension"
    cp "$libdir/manna_crypt.so" "$FILES/lib/"
    cp "$extdir"/manna_crypt[.-]* "$FILES/extension/"
    [ -f "$FILES/extension/manna_crypt--$OLD_VERSION.sql" ] || die "the $OLD_VERSION build installed no manna_crypt--$OLD_VERSION.sql"
    echo "$stamp" > "$FILES/.stamp"
else
    log "manna_crypt $OLD_VERSION for the upgrade test: cached in ${FILES#"$MC_ROOT/"}"
    cp "$FILES/lib/manna_crypt.so" "$libdir/"
    cp "$FILES/extension/"* "$extdir/"
fi
chmod -R a+rX "$PRIVATE"
echo "$pgc"
