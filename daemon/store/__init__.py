"""The store: everything chexd keeps. db.py (engine, Alembic), tables.py (the schema), spool.py (files on disk:
atomic durable writes, quarantine, the disk reserve), instances.py (a received image: file and rows, both or
neither), identity.py (keyed patient fingerprints), recovery.py (spool and database agree again after a crash),
registry.py (model versions and the audit trail), feedback.py (radiologists' verdicts), queries.py (the CLI's
read-side views)."""
