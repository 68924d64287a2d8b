"""Alembic's environment: run on the connection :mod:`worker.schema` passes in (its
transaction and lock), never on a URL of its own."""

from __future__ import annotations

from alembic import context

from worker.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: op.batch_alter_table() copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
