"""Fixtures for the client-side tests.

scripts/test.sh starts one throwaway cluster and exports where it is:
MC_PGHOST (the socket directory), MC_PGPORT, MC_CLUSTER_DIR. Each test module
that needs isolation makes its own database with `fresh_db`. Tests that need
clusters of their own (standby, dump/restore, crash) use `Cluster` from
mc_cluster.py, which drives the same shell helpers.
"""

import os
import uuid

import psycopg
import pytest

HOST = os.environ.get("MC_PGHOST")
PORT = os.environ.get("MC_PGPORT")


def dsn(dbname, host=None, port=None, **extra):
    parts = {"host": host or HOST, "port": port or PORT, "dbname": dbname}
    parts.update(extra)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def sqlstate(conn, sql, params=None):
    """The SQLSTATE a statement fails with, or "ok"."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return "ok"


def new_role(conn, *options):
    """A new LOGIN role with a random name (and the given options)."""
    name = "r_" + uuid.uuid4().hex[:10]
    conn.execute(f'CREATE ROLE "{name}" LOGIN {" ".join(options)}')
    return name


def connect(dbname, autocommit=True, **kw):
    return psycopg.connect(dsn(dbname, **kw), autocommit=autocommit)


def pytest_configure(config):
    # scripts/test.sh runs every test on PG_MAJOR (15) and, on each other
    # tested version (16, 18), `pytest -m all_versions`: mark a module with
    # `pytestmark = pytest.mark.all_versions` when it must hold there too.
    config.addinivalue_line(
        "markers",
        "all_versions: also run on the other tested PostgreSQL versions (scripts/test.sh)",
    )


@pytest.fixture(scope="session", autouse=True)
def _cluster_present():
    if not HOST or not PORT:
        pytest.fail("MC_PGHOST/MC_PGPORT are not set: run the suite with scripts/test.sh")


def create_database(name, host=None, port=None):
    with connect("postgres", host=host, port=port) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    with connect(name, host=host, port=port) as c:
        c.execute("CREATE EXTENSION manna_crypt")
    return name


@pytest.fixture
def fresh_db(request):
    """A new database with the extension created; dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:12]
    create_database(name)
    yield name
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(fresh_db):
    with connect(fresh_db) as c:
        yield c
