"""The maintenance layer's error and its progress callback type."""

from __future__ import annotations

from collections.abc import Callable

from daemon.errors import ERROR_EXIT, SETTINGS_EXIT, DaemonError

__all__ = ["MaintenanceError", "Progress", "quiet"]

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class MaintenanceError(DaemonError):
    """A maintenance job cannot run or cannot finish; the message names the value and what to do.

    ``usage`` is True when the options themselves are wrong (the CLI exits 2), False otherwise (exit 1)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage
        self.exit_code = SETTINGS_EXIT if usage else ERROR_EXIT


def quiet(stage: str, done: int, total: int) -> None:
    """A progress callback that shows nothing."""
    return None
