"""Alembic environment: online migrations only, URL from -x db_url, the
config's sqlalchemy.url, or MC_ALEMBIC_URL."""

import os

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config


def database_url():
    x = context.get_x_argument(as_dictionary=True)
    url = x.get("db_url") or config.get_main_option("sqlalchemy.url") or os.environ.get("MC_ALEMBIC_URL")
    if not url:
        raise RuntimeError("no database URL: pass -x db_url=... or set MC_ALEMBIC_URL")
    return url


def run_migrations_online():
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("this project runs online only")
run_migrations_online()
