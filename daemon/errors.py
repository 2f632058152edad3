"""The error family of daemon/, and the one place that turns an expected error into a CLI exit status.

Every error daemon/ raises on purpose derives from :class:`DaemonError` and keeps the builtin base its callers
catch (``SettingsError`` is also a ``ValueError``, ``DiskReserveError`` an ``OSError``). model/ raises
``model.errors.ModelError`` and reporting/ ``reporting.errors.ReportError``; the layers below daemon/ never import it.
Their message says what is wrong and what to do. Where such an error ends:

- in the CLI: :func:`daemon.cli.exits.cli_exit` (exit status 2 for a setting or an option, 1 for everything else a
  person can act on); anything it does not know is a bug and keeps its traceback.
- at the DICOM edge: :func:`daemon.edge.statuses.store_status` (the C-STORE status for each refusal).
"""

from __future__ import annotations

SETTINGS_EXIT = 2  # a setting, an option or the data folder
ERROR_EXIT = 1  # the database, the model, a document, a file


class DaemonError(Exception):
    """Base of every error daemon/ raises on purpose. ``exit_code``: the CLI exit status it ends a command with."""

    exit_code: int = ERROR_EXIT
