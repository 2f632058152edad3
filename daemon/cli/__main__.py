"""``python -m daemon.cli`` works like ``python -m daemon``."""

from daemon.cli import app

app(prog_name="chexd")
