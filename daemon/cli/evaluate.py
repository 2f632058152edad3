"""``chexd evaluate``: AUROC with confidence intervals of an artifact on a labelled source."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.train import _progress, _reporter


def evaluate(
    phantom: Annotated[
        str | None, typer.Option(help="Phantom split to evaluate on: train, val or test (the default source: test).")
    ] = None,
    chestxray14: Annotated[
        Path | None, typer.Option(help="ChestX-ray14 folder (images/, Data_Entry_2017*.csv, *_list.txt).")
    ] = None,
    split: Annotated[str, typer.Option(help="ChestX-ray14 split: test or train_val.")] = "test",
    dicom_dir: Annotated[Path | None, typer.Option(help="Folder of DICOM images labelled by --labels.")] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Labels CSV for --dicom-dir: id (SOPInstanceUID or file name), 'Finding Labels' or 0/1 "
                     "columns per finding, optional patient column."),
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Artifact (default: the active model).")] = None,
    count: Annotated[int, typer.Option(min=10, help="Phantom images.")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass (folders).")] = 32,
    n_bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the AUROC CIs.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Per-finding and mean AUROC (bootstrap 95% CI), F1, recall and precision at the artifact's thresholds, on a
    phantom split (default test), a ChestX-ray14 folder or a DICOM folder with a labels CSV."""
    from daemon.cli.calibrate import fail_with, progress_reporter, validation_source
    from daemon.cli.context import settings
    from daemon.maintenance import MaintenanceError, load_parent
    from model.datasets import DatasetError
    from model.errors import ModelError
    from model.metrics import evaluate as evaluate_scores
    from model.scores import score_source
    from model.train import SPLITS, evaluate_on_phantom
    from model.types import LABELS

    if phantom is not None and phantom not in SPLITS:
        fail(f"--phantom {phantom!r} - expected one of {', '.join(SPLITS)}", 2)
    folder = chestxray14 is not None or dicom_dir is not None
    source = None
    if folder or labels is not None:
        source = validation_source(phantom=phantom, count=count, seed=seed, chestxray14=chestxray14, split=split,
                                   dicom_dir=dicom_dir, labels=labels, default_phantom="test")
    try:
        parent = load_parent(settings(), model)
    except MaintenanceError as exc:
        fail_with(exc)
    network, manifest = parent.network, parent.manifest
    thresholds = dict(manifest.thresholds)
    if source is None:
        phantom = phantom or "test"
        with _progress(quiet=as_json) as progress:
            result = evaluate_on_phantom(
                network,
                recipe=manifest.preprocessing,
                split=phantom,
                seed=seed,
                count=count,
                thresholds=thresholds,
                device=device,
                n_bootstrap=n_bootstrap,
                progress=_reporter(progress),
            )
        described, images = f"phantom {phantom}", count
    else:
        try:
            with progress_reporter(quiet=as_json) as report:
                scored = score_source(network, source, recipe=manifest.preprocessing, output_labels=manifest.labels,
                                      device=device, batch_size=batch_size, progress=report)
            result = evaluate_scores(scored.scores, scored.labels, LABELS, thresholds, n_bootstrap=n_bootstrap,
                                     patients=scored.patients)
        except (DatasetError, ModelError) as exc:
            fail(str(exc))
        phantom = None
        described, images = source.description, len(source)
    data = {
        "model": manifest.name,
        "model_version": manifest.short_hash,
        "synthetic": manifest.synthetic,
        "split": phantom if phantom else described,
        "source": described,
        "images": images,
    } | result.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table(
        "finding",
        "AUROC",
        "95% CI",
        "threshold",
        "F1",
        "recall",
        "precision",
        "positives",
        title=f"{manifest.name} {manifest.short_hash} on {described} ({images} images)",
    )
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
    if manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")
