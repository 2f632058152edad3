"""``chexd decide``: the treatment decision system as a command (``model.decide`` does the work).

It loads the active model (or ``--model``), computes the pooled features of a validation source once (cached, via the
maintenance layer), splits them patient-disjointly into a selection and a verification part, optionally takes the
images radiologists marked absent (``--feedback``) as confirmed false positives, and prints the routing table: per
finding the problem, the evidence, the chosen intervention, its cost, its verified effect with a CI and the cheaper
options rejected. ``--apply`` composes the chosen interventions into ONE candidate version (each step in the
provenance, the routing table in the manifest); nothing is ever activated. With ``--predictions CSV --labels CSV``
there is no model: only thresholds can be routed, and the output says so. Everything runs inside an admin-job record.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout

if TYPE_CHECKING:
    from daemon.maintenance import MaintenanceError, Parent
    from daemon.settings import Settings
    from model.decide import Decision
    from model.features import FeatureSet


def _fail_with(exc: MaintenanceError) -> None:
    fail(str(exc), 2 if exc.usage else 1)


def _settings() -> Settings:
    from daemon.cli.context import settings

    return settings()


# --- radiologist feedback -------------------------------------------------------------------------------------------


def feedback_false_positives(
    settings: Settings, parent: Parent, *, device: str, batch_size: int
) -> tuple[dict[str, FeatureSet], int]:
    """``({finding: features of the stored images whose newest verdict on it is 'absent'}, images read)``: every
    image is decoded and run through the parent's backbone once. Exits 1 when a stored image cannot be read."""
    from daemon.store.feedback import feedback_items
    from daemon.store.registry import registry_sessions
    from daemon.work.worker import PermanentJobError, read_stored_image
    from model.features import compute_features
    from model.types import LABELS

    items = [
        i
        for i in feedback_items(registry_sessions(settings), settings.spool_dir.resolve())
        if any(v is False for v in i.verdicts.values())
    ]
    if not items:
        return {}, 0
    images = []
    for item in items:
        try:
            images.append((item.sop_instance_uid, None, read_stored_image(item.path)[1], [0] * len(LABELS)))
        except PermanentJobError as exc:
            fail(f"feedback image {item.sop_instance_uid}: {exc}")
    features = compute_features(
        parent.network,
        images,
        recipe=parent.manifest.preprocessing,
        device=device,
        batch_size=batch_size,
        source="radiologist feedback",
    )
    parent.network.cpu()
    out = {}
    for finding in parent.manifest.labels:
        index = [k for k, item in enumerate(items) if item.verdicts.get(finding) is False]
        if index:
            out[finding] = features.subset(index)
    return out, len(items)


# --- printing -------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _effect_text(effect: dict[str, Any]) -> str:
    if not effect:
        return "-"
    ci = effect.get("ci")
    ci_text = f" 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (no CI)"
    if effect.get("metric") == "held-out TP loss rate":
        text = (
            f"held-out TPs lost {effect['true_positives_lost']}/{effect['true_positives']} "
            f"(rate {_fmt(effect['after'])}{ci_text})"
        )
        if effect.get("pattern_examples"):
            text += f"; held-out FPs corrected {effect['pattern_corrected']}/{effect['pattern_examples']}"
        if effect.get("pattern_delta_p") is not None:
            text += f", Δp {effect['pattern_delta_p']:+.3f}"
        return text
    delta = effect.get("delta")
    return (
        f"{effect['metric']} {_fmt(effect.get('before'))} -> {_fmt(effect.get('after'))} "
        f"(Δ {'-' if delta is None else f'{delta:+.3f}'}{ci_text})"
    )


def _rejected_text(options: list[dict[str, Any]]) -> str:
    """One line per distinct reason (options rejected for the same reason share a line)."""
    reasons: dict[str, list[str]] = {}
    for option in options:
        reasons.setdefault(option["reason"], []).append(option["kind"])
    return "\n".join(f"{', '.join(kinds)}: {reason}" for reason, kinds in reasons.items()) or "-"


