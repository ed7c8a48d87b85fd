"""SQLAlchemy 2 ORM optimistic locking on top of the version_bump trigger
(docs/DESIGN.md section 5), in both of SQLAlchemy's modes:

* client-side counter (the default): the ORM sends
  `SET version = old + 1 ... WHERE id = ? AND version = old`; the trigger
  sees NEW = OLD + 1 and accepts it unchanged;
* server-side counter (`version_id_generator=False`): the ORM sends
  `... WHERE id = ? AND version = old RETURNING version` without touching the
  version; the trigger sees NEW = OLD and bumps it.

In both, a lost update is reported by the ORM as StaleDataError, the row keeps
the first writer's data and its version advances exactly once. A plain SQL
UPDATE from another program (which knows nothing about versions) also bumps
the version, so the ORM notices that its copy is stale.
"""

import threading

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import BigInteger, Integer, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from conftest import connect, dsn


class Base(DeclarativeBase):
    pass


class ClientItem(Base):
    """SQLAlchemy's default: the client computes version + 1."""

    __tablename__ = "sa_client_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    __mapper_args__ = {"version_id_col": version}


class ServerItem(Base):
    """The server (the trigger) increments; the ORM reads the new value back."""

    __tablename__ = "sa_server_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("1"))
    __mapper_args__ = {
        "version_id_col": version,
        "version_id_generator": False,
        "eager_defaults": True,
    }


MODELS = {"client": ClientItem, "server": ServerItem}


@pytest.fixture
def engine(fresh_db):
    eng = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn(fresh_db)),
        pool_size=4,
    )
    Base.metadata.create_all(eng)
    with eng.begin() as c:
        for model in MODELS.values():
            c.execute(
                text("SELECT manna_crypt.enable_optimistic_locking(CAST(:t AS regclass))"),
                {"t": model.__tablename__},
            )
    yield eng
    eng.dispose()


def row(fresh_db, model):
    with connect(fresh_db) as c:
        return c.execute(f"SELECT name, version FROM {model.__tablename__} WHERE id = 1").fetchone()


@pytest.mark.parametrize("mode", ["client", "server"])
def test_insert_starts_at_version_1(engine, fresh_db, mode):
    model = MODELS[mode]
    with Session(engine) as s:
        item = model(id=1, name="first")
        s.add(item)
        s.commit()
        assert item.version == 1
    assert row(fresh_db, model) == ("first", 1)


@pytest.mark.parametrize("mode", ["client", "server"])
def test_consecutive_updates_by_one_session(engine, fresh_db, mode):
    """The ORM's idea of the version follows the row: each update advances it
    by exactly one (not two: the trigger accepts the client's +1 and bumps the
    server-side mode's unchanged value), and the next update is not stale."""
    model = MODELS[mode]
    with Session(engine, expire_on_commit=False) as s:
        item = model(id=1, name="v1")
        s.add(item)
        s.commit()
        for i in range(2, 6):
            item.name = f"v{i}"
            s.commit()
            assert item.version == i
    assert row(fresh_db, model) == ("v5", 5)


@pytest.mark.parametrize("mode", ["client", "server"])
def test_lost_update_is_detected(engine, fresh_db, mode):
    model = MODELS[mode]
    with Session(engine) as s:
        s.add(model(id=1, name="original"))
        s.commit()

    with Session(engine) as a, Session(engine) as b:
        item_a = a.get(model, 1)
        item_b = b.get(model, 1)
        assert item_a.version == item_b.version == 1

        item_a.name = "writer A"
        item_b.name = "writer B"
        a.commit()

        with pytest.raises(StaleDataError):
            b.commit()
        b.rollback()

    # the first writer's data, and the version advanced exactly once
    assert row(fresh_db, model) == ("writer A", 2)

    # the loser can reload and then succeed
    with Session(engine) as b:
        item_b = b.get(model, 1)
        assert (item_b.name, item_b.version) == ("writer A", 2)
        item_b.name = "writer B, retried"
        b.commit()
    assert row(fresh_db, model) == ("writer B, retried", 3)


