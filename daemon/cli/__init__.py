"""The ``chexd`` command line: one module per command, named after it (``chexd paper-table`` in paper_table.py,
``chexd model ...`` in model.py); the root command and its error handler in root.py; what commands share (settings,
database, JSON output, progress bars) in context.py and console.py. ``app`` is the Typer application."""

from daemon.cli.root import app

__all__ = ["app"]
