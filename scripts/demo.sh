#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the demo:
#   system packages, cargo-pgrx, release build installed into PostgreSQL
#   $PG_MAJOR (15 unless set; PG_CONFIG names its pg_config, scripts/common.sh),
#   a throwaway cluster in ./.demo (port 54329, socket in ./.demo) with a
#   fresh root key, and demo/demo.sql. The cluster is left running.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$MC_ROOT"

"$MC_ROOT/scripts/setup.sh"

DEMO="$MC_ROOT/.demo"
PORT=${MC_DEMO_PORT:-54329}
cluster_stop "$DEMO"
cluster_start "$DEMO" "$PORT"
cluster_psql "$DEMO" "$PORT" postgres -qc "DROP DATABASE IF EXISTS manna_demo WITH (FORCE)" -c "CREATE DATABASE manna_demo"
log "running demo/demo.sql"
cluster_psql "$DEMO" "$PORT" manna_demo -f demo/demo.sql

cat <<TXT

The demo cluster is still running (data in $DEMO/data, root key in $DEMO/keys/root.key).
  connect:  $(pg_bindir)/psql -h $DEMO -p $PORT manna_demo
  stop:     runuser -u postgres -- $(pg_bindir)/pg_ctl -D $DEMO/data stop     (as non-root: $(pg_bindir)/pg_ctl -D $DEMO/data stop)
  remove:   rm -rf $DEMO
TXT