def _print(data: dict[str, Any]) -> None:
    # in a pipe or log rich assumes 80 columns and squeezes the table; there, use the width it needs
    console = stdout if stdout.is_terminal else Console(file=sys.stdout, width=220)
    split = data["split"]
    title = (
        f"treatment decision ({data['mode']} mode): selection {split['selection_images']} / verification "
        f"{split['verification_images']} images ({split['kind']}-disjoint)"
    )
    table = Table(
        "finding",
        "problem",
        "evidence (selection part)",
        "intervention",
        "cost",
        "verified effect (verification part)",
        "cheaper options rejected",
        title=title,
        show_lines=True,
    )
    for route in data["routes"]:
        chosen = route["chosen"]
        cost = chosen["cost"] if chosen else None
        cost_text = (
            "-"
            if cost is None
            else (
                f"{cost['parameters_changed']} params, {cost['manifest_numbers']} thr, {cost['findings_touched']} "
                f"finding, {cost['cpu_seconds']:.2f} CPU s"
            )
        )
        rejected = _rejected_text(route["rejected"])
        table.add_row(
            route["finding"],
            route["problem"],
            "\n".join(route["evidence"]) or "-",
            route["intervention"],
            cost_text,
            _effect_text(chosen["effect"]) if chosen else "-",
            rejected,
        )
    console.print(table)
    lines = [
        data["note"],
        f"split: {split['note']}; a finding needs {split['min_positives']} positives in each part for a verdict",
        "other findings: every intervention changes one finding's threshold or row of the "
        "head, so the others are untouched by construction (a test, not a result)",
        "routed: " + ", ".join(f"{k} {v}" for k, v in sorted(data["routed"].items())),
        f"decision {data['cpu_seconds']:.2f} CPU s; wall {data['wall_seconds']:.1f} s"
        + (
            ""
            if data.get("features_from_cache") is None
            else f"; features {'from the cache' if data['features_from_cache'] else 'computed'}"
        ),
        data["message"],
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False)


