#!/usr/bin/env bash
# Benchmark: in-place Fernet -> AES-256-GCM migration of 200,000 rows.
#
#   (i)   CALL manna_crypt.migrate_fernet(...)      batch_size 1000, no AAD
#   (ii)  the client-side way (scripts/bench_client_migrate.py): keyset
#         pagination, Python Fernet decrypt + AESGCM encrypt, one UPDATE per
#         batch of 1000, commit per batch
#   (iii) the floor: UPDATE t SET tok = tok || '' (one statement)
#
# Same data for every method (reloaded from one copy, then VACUUM ANALYZE),
# each method run BENCH_REPEAT times (default 2), best time kept. Prints rows/s
# for each, and the ratios migrate_fernet/client (target >= 8x faster) and
# migrate_fernet/floor time (target <= 1.5).
#
# Assumes the extension is installed (for realistic numbers the release build:
# cargo pgrx install --release --pg-config ...). Uses its own cluster in
# target/bench-migrate on port 55498, stopped (and removed, unless
# BENCH_KEEP=1) on exit.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

ROWS=${BENCH_ROWS:-200000}
REPEAT=${BENCH_REPEAT:-2}
PORT=${BENCH_MIGRATE_PORT:-55498}
DIR="$MC_ROOT/target/bench-migrate"
PY="$MC_ROOT/target/venv/bin/python"
[ -x "$PY" ] || die "no venv at target/venv (scripts/test.sh creates it)"

cluster_stop "$DIR"
rm -rf "$DIR"
mkdir -p "$DIR"
cluster_start "$DIR" "$PORT" \
    "synchronous_commit = off" \
    "max_parallel_workers_per_gather = 0" \
    "shared_buffers = 1GB" \
    "log_min_messages = warning"
# Stop the cluster on exit; its ~650 MB go too unless BENCH_KEEP=1.
trap 'cluster_stop "$DIR"; [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$DIR"' EXIT

DB=bench
psql_() { cluster_psql "$DIR" "$PORT" "$DB" -qAt "$@"; }
cluster_psql "$DIR" "$PORT" postgres -q -c "CREATE DATABASE $DB"
psql_ -c "CREATE EXTENSION manna_crypt"

# Keys: generated here, handed to the helpers in the environment only.
export BENCH_FERNET_KEY BENCH_RAW_KEY_HEX
BENCH_FERNET_KEY=$("$PY" -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')
BENCH_RAW_KEY_HEX=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
psql_ -v key="$BENCH_FERNET_KEY" >/dev/null <<'EOF'
SELECT manna_crypt.import_fernet_key('bench_legacy', :'key');
SELECT manna_crypt.create_keyring('bench_target');
EOF

log "generating $ROWS Fernet tokens (51-character plaintexts)"
DATA="$DIR/tokens.tsv"
"$PY" - "$ROWS" "$DATA" <<'EOF'
import os, sys, uuid
from cryptography.fernet import Fernet
n, path = int(sys.argv[1]), sys.argv[2]
f = Fernet(os.environ["BENCH_FERNET_KEY"].encode())
with open(path, "w") as out:
    for i in range(1, n + 1):
        p = "access-sandbox-" + str(uuid.uuid4())
        assert len(p) == 51
        out.write(f"{i}\t{f.encrypt(p.encode()).decode()}\n")
EOF
chmod 644 "$DATA"
psql_ -c "CREATE TABLE src (id int PRIMARY KEY, tok text)" -c "\\copy src FROM '$DATA'"

# Fresh copy of the data in table t, vacuumed and analyzed.
reload() {
    psql_ >/dev/null <<'EOF'
SET client_min_messages = warning;
DROP TABLE IF EXISTS t;
CREATE TABLE t (id int PRIMARY KEY, tok text);
INSERT INTO t SELECT * FROM src;
VACUUM ANALYZE t;
CHECKPOINT;
EOF
}

now() { date +%s.%N; }
best() { printf '%s\n' "$@" | sort -g | head -n1; }

check_converted() {
    local n
    n=$(psql_ -c "SELECT count(*) FROM t WHERE tok LIKE 'mc1:%'")
    [ "$n" = "$ROWS" ] || die "$1: only $n of $ROWS rows converted"
}

declare -a t_ext t_client t_floor
for r in $(seq "$REPEAT"); do
    log "round $r/$REPEAT: migrate_fernet"
    reload
    s=$(now)
    psql_ -c "SET client_min_messages = warning" \
          -c "CALL manna_crypt.migrate_fernet('t', 'tok', 'bench_legacy', 'bench_target', batch_size => 1000)"
    e=$(now)
    t_ext+=("$(echo "$e - $s" | bc -l)")
    check_converted migrate_fernet
    # spot check: the values decrypt to the generated plaintexts' shape
    ok=$(psql_ -c "SELECT count(*) FROM (SELECT manna_crypt.decrypt_gcm(tok) p FROM t LIMIT 1000) x WHERE p LIKE 'access-sandbox-%' AND length(p) = 51")
    [ "$ok" = 1000 ] || die "migrate_fernet: decrypted values do not match"

    log "round $r/$REPEAT: client-side (Python Fernet + AESGCM, batch 1000)"
    reload
    read -r secs done < <("$PY" scripts/bench_client_migrate.py "host=$DIR port=$PORT dbname=$DB" t 1000)
    [ "$done" = "$ROWS" ] || die "client: converted $done of $ROWS"
    t_client+=("$secs")
    check_converted client
    # its envelopes (key id 0) decrypt in the database with the raw key
    ok=$(psql_ -v k="$BENCH_RAW_KEY_HEX" <<<"SELECT count(*) FROM (SELECT manna_crypt.decrypt_gcm(tok, decode(:'k', 'hex')) p FROM t LIMIT 1000) x WHERE length(p) = 51")
    [ "$ok" = 1000 ] || die "client: envelopes do not decrypt"

    log "round $r/$REPEAT: floor (UPDATE t SET tok = tok || '')"
    reload
    s=$(now)
    psql_ -c "UPDATE t SET tok = tok || ''" >/dev/null
    e=$(now)
    t_floor+=("$(echo "$e - $s" | bc -l)")
done

E=$(best "${t_ext[@]}"); C=$(best "${t_client[@]}"); F=$(best "${t_floor[@]}")
rate() { echo "$ROWS / $1" | bc -l | xargs printf '%.0f'; }
echo
echo "rows: $ROWS, best of $REPEAT; build: $(psql_ -c "SELECT manna_crypt.info()->>'version'" 2>/dev/null || echo '?')"
printf '%-34s %8.2f s  %9s rows/s   (all: %s)\n' "migrate_fernet (batch 1000)" "$E" "$(rate "$E")" "${t_ext[*]}"
printf '%-34s %8.2f s  %9s rows/s   (all: %s)\n' "client-side Python (batch 1000)" "$C" "$(rate "$C")" "${t_client[*]}"
printf '%-34s %8.2f s  %9s rows/s   (all: %s)\n' "floor: UPDATE col = col || ''" "$F" "$(rate "$F")" "${t_floor[*]}"
printf 'migrate_fernet is %.1fx faster than the client (target >= 8)\n' "$(echo "$C / $E" | bc -l)"
printf 'migrate_fernet time / floor time = %.2f (target <= 1.5)\n' "$(echo "$E / $F" | bc -l)"
