"""``chexd calibrate``: per-class thresholds fitted on one patient-disjoint half, reported on the other.

Two modes. With ``--predictions CSV --labels CSV`` it calibrates those scores and changes no model (a predictions
file has no model to attach thresholds to). Otherwise it runs a model (default: the active one) over a validation
source (phantom split, ChestX-ray14 folder, or DICOM folder + labels CSV), fits the thresholds and registers a new
*candidate* version carrying them; the active model is never changed (``chexd model activate`` does that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.context import settings
from daemon.cli.jobs import guarded, parent, validation_source
from daemon.cli.options import (
    BatchOpt,
    CountOpt,
    Cxr14Opt,
    DeviceOpt,
    DicomDirOpt,
    DryRunOpt,
    JsonOpt,
    ModelOpt,
    PhantomOpt,
    SplitOpt,
)
from daemon.cli.progress import progress_reporter


def _ci(values: list[float] | None) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}" if values else "-"


def _print_table(data: dict[str, Any], title: str) -> None:
    # in a pipe or log rich assumes 80 columns and squeezes the table; there, use the width it needs
    console = stdout if stdout.is_terminal else Console(file=sys.stdout, width=160)
    table = Table("finding", "threshold", "F1", "95% CI", "F1@0.5", "recall", "recall@0.5", "precision",
                  "precision@0.5", "positives fit/held-out", title=title)
    for c in data["findings"]:
        table.add_row(
            c["label"],
            f"{c['threshold']:.4f}" + ("" if c["fitted"] else "*"),
            f"{c['f1']:.3f}",
            _ci(c["f1_ci"]),
            f"{c['f1_default']:.3f}",
            f"{c['recall']:.3f}",
            f"{c['recall_default']:.3f}",
            f"{c['precision']:.3f}",
            f"{c['precision_default']:.3f}",
            f"{c['fit_positives']}/{c['report_positives']}",
        )
    console.print(table)
    if any(not c["fitted"] for c in data["findings"]):
        console.print("* not fitted (one outcome only in the fit half): threshold kept", highlight=False)

    def fmt(name: str) -> str:
        value = data[name]
        return "-" if value is None else f"{value:.3f} (95% CI {_ci(data[name + '_ci'])})"

    lines = [
        f"held-out half: {data['n_report']} images, fit half: {data['n_fit']} images"
        + (" (first split)" if data.get("n_splits", 1) > 1 else "") + f" ({data['note']})",
        f"{data.get('n_splits', 1)} patient-disjoint split(s) (seeds {data['seed']}-"
        f"{data['seed'] + data.get('n_splits', 1) - 1}); thresholds fitted on {data.get('thresholds_source', '')}",
        f"mean F1 {fmt('mean_f1')} vs {fmt('mean_f1_default')} at 0.5",
        f"mean recall {fmt('mean_recall')} vs {fmt('mean_recall_default')} at 0.5",
        f"mean precision {fmt('mean_precision')} vs {fmt('mean_precision_default')} at 0.5",
        f"F1 ratio {fmt('f1_ratio')}, recall ratio {fmt('recall_ratio')} ({data['objective']} thresholds / 0.5)",
    ]
    if data.get("dropped_rows"):
        lines.append(f"{data['dropped_rows']} prediction row(s) had no label row and were left out")
    lines.append(data["message"])
    for line in lines:
        console.print(line, highlight=False, markup=False)


def _emit(data: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_table(data, title)


def calibrate(
    objective: Annotated[str, typer.Option(help="Threshold rule: youden (max TPR-FPR) or f1 (max F1).")] = "youden",
    predictions: Annotated[
        Path | None,
        typer.Option(help="Predictions CSV (image id + 14 probabilities, 'prob_<Label>' or '<Label>' headers); "
                     "calibrates these scores and changes no model."),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Labels CSV for --predictions or --dicom-dir (NIH Data_Entry style or 0/1 columns)."),
    ] = None,
    phantom: PhantomOpt = None,
    count: CountOpt = 300,
    chestxray14: Cxr14Opt = None,
    split: SplitOpt = "test",
    dicom_dir: DicomDirOpt = None,
    model: ModelOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the halves and the bootstrap (and of the phantom).")] = 0,
    n_bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the CIs.")] = 200,
    splits: Annotated[
        int,
        typer.Option("--splits", min=1, help="Patient-disjoint fit/held-out splits (seeds seed..seed+N-1): figures "
                     "are their means and CIs pool their patient bootstraps, so they include split variability; "
                     "with N > 1 the thresholds written are fitted on all images."),
    ] = 5,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit per-class thresholds on one patient-disjoint half and report F1/recall/precision on the other (patient
    bootstrap 95% CIs) against the 0.5 threshold, repeated over --splits patient-disjoint splits (CIs include the
    split variability). A model run writes a new candidate version; the active model is unchanged."""
    from model.calibrate import OBJECTIVES

    if objective not in OBJECTIVES:
        fail(f"Invalid --objective {objective!r} - expected one of {', '.join(OBJECTIVES)}", 2)
    if predictions is not None:
        if labels is None:
            fail("--predictions needs --labels CSV (e.g. Data_Entry_2017_v2020.csv.gz)", 2)
        given = [name for name, value in (("--phantom", phantom), ("--chestxray14", chestxray14),
                                          ("--dicom-dir", dicom_dir), ("--model", model)) if value is not None]
        if given:
            fail(f"--predictions calibrates a predictions file; {', '.join(given)} do(es) not apply", 2)
        from daemon.maintenance.calibrate import calibrate_predictions

        data = guarded(calibrate_predictions, settings(), predictions, labels, objective=objective, seed=seed,
                       n_bootstrap=n_bootstrap, n_splits=splits)
        _emit(data, json_out, f"{objective} thresholds on {data['source']}")
        return
    source = validation_source(phantom=phantom, count=count, seed=seed, chestxray14=chestxray14, split=split,
                               dicom_dir=dicom_dir, labels=labels, default_phantom="val")
    _calibrate_model(source, model=model, objective=objective, seed=seed, n_bootstrap=n_bootstrap, n_splits=splits,
                     device=device, batch_size=batch_size, dry_run=dry_run, as_json=json_out)


def _calibrate_model(source: Any, *, model: Path | None, objective: str, seed: int, n_bootstrap: int, n_splits: int,
                     device: str, batch_size: int, dry_run: bool, as_json: bool) -> None:
    from daemon.maintenance.calibrate import calibrate_model

    cfg = settings()
    loaded = parent(cfg, model)
    with progress_reporter() as report:
        data = guarded(calibrate_model, cfg, loaded, source, objective=objective, seed=seed, n_bootstrap=n_bootstrap,
                       n_splits=n_splits, device=device, batch_size=batch_size, dry_run=dry_run, progress=report)
    manifest = loaded.manifest
    title = f"{manifest.name} {manifest.version_id}: {objective} thresholds on {source.description}"
    _emit(data, as_json, title)
    if manifest.synthetic and not as_json:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")
