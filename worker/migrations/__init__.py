"""The job store's Alembic migrations (``versions/0001_*.py``, ``0002_*.py``, ...).

Run them with ``kru db upgrade``; :mod:`worker.schema` is the code's entry point. How to add one:
docs/deploy.md, "Schema migrations".
"""
