"""Alembic revisions of chexd's schema. Never edit a released revision: add a new one."""
