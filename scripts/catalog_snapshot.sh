#!/usr/bin/env bash
# Prints the catalog snapshot of the manna_crypt extension in one database:
# every object the extension owns, as sorted text lines with no OIDs or
# other install-specific values (see tests/catalog/snapshot.sql).
#
#   scripts/catalog_snapshot.sh [psql connection args...]
#
# e.g. scripts/catalog_snapshot.sh -h /tmp/mc -p 55432 -d mydb > a.txt
# Two databases with the same SQL surface give identical output, so
#   diff -u <(scripts/catalog_snapshot.sh -d fresh) <(scripts/catalog_snapshot.sh -d upgraded)
# shows any difference. A fresh install of the current release must match
# tests/catalog/expected.txt (tests/python/test_catalog_snapshot.py).
# Uses the psql of $PG_CONFIG's PostgreSQL (scripts/common.sh). Exits
# non-zero when psql fails or the extension is not installed in the database.
set -euo pipefail
source "$(dirname "$0")/common.sh"

out=$("$(pg_bindir)/psql" -X -At -v ON_ERROR_STOP=1 "$@" -f "$MC_ROOT/tests/catalog/snapshot.sql")
printf '%s\n' "$out"
case "$out" in
    *"extension manna_crypt is not installed"*) die "the extension manna_crypt is not installed in this database" ;;
esac
