"""``chexd show UID``: everything stored for a study, series or SOP instance."""

from __future__ import annotations

import json

from rich.table import Table

from daemon.cli.console import fail, out
from daemon.cli.context import emit_json, sessions, settings
from daemon.cli.options import JsonOption
from daemon.store import queries


def show_cmd(uid: str, as_json: JsonOption = False) -> None:
    """Everything stored for a study, series or SOP instance UID."""
    try:
        data = queries.show(sessions(settings()), uid)
    except queries.NotFoundError as exc:
        fail(str(exc))
    if as_json:
        emit_json(data)
        return
    gate = data.get("applicability") or {}
    counted = ", ".join(f"{gate[k]} {k}" for k in ("withheld", "flagged") if gate.get(k))
    out.print(f"{data['level']} {uid}: {len(data['instances'])} instance(s)" + (f" ({counted})" if counted else ""),
              highlight=False)
    if data.get("patient_identified_by"):
        out.print(f"patient identified by: {data['patient_identified_by']} (kept as a keyed fingerprint)",
                  highlight=False)
    for c in data.get("conflicts", []):
        table = Table(show_header=False, title=f"{c['sop_instance_uid']} - CONFLICT: held, not merged")
        for key in ("state", "kind", "reason", "study_instance_uid", "series_instance_uid", "quarantine_file",
                    "sha256", "size_bytes", "calling_ae", "received_at"):
            table.add_row(key, str(c[key]) if c[key] is not None else "")
        out.print(table)
    for inst in data["instances"]:
        job = inst["job"] or {}
        table = Table(show_header=False, title=inst["sop_instance_uid"])
        for key in (
            "study_instance_uid",
            "series_instance_uid",
            "sop_class_uid",
            "modality",
            "body_part",
            "view_position",
            "transfer_syntax_uid",
            "path",
            "size_bytes",
            "calling_ae",
            "received_at",
            "skip_reason",
        ):
            table.add_row(key, str(inst[key]) if inst[key] is not None else "")
        table.add_row("job", f"{job.get('state')} (attempts {job.get('attempts')})")
        if job.get("error"):
            table.add_row("error", job["error"])
        if inst["image_stats"]:
            table.add_row("image stats", json.dumps(inst["image_stats"]))
        out.print(table)
        for prediction in inst["predictions"][-1:]:
            findings = Table(
                "finding",
                "probability",
                "threshold",
                "status",
                "region",
                "reason",
                title=f"model {prediction['model_name']} {prediction['model_version']}"
                + (" - SYNTHETIC DEMO MODEL, NOT FOR DIAGNOSIS" if prediction["synthetic_model"] else ""),
            )
            for f in prediction["findings"]:
                findings.add_row(
                    f["label"],
                    f"{f['probability']:.3f}",
                    f"{f['threshold']:.3f}",
                    f["status"],
                    f["region"] or "",
                    f["reason"] or "",
                )
            gated = prediction.get("applicability")
            if gated:
                score = ("" if gated["score"] is None
                         else f", score {gated['score']:,.6g} (threshold {gated['threshold']:,.6g})")
                note = {"withheld": " - outside the model's validated domain, no AI findings for this image",
                        "flagged": " - outside the model's validated domain, findings with a warning"}
                out.print(f"applicability: {gated['status']}{score}{note.get(gated['status'], '')}", highlight=False)
                for issue in gated["quality"]:
                    out.print(f"  input quality ({issue['code']}): {issue['reason']}", highlight=False)
            if prediction["findings"]:
                out.print(findings)
    for report in data["reports"]:
        files = ", ".join(f"{f['kind']} {f['path']}" for f in report["files"])
        out.print(f"report revision {report['revision']}: {report['state'].lower()} {files}", highlight=False)
