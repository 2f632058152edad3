"""``chexd reprocess UID``: re-queue the jobs of a study, series or instance."""

from __future__ import annotations

from daemon.cli.console import fail, out
from daemon.cli.context import emit_json, sessions, settings
from daemon.cli.options import JsonOption
from daemon.store import queries


def reprocess_cmd(uid: str, as_json: JsonOption = False) -> None:
    """Re-queue the jobs of a study, series or instance (a running daemon picks them up)."""
    try:
        result = queries.reprocess(sessions(settings()), uid)
    except queries.NotFoundError as exc:
        fail(str(exc))
    if result.get("conflicts") and not result["requeued"] and not result["skipped"]:
        fail(
            f"{uid}: {result['conflicts']} image(s) held by an identity conflict - not re-queued (they are never "
            "merged); fix the patient or study at the sender and resend with new UIDs (see 'chexd show UID')"
        )
    if as_json:
        emit_json(result)
        return
    held = f"; {result['conflicts']} image(s) held by an identity conflict, not re-queued" if result.get(
        "conflicts") else ""
    out.print(f"re-queued {result['requeued']} job(s); {result['skipped']} skipped instance(s) left as they are{held}")
