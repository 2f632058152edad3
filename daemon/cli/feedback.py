"""``chexd feedback UID``: a radiologist's verdict on one finding of one image."""

from __future__ import annotations

from typing import Annotated

import typer

from daemon.cli.console import fail, out
from daemon.cli.context import emit_json, sessions, settings


def feedback_cmd(
    uid: Annotated[str, typer.Argument(help="SOP Instance UID of a received image.")],
    finding: Annotated[str, typer.Option("--finding", "-f", help="Finding name, e.g. Pneumonia.")],
    present: Annotated[
        bool | None, typer.Option("--present/--absent", help="The radiologist's verdict (required).")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Free-text comment.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Record a radiologist's verdict on one finding of one image (validation data for maintenance jobs)."""
    from daemon.store.feedback import FeedbackError, record
    from daemon.store.registry import current_user

    if present is None:
        fail("say --present or --absent", 2)
    try:
        row = record(sessions(settings()), uid, finding, present=present, user=current_user(), note=note)
    except FeedbackError as exc:
        fail(str(exc))
    if as_json:
        emit_json({"id": row.id, "sop_instance_uid": uid, "finding": row.finding, "present": row.present})
    else:
        out.print(f"recorded: {row.finding} {'present' if present else 'absent'} on {uid}", highlight=False)
