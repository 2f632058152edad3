"""Alembic environment: uses the engine chexd hands over (``config.attributes['engine']``) or, for the plain
``alembic`` command, the settings' database URL."""

from alembic import context

from daemon.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is None:
        from daemon.settings import load_settings
        from daemon.store.db import create_db_engine

        engine = create_db_engine(load_settings().effective_database_url)
    return engine


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline SQL generation is not supported; run against a database")
run_migrations_online()
