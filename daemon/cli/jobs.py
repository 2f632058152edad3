"""The maintenance layer (daemon.maintenance) seen from the commands: its errors as the CLI's error exit, and the
layer's calls that end a command on an expected failure (exit 2 when the options are wrong, else 1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from daemon.cli.console import fail

if TYPE_CHECKING:
    from daemon.maintenance import MaintenanceError, Parent, SourceOptions
    from daemon.settings import Settings
    from model.datasets import LabelledSource

__all__ = ["fail_with", "guarded", "parent", "run", "source_options", "validation_source"]

T = TypeVar("T")


def fail_with(exc: MaintenanceError) -> NoReturn:
    """A maintenance-layer error as the CLI's error exit: 2 when the options are wrong, else 1."""
    fail(str(exc), 2 if exc.usage else 1)


def guarded(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``; a MaintenanceError ends the command (:func:`fail_with`)."""
    from daemon.maintenance import MaintenanceError

    try:
        return call(*args, **kwargs)
    except MaintenanceError as exc:
        fail_with(exc)


def parent(settings: Settings, model: Path | None) -> Parent:
    """The job's parent version (``--model`` or the active one); exits 1 when there is none or it fails to load."""
    from daemon.maintenance import load_parent

    return guarded(load_parent, settings, model)


def source_options(**options: Any) -> SourceOptions:
    """The validation-source options as the layer's SourceOptions; conflicting options exit 2 before any work."""
    from daemon.maintenance import SourceOptions

    return guarded(SourceOptions, **options)


def validation_source(**options: Any) -> LabelledSource:
    """The labelled source the options name (at most one of --phantom, --chestxray14, --dicom-dir); exits 2 on a
    conflict, 1 on an unusable source (``daemon.maintenance.labelled_source``)."""
    from daemon.maintenance import labelled_source

    return guarded(labelled_source, source_options(**options))


def run(settings: Settings, kind: str, params: dict[str, Any], work: Callable[[Any], T]) -> T:
    """``work(job)`` inside an admin-job record; expected failures become a CLI error (exit 1, or 2 for options)."""
    from daemon.maintenance import run_job

    return guarded(run_job, settings, kind, params, work)
