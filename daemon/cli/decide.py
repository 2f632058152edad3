"""``chexd decide``: the treatment decision system as a command (``daemon.maintenance.decide`` runs the job,
``model.decide`` decides).

It loads the active model (or ``--model``) and prints the routing table the layer returns: per finding the problem,
the evidence, the chosen intervention, its cost, its verified effect with a CI and the cheaper options rejected.
``--apply`` composes the chosen interventions into ONE candidate version; nothing is ever activated. With
``--predictions CSV --labels CSV`` there is no model: only thresholds can be routed, and the output says so.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.context import settings
from daemon.cli.jobs import guarded, parent, source_options
from daemon.cli.options import (
    BatchOpt,
    CountOpt,
    Cxr14Opt,
    DeviceOpt,
    DicomDirOpt,
    JsonOpt,
    ModelOpt,
    PhantomOpt,
    RenderOpt,
    SplitOpt,
)
from daemon.cli.progress import progress_reporter

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
    phantom: PhantomOpt = None,
    count: CountOpt = 300,
    seed: Annotated[int, typer.Option(help="Phantom series seed, and seed of the split and the bootstrap.")] = 0,
    render_size: RenderOpt = 256,
    chestxray14: Cxr14Opt = None,
    split: SplitOpt = "test",
    dicom_dir: DicomDirOpt = None,
    model: ModelOpt = None,
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
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    json_out: JsonOpt = False,
) -> None:
    """Diagnose every finding on a selection part of the validation data, try the interventions in cost order
    (threshold, channel edit, head row refit, needs data) and route each to the cheapest one verified on the
    patient-disjoint verification part. Prints the routing table; --apply registers one candidate version."""
    from daemon.maintenance.decide import DecideOptions

    if predictions is not None:
        _check_predictions_mode(labels, phantom=phantom, chestxray14=chestxray14, dicom_dir=dicom_dir, model=model,
                                reference=reference, feedback=feedback, apply=apply)
        assert labels is not None  # _check_predictions_mode ended the command otherwise
        _decide_predictions(predictions, labels, seed=seed, n_bootstrap=n_bootstrap, tolerance=tolerance,
                            as_json=json_out)
        return
    source = source_options(phantom=phantom, count=count, seed=seed, render_size=render_size, chestxray14=chestxray14,
                            split=split, dicom_dir=dicom_dir, labels=labels)
    options = DecideOptions(feedback=feedback, apply=apply, reference=reference, seed=seed, tolerance=tolerance,
                            max_channels=max_channels, n_bootstrap=n_bootstrap, device=device, batch_size=batch_size)
    _decide_model(source, model=model, options=options, as_json=json_out)


def _check_predictions_mode(labels: Path | None, *, feedback: bool, apply: bool, **options: Any) -> None:
    """--predictions needs --labels and takes none of the model's options (exit 2 otherwise)."""
    given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
    given += (["--feedback"] if feedback else []) + (["--apply"] if apply else [])
    if labels is None:
        fail("--predictions needs --labels CSV (e.g. Data_Entry_2017_v2020.csv.gz)", 2)
    if given:
        fail(
            f"--predictions routes thresholds of a predictions file (there is no model); {', '.join(given)} "
            "do(es) not apply",
            2,
        )


def _decide_predictions(
    predictions: Path, labels: Path, *, seed: int, n_bootstrap: int, tolerance: float, as_json: bool
) -> None:
    from daemon.maintenance.decide import decide_predictions

    started = time.perf_counter()
    data = guarded(decide_predictions, settings(), predictions, labels, seed=seed, n_bootstrap=n_bootstrap,
                   tolerance=tolerance)
    data["wall_seconds"] = round(time.perf_counter() - started, 3)
    _emit(data, as_json, synthetic=False)


def _decide_model(source: Any, *, model: Path | None, options: Any, as_json: bool) -> None:
    from daemon.maintenance.decide import decide_model

    started = time.perf_counter()
    cfg = settings()
    loaded = parent(cfg, model)
    with progress_reporter(quiet=as_json and not sys.stderr.isatty()) as report:
        data = guarded(decide_model, cfg, loaded, source, options, progress=report)
    data["wall_seconds"] = round(time.perf_counter() - started, 3)
    _emit(data, as_json, synthetic=loaded.manifest.synthetic)