def _emit(data: dict[str, Any], as_json: bool, synthetic: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    _print(data)
    if synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")


# --- the command ----------------------------------------------------------------------------------------------------


def decide(
    feedback: Annotated[
        bool,
        typer.Option(
            "--feedback",
            help="Use stored radiologist feedback: images marked "
            "absent for a finding ('chexd feedback UID --finding F --absent') are its "
            "confirmed false positives.",
        ),
    ] = False,
    apply: Annotated[
        bool,
        typer.Option("--apply", help="Compose the chosen interventions into one candidate version (never activated)."),
    ] = False,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Predictions CSV (image id + 14 probabilities): no model, only thresholds can be routed."),
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels CSV for --predictions or --dicom-dir.")] = None,
    phantom: Annotated[
        str | None, typer.Option(help="Phantom split for validation: train, val or test (default val).")
    ] = None,
    count: Annotated[int, typer.Option(min=10, help="Phantom validation images.")] = 300,
    seed: Annotated[int, typer.Option(help="Phantom series seed, and seed of the split and the bootstrap.")] = 0,
    render_size: Annotated[int, typer.Option(min=64, max=1024, help="Phantom render size in pixels.")] = 256,
    chestxray14: Annotated[
        Path | None, typer.Option(help="ChestX-ray14 folder (images/, Data_Entry_2017*.csv, lists).")
    ] = None,
    split: Annotated[str, typer.Option(help="ChestX-ray14 split: test or train_val.")] = "test",
    dicom_dir: Annotated[Path | None, typer.Option(help="Folder of DICOM images labelled by --labels.")] = None,
    model: Annotated[Path | None, typer.Option(help="Artifact to decide for (default: the active model).")] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="Reference (parent) artifact: a finding whose AUROC CI lies "
            "below the reference's AUROC on the same images has regressed."
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Largest acceptable held-out true-positive loss rate.")
    ] = 0.02,
    max_channels: Annotated[int, typer.Option(min=1, max=64, help="Most weights a channel edit may zero.")] = 5,
    n_bootstrap: Annotated[int, typer.Option(min=50, help="Patient bootstrap resamples for the CIs.")] = 500,
    device: Annotated[str, typer.Option(help="Device for the feature pass: auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass when computing features.")] = 32,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Diagnose every finding on a selection part of the validation data, try the interventions in cost order
    (threshold, channel edit, head row refit, needs data) and route each to the cheapest one verified on the
    patient-disjoint verification part. Prints the routing table; --apply registers one candidate version."""
    from daemon.maintenance import MaintenanceError, SourceOptions

    if predictions is not None:
        given = (
            [
                name
                for name, value in (
                    ("--phantom", phantom),
                    ("--chestxray14", chestxray14),
                    ("--dicom-dir", dicom_dir),
                    ("--model", model),
                    ("--reference", reference),
                )
                if value is not None
            ]
            + (["--feedback"] if feedback else [])
            + (["--apply"] if apply else [])
        )
        if labels is None:
            fail("--predictions needs --labels CSV (e.g. Data_Entry_2017_v2020.csv.gz)", 2)
        if given:
            fail(
                f"--predictions routes thresholds of a predictions file (there is no model); {', '.join(given)} "
                "do(es) not apply",
                2,
            )
        _decide_predictions(
            predictions, labels, seed=seed, n_bootstrap=n_bootstrap, tolerance=tolerance, as_json=json_out
        )
        return
    try:
        source = SourceOptions(
            phantom=phantom,
            count=count,
            seed=seed,
            render_size=render_size,
            chestxray14=chestxray14,
            split=split,
            dicom_dir=dicom_dir,
            labels=labels,
        )
    except MaintenanceError as exc:
        _fail_with(exc)
        return
    _decide_model(
        source,
        model=model,
        reference=reference,
        feedback=feedback,
        apply=apply,
        seed=seed,
        tolerance=tolerance,
        max_channels=max_channels,
        n_bootstrap=n_bootstrap,
        device=device,
        batch_size=batch_size,
        as_json=json_out,
    )


def _decide_predictions(
    predictions: Path, labels: Path, *, seed: int, n_bootstrap: int, tolerance: float, as_json: bool
) -> None:
    from daemon.maintenance import MaintenanceError, run_job
    from model.decide import decide_predictions
    from model.scores import read_scored_csv

    started = time.perf_counter()
    params = {
        "mode": "predictions",
        "predictions": str(predictions),
        "labels": str(labels),
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "tolerance": tolerance,
    }

    def work(job: Any) -> dict[str, Any]:
        scored = read_scored_csv(predictions, labels)
        decision = decide_predictions(
            scored.scores, scored.labels, scored.patients, seed=seed, n_bootstrap=n_bootstrap, tolerance=tolerance
        )
        job.result = {"routed": decision.to_dict()["routed"], "images": len(scored.ids)}
        return decision.to_dict() | {
            "source": scored.source,
            "images": len(scored.ids),
            "dropped_rows": scored.dropped,
            "model": None,
            "candidate": None,
            "features_from_cache": None,
            "message": "no model was changed: a predictions CSV has no model to apply thresholds to (thresholds "
            "routed here assume the 0.5 default as the current threshold)",
        }

    try:
        data = run_job(_settings(), "decide", params, work)
    except MaintenanceError as exc:
        _fail_with(exc)
        return
    data["wall_seconds"] = round(time.perf_counter() - started, 3)
    _emit(data, as_json, synthetic=False)


def _reference_auroc(
    settings: Settings,
    reference: Path,
    source: Any,
    features: FeatureSet,
    selection: Any,
    *,
    device: str,
    batch_size: int,
    report: Any,
) -> dict[str, float]:
    """The reference model's AUROC per finding on the selection images (its own features of the same source)."""
    from daemon.maintenance import load_parent, validation_features
    from model.finetune import head_aurocs

    ref = load_parent(settings, reference)
    ref_features, _ = validation_features(settings, ref, source, device=device, batch_size=batch_size, progress=report)
    ref.network.cpu()
    if ref_features.ids != features.ids:
        raise ValueError("the reference model's features are not of the same images - cannot compare AUROCs")
    head = ref.network.classifier  # type: ignore[union-attr]
    aurocs = head_aurocs(
        ref_features.subset(selection),
        head.weight.detach().float().numpy(),
        head.bias.detach().float().numpy(),
        labels=ref.manifest.labels,
    )
    return {label: a for label, a in zip(ref.manifest.labels, aurocs, strict=True) if a is not None}


def _decide_model(
    source: Any,
    *,
    model: Path | None,
    reference: Path | None,
    feedback: bool,
    apply: bool,
    seed: int,
    tolerance: float,
    max_channels: int,
    n_bootstrap: int,
    device: str,
    batch_size: int,
    as_json: bool,
) -> None:
    from daemon.cli.calibrate import progress_reporter
    from daemon.maintenance import MaintenanceError, backbone_check, load_parent, run_job, validation_features
    from model.decide import compose, decide
    from model.finetune import with_head
    from model.verification import split_features

    started = time.perf_counter()
    settings = _settings()
    try:
        parent = load_parent(settings, model)
    except MaintenanceError as exc:
        _fail_with(exc)
        return
    manifest = parent.manifest
    params: dict[str, Any] = {
        "source": source.to_dict(),
        "parent_version": manifest.version_id,
        "seed": seed,
        "feedback": feedback,
        "apply": apply,
        "tolerance": tolerance,
        "max_channels": max_channels,
        "n_bootstrap": n_bootstrap,
        "reference": str(reference) if reference else None,
    }

    def work(job: Any) -> dict[str, Any]:
        with progress_reporter(quiet=as_json and not sys.stderr.isatty()) as report:
            features, cached = validation_features(
                settings, parent, source, device=device, batch_size=batch_size, progress=report
            )
            parent.network.cpu()
            selection, verification, split = split_features(features, seed=seed)
            false_positives, feedback_images = ({}, 0)
            if feedback:
                false_positives, feedback_images = feedback_false_positives(
                    settings, parent, device=device, batch_size=batch_size
                )
            reference_auroc = None
            if reference is not None:
                reference_auroc = _reference_auroc(
                    settings,
                    reference,
                    source,
                    features,
                    split.selection,
                    device=device,
                    batch_size=batch_size,
                    report=report,
                )
        head = parent.network.classifier  # type: ignore[union-attr]
        weight = head.weight.detach().float().numpy().copy()
        bias = head.bias.detach().float().numpy().copy()
        decision: Decision = decide(
            weight,
            bias,
            manifest.thresholds,
            selection,
            verification,
            split,
            labels=manifest.labels,
            false_positives=false_positives,
            reference_auroc=reference_auroc,
            tolerance=tolerance,
            max_channels=max_channels,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        report_data = decision.to_dict() | {
            "source": features.source,
            "images": len(features),
            "feedback_images": feedback_images if feedback else None,
        }
        candidate = None
        if not apply:
            message = (
                "routing table only: nothing was written ('--apply' composes the chosen interventions into one "
                "candidate version)"
            )
        elif not decision.chosen:
            message = "--apply: no intervention was chosen for any finding - nothing to write, nothing was registered"
        else:
            composition = compose(decision, weight, bias, manifest.thresholds)
            network = with_head(parent.network, composition.weight, composition.bias)
            routed_rows = {
                manifest.labels.index(r.finding)
                for r in decision.chosen
                if r.intervention in ("channel_edit", "head_finetune")
            }

            def check(reloaded: Any) -> dict[str, Any]:
                import torch

                backbone, changed = backbone_check(parent.network, reloaded)
                w0, w1 = parent.network.classifier.weight, reloaded.classifier.weight  # type: ignore[union-attr]
                b0, b1 = parent.network.classifier.bias, reloaded.classifier.bias  # type: ignore[union-attr]
                untouched = [j for j in range(len(manifest.labels)) if j not in routed_rows]
                identical = all(torch.equal(w0[j], w1[j]) and torch.equal(b0[j], b1[j]) for j in untouched)
                if not backbone or not identical:
                    raise ValueError(
                        f"the saved artifact changed more than the routed rows (backbone identical: "
                        f"{backbone}, untouched rows identical: {identical}) - nothing was registered"
                    )
                return {
                    "dtype": manifest.dtype,
                    "backbone_identical": backbone,
                    "changed_weights": changed,
                    "untouched_rows_identical": identical,
                    "rows_checked": len(untouched),
                }

            steps = [(step["operation"], step) for step in composition.steps]
            written = write_candidate_for(
                settings,
                network,
                parent,
                params=params,
                report=report_data,
                check=check,
                thresholds=composition.thresholds,
                steps=steps,
            )
            report_data = written["report"] | {"composition": composition.to_dict()}
            candidate = written["candidate"]
            message = (
                f"registered candidate {candidate['version']} composing {len(composition.steps)} step(s); the "
                f"active model is unchanged - 'chexd model activate {candidate['version']}' makes it active"
            )
        job.result = {"routed": decision.to_dict()["routed"], "candidate": candidate["version"] if candidate else None}
        return report_data | {
            "model": parent.info(),
            "candidate": candidate,
            "features_from_cache": cached,
            "message": message,
        }

    try:
        data = run_job(settings, "decide", params, work)
    except MaintenanceError as exc:
        _fail_with(exc)
        return
    data["wall_seconds"] = round(time.perf_counter() - started, 3)
    _emit(data, as_json, synthetic=manifest.synthetic)


def write_candidate_for(
    settings: Settings,
    network: Any,
    parent: Parent,
    *,
    params: dict[str, Any],
    report: dict[str, Any],
    check: Any,
    thresholds: dict[str, float],
    steps: list[tuple[str, dict[str, Any]]],
) -> dict[str, Any]:
    """The composed head as one candidate (the maintenance layer's write_candidate): one provenance entry per step,
    then the 'decide' entry; the routing table is the manifest's ``metrics['decide']``."""
    from daemon.maintenance import write_candidate

    candidate = write_candidate(
        settings,
        network,
        parent.manifest,
        operation="decide",
        params=params,
        report=report,
        check=check,
        thresholds=thresholds,
        extra_provenance=steps,
    )
    return {"candidate": candidate.to_dict(), "report": candidate.report}
