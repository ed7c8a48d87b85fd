# Shared helpers for the setup, demo, test and benchmark scripts.
# Sourced, not run. Everything here works as root (the PostgreSQL server is
# then run as the `postgres` OS user) or as an ordinary user.

MC_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=${PG_MAJOR:-15}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PGRX_VERSION=0.18.0
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pg_bindir() { "$PG_CONFIG" --bindir; }

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
            echo "shared_preload_libraries = 'pg_stat_statements,manna_crypt'"
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
    (cd "$MC_ROOT" && cargo pgrx install --release --pg-config "$PG_CONFIG" "${sudo[@]}" >/dev/null)
}

# ensure_venv: the Python environment of the client tests and benchmarks
# (psycopg, SQLAlchemy, Alembic, pytest, cryptography) in target/venv.
ensure_venv() {
    local venv="$MC_ROOT/target/venv" req="$MC_ROOT/tests/python/requirements.txt"
    if [ ! -x "$venv/bin/pytest" ] || [ "$req" -nt "$venv/bin/pytest" ]; then
        log "creating the Python environment in target/venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade pip
        "$venv/bin/pip" install -q -r "$req"
        touch "$venv/bin/pytest"
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
