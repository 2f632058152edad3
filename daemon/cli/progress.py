"""The one progress bar of the ``chexd`` commands: a rich bar on stderr, fed by the ``(stage, done, total)`` callbacks
the model and maintenance layers take, or advanced by hand (``chexd send``, ``chexd phantom``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from daemon.cli.console import err

__all__ = ["Report", "bar", "counter", "progress_reporter", "stage_bar", "stage_reporter"]

Report = Callable[[str, int, int], None]  # (stage, done, total)


def bar(*, label: str | None = None, remaining: bool = False, disable: bool = False) -> Progress:
    """The rich bar on stderr: ``label`` (default: each task's description), bar, done/total, then the time elapsed
    or (``remaining``) the time left. ``disable``: draw nothing."""
    return Progress(
        TextColumn(label if label is not None else "{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn() if remaining else TimeElapsedColumn(),
        console=err,
        disable=disable,
    )


def counter(label: str, *, disable: bool = False) -> Progress:
    """A bar for a known number of items advanced by hand, with the time left; drawn only on a terminal."""
    return bar(label=label, remaining=True, disable=disable or not err.is_terminal)


def stage_reporter(progress: Progress) -> Report:
    """A ``(stage, done, total)`` callback drawing one task of ``progress`` per stage name."""
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    return report


@contextmanager
def stage_bar(quiet: bool = False) -> Iterator[Report]:
    """A ``(stage, done, total)`` callback drawing one rich bar per stage (elapsed time), nothing when ``quiet``."""
    with bar(disable=quiet) as progress:
        yield stage_reporter(progress)


@contextmanager
def progress_reporter(quiet: bool = False) -> Iterator[Report]:
    """A (stage, done, total) callback: a rich progress bar on a terminal, plain ``stage: done/total`` lines on
    stderr otherwise (about every 10%), nothing when ``quiet``."""
    if quiet:
        yield lambda stage, done, total: None
        return
    if err.is_terminal:
        with stage_bar() as report:
            yield report
        return
    last: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if done == total or done - last.get(stage, 0) >= max(1, total // 10):
            last[stage] = done
            err.print(f"{stage}: {done}/{total}", highlight=False, markup=False)

    yield report
