"""The catalog snapshot of the manna_crypt extension, from Python.

`snapshot(conn)` runs tests/catalog/snapshot.sql in the connection's
database and returns its lines joined with newlines, with a final newline:
the same text as `scripts/catalog_snapshot.sh` (psql -At) prints, so it can be
compared with tests/catalog/expected.txt or with the snapshot of another
database (an upgraded one against a fresh install).
"""

from __future__ import annotations

import difflib
from pathlib import Path

CATALOG_DIR = Path(__file__).resolve().parents[1] / "catalog"
SNAPSHOT_SQL = CATALOG_DIR / "snapshot.sql"
NOT_INSTALLED = "extension manna_crypt is not installed in this database"


def expected_path(server_version_num: int) -> Path:
    """The expected snapshot of a fresh install on this PostgreSQL major
    version: expected.txt for 15 (the project's version), expected.pgNN.txt
    for others (the pg_get_* functions print some things differently)."""
    major = server_version_num // 10000
    return CATALOG_DIR / ("expected.txt" if major == 15 else f"expected.pg{major}.txt")


def snapshot(conn) -> str:
    """The snapshot of the database `conn` is connected to.

    The query pins search_path and the output-format settings with
    set_config(..., is_local => true); it runs in a transaction of its own
    (a savepoint if `conn` is already in one, in which case the settings last
    until that transaction ends)."""
    sql = SNAPSHOT_SQL.read_text()
    with conn.transaction():
        rows = conn.execute(sql).fetchall()
    lines = [r[0] for r in rows]
    if NOT_INSTALLED in lines:
        raise LookupError(f"{NOT_INSTALLED} ({conn.info.dbname})")
    return "".join(line + "\n" for line in lines)


def diff(expected: str, actual: str, expected_name="expected", actual_name="actual") -> str:
    """A unified diff of two snapshots, empty when they are equal."""
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=expected_name,
            tofile=actual_name,
            n=2,
        )
    )