@pytest.mark.parametrize("mode", ["client", "server"])
def test_lost_update_with_interleaved_flushes(engine, fresh_db, mode):
    """B flushes while A's update is still uncommitted: B's UPDATE waits for
    A's row lock, re-checks its WHERE against A's committed row version and
    matches nothing, so B still gets StaleDataError (not a silent overwrite)."""
    model = MODELS[mode]
    with Session(engine) as s:
        s.add(model(id=1, name="original"))
        s.commit()

    a = Session(engine)
    b = Session(engine)
    try:
        item_a = a.get(model, 1)
        item_b = b.get(model, 1)
        item_a.name = "writer A"
        a.flush()  # A holds the row lock now

        item_b.name = "writer B"
        outcome = {}

        def flush_b():
            try:
                b.flush()
                outcome["result"] = "flushed"
            except StaleDataError:
                outcome["result"] = "stale"
            except Exception as e:  # pragma: no cover - reported below
                outcome["result"] = repr(e)

        t = threading.Thread(target=flush_b)
        t.start()
        t.join(0.5)
        assert t.is_alive(), "B's UPDATE should wait for A's row lock"
        a.commit()
        t.join(10)
        assert not t.is_alive()
        assert outcome["result"] == "stale"
        b.rollback()
    finally:
        a.close()
        b.close()
    assert row(fresh_db, model) == ("writer A", 2)


@pytest.mark.parametrize("mode", ["client", "server"])
def test_plain_sql_update_makes_orm_copy_stale(engine, fresh_db, mode):
    """Another program runs a plain UPDATE that does not mention the version;
    the trigger bumps it, so the ORM's pending change is refused."""
    model = MODELS[mode]
    with Session(engine) as s:
        s.add(model(id=1, name="original"))
        s.commit()

    with Session(engine) as orm:
        item = orm.get(model, 1)
        assert item.version == 1

        with connect(fresh_db) as other:
            other.execute(f"UPDATE {model.__tablename__} SET name = 'raw sql' WHERE id = 1")
        assert row(fresh_db, model) == ("raw sql", 2)

        item.name = "orm"
        with pytest.raises(StaleDataError):
            orm.commit()
        orm.rollback()

    assert row(fresh_db, model) == ("raw sql", 2)


def test_orm_query_sees_trigger_version(engine, fresh_db):
    """A bulk plain UPDATE bumps every row once; the ORM reads the bumped
    versions back."""
    with Session(engine) as s:
        s.add_all([ServerItem(id=i, name=f"n{i}") for i in range(1, 4)])
        s.commit()
    with connect(fresh_db) as c:
        c.execute("UPDATE sa_server_items SET name = upper(name)")
    with Session(engine) as s:
        got = s.execute(select(ServerItem.name, ServerItem.version).order_by(ServerItem.id)).all()
    assert [tuple(r) for r in got] == [("N1", 2), ("N2", 2), ("N3", 2)]


def test_compare_and_set_through_sqlalchemy_core(engine, fresh_db):
    """Plain SQL compare-and-set through SQLAlchemy: a stale version surfaces
    as sqlalchemy.exc.OperationalError wrapping psycopg's SerializationFailure
    (SQLSTATE 40001), the class retry decorators look for."""
    with engine.begin() as c:
        c.execute(text("INSERT INTO sa_server_items (id, name) VALUES (1, 'x')"))
    with engine.begin() as c:
        c.execute(text("UPDATE sa_server_items SET name = 'y', version = 1 WHERE id = 1"))
    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        with engine.begin() as c:
            c.execute(text("UPDATE sa_server_items SET name = 'z', version = 1 WHERE id = 1"))
    assert isinstance(info.value.orig, psycopg.errors.SerializationFailure)
    assert info.value.orig.sqlstate == "40001"
    assert row(fresh_db, ServerItem) == ("y", 2)
