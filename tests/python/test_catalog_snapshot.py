"""The extension's SQL surface is what it was: the catalog snapshot of a
fresh CREATE EXTENSION (tests/catalog/snapshot.sql) equals
tests/catalog/expected.txt, taken from release 0.1.0.

A change to the SQL surface (a function's signature, volatility, privileges,
comment, a column, a constraint...) fails here with the diff. If the change
is deliberate, regenerate the expected file and commit it with the change
(and with the upgrade script that makes an upgraded database match it):

    MC_UPDATE_CATALOG=1 scripts/test.sh
or, against a running cluster,
    scripts/catalog_snapshot.sh -h HOST -p PORT -d DB_WITH_A_FRESH_INSTALL > tests/catalog/expected.txt
"""

import os

import pytest

from catalog_snapshot import diff, expected_path, snapshot


def test_fresh_install_matches_expected_snapshot(conn):
    actual = snapshot(conn)
    path = expected_path(conn.info.server_version)
    rel = path.relative_to(path.parents[2])

    if os.environ.get("MC_UPDATE_CATALOG") == "1":
        path.write_text(actual)
        pytest.skip(f"MC_UPDATE_CATALOG=1: rewrote {rel} ({len(actual.splitlines())} lines); review and commit it")

    if not path.exists():
        pytest.skip(
            f"no expected snapshot for PostgreSQL {conn.info.server_version // 10000}: "
            f"create {rel} with MC_UPDATE_CATALOG=1 and review it"
        )

    expected = path.read_text()
    if actual != expected:
        pytest.fail(
            f"the extension's catalog differs from {rel}:\n\n"
            + diff(expected, actual, str(rel), "fresh CREATE EXTENSION manna_crypt")
            + "\nIf this change to the SQL surface is deliberate, regenerate the file with "
            "MC_UPDATE_CATALOG=1 (e.g. MC_UPDATE_CATALOG=1 scripts/test.sh), review it and commit it "
            "together with the change (and the upgrade script that produces the same catalog).",
            pytrace=False,
        )


def test_snapshot_is_independent_of_session_settings(conn):
    """Names are schema-qualified and constants printed the same whatever the
    caller's search_path and output settings; the settings are restored."""
    plain = snapshot(conn)
    conn.execute("SET search_path = manna_crypt, public")
    conn.execute("SET IntervalStyle = iso_8601")
    conn.execute("SET DateStyle = 'German, DMY'")
    conn.execute("SET TimeZone = 'Asia/Tokyo'")
    conn.execute("SET bytea_output = escape")
    conn.execute("SET extra_float_digits = -3")
    assert snapshot(conn) == plain
    assert conn.execute("SHOW search_path").fetchone()[0] == "manna_crypt, public"
    assert conn.execute("SHOW IntervalStyle").fetchone()[0] == "iso_8601"
