"""``chexd evaluate``: AUROC with confidence intervals of an artifact on a labelled source
(``daemon.maintenance.evaluate``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.context import settings
from daemon.cli.jobs import guarded, parent, validation_source
from daemon.cli.options import ArtifactOpt, BatchOpt, Cxr14Opt, DeviceOpt, DicomDirOpt, JsonOpt, SplitOpt
from daemon.cli.progress import progress_reporter, stage_bar

if TYPE_CHECKING:
    from model.metrics import Evaluation


def evaluate(
    phantom: Annotated[
        str | None, typer.Option(help="Phantom split to evaluate on: train, val or test (the default source: test).")
    ] = None,
    chestxray14: Cxr14Opt = None,
    split: SplitOpt = "test",
    dicom_dir: DicomDirOpt = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Labels CSV for --dicom-dir: id (SOPInstanceUID or file name), 'Finding Labels' or 0/1 "
                     "columns per finding, optional patient column."),
    ] = None,
    model: ArtifactOpt = None,
    count: Annotated[int, typer.Option(min=10, help="Phantom images.")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    n_bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the AUROC CIs.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Per-finding and mean AUROC (bootstrap 95% CI), F1, recall and precision at the artifact's thresholds, on a
    phantom split (default test), a ChestX-ray14 folder or a DICOM folder with a labels CSV."""
    from daemon.maintenance.evaluate import evaluate_phantom, evaluate_source, evaluation_data
    from model.train import SPLITS

    if phantom is not None and phantom not in SPLITS:
        fail(f"--phantom {phantom!r} - expected one of {', '.join(SPLITS)}", 2)
    source = None
    if chestxray14 is not None or dicom_dir is not None or labels is not None:
        source = validation_source(phantom=phantom, count=count, seed=seed, chestxray14=chestxray14, split=split,
                                   dicom_dir=dicom_dir, labels=labels, default_phantom="test")
    loaded = parent(settings(), model)
    if source is None:
        phantom = phantom or "test"
        with stage_bar(quiet=as_json) as report:
            result = evaluate_phantom(loaded, phantom, seed=seed, count=count, device=device, n_bootstrap=n_bootstrap,
                                      progress=report)
        described, images = f"phantom {phantom}", count
    else:
        with progress_reporter(quiet=as_json) as report:
            result = guarded(evaluate_source, loaded, source, device=device, batch_size=batch_size,
                             n_bootstrap=n_bootstrap, progress=report)
        phantom, described, images = None, source.description, len(source)
    if as_json:
        data = evaluation_data(loaded, result, split=phantom, described=described, images=images)
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    manifest = loaded.manifest
    _print_evaluation(result, f"{manifest.name} {manifest.short_hash} on {described} ({images} images)")
    if manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")


def _print_evaluation(result: Evaluation, title: str) -> None:
    """The per-finding table and the mean AUROC lines."""
    table = Table("finding", "AUROC", "95% CI", "threshold", "F1", "recall", "precision", "positives", title=title)
    for c in result.classes:
        ci = f"{c.auroc_ci[0]:.3f}-{c.auroc_ci[1]:.3f}" if c.auroc_ci else "-"
        table.add_row(
            c.label,
            f"{c.auroc:.3f}" if c.auroc is not None else "-",
            ci,
            f"{c.threshold:.4f}",
            f"{c.f1:.3f}",
            f"{c.recall:.3f}",
            f"{c.precision:.3f}",
            str(c.positives) + ("" if c.positives >= result.min_positives else "*"),
        )
    # in a pipe or log rich assumes 80 columns and squeezes the table; there, use the width it needs
    console = stdout if stdout.is_terminal else Console(file=sys.stdout, width=160)
    console.print(table)

    def mean(value: float | None, ci: tuple[float, float] | None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")

    few = [c.label for c in result.classes if c.positives < result.min_positives]
    lines = [
        f"mean AUROC {mean(result.mean_auroc, result.mean_auroc_ci)} over the findings with both outcomes",
        f"mean AUROC {mean(result.mean_auroc_eligible, result.mean_auroc_eligible_ci)} over the "
        f"{len(result.eligible)} findings with at least {result.min_positives} positives",
        f"CIs: bootstrap resampling {result.resampled}"
        + ("" if result.resampled == "patients" else " (no patient ids: images of one patient count as independent)"),
    ]
    if few:
        lines.append(f"* fewer than {result.min_positives} positives: {', '.join(few)} - reported, no verdict")
    for line in lines:
        console.print(line, highlight=False, markup=False)
