"""The background work of a running daemon: worker.py claims inference jobs under leases, inference.py runs the
active model on one image, reports.py composes study reports in worker processes (lifeline.py ends them with their
parent), forward.py delivers documents to PACS destinations."""
