"""``chexd finetune``: refit the whole 14 x C head on cached pooled features with class weighting and early
stopping (``daemon.maintenance.finetune``); writes a candidate artifact, never activates it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.context import settings
from daemon.cli.jobs import guarded, parent
from daemon.cli.options import (
    BatchOpt,
    Cxr14Opt,
    DeviceOpt,
    DryRunOpt,
    JsonOpt,
    LabelsOpt,
    ModelOpt,
    RenderOpt,
    SeedOpt,
)
from daemon.cli.progress import progress_reporter


def _print_finetune(data: dict[str, Any]) -> None:
    table = Table("finding", "AUROC before", "AUROC after", "change", "pos_weight",
                  title=f"head fine-tuning: {data['train_images']} training / {data['val_images']} validation images")

    def fmt(value: float | None, signed: bool = False) -> str:
        return "-" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")

    for c in data["per_class"]:
        table.add_row(c["label"], fmt(c["auroc_before"]), fmt(c["auroc_after"]), fmt(c["auroc_change"], True),
                      f"{c['pos_weight']:.2f}")
    stdout.print(table)
    lines = [
        f"mean AUROC {fmt(data['mean_auroc_before'])} -> {fmt(data['mean_auroc_after'])}; validation loss "
        f"{data['val_loss_before']:.4f} -> {data['val_loss_after']:.4f}",
        f"{data['epochs']} epoch(s) in {data['seconds']:.2f} s (best epoch {data['best_epoch']}"
        + (", stopped early" if data["stopped_early"] else "") + "); features "
        + ("from the cache" if data["features_from_cache"] else f"computed in {data['feature_seconds']:.1f} s"),
        data["message"],
    ]
    for line in lines:
        stdout.print(line, highlight=False, markup=False)


def finetune(
    train_images: Annotated[int, typer.Option(min=10, help="Phantom training images (phantom source).")] = 2000,
    val_images: Annotated[int, typer.Option(min=10, help="Phantom validation images (phantom source).")] = 500,
    seed: SeedOpt = 0,
    render_size: RenderOpt = 256,
    chestxray14: Cxr14Opt = None,
    split: Annotated[str, typer.Option(help="ChestX-ray14 split, cut into patient-disjoint train/val halves.")]
    = "train_val",
    dicom_dir: Annotated[Path | None, typer.Option(help="DICOM folder labelled by --labels, cut into "
                                                        "patient-disjoint train/val halves.")] = None,
    labels: LabelsOpt = None,
    class_weighting: Annotated[str, typer.Option(help="pos_weight per class: sqrt ((1-p)/p)^0.5, balanced "
                                                      "(1-p)/p, or none.")] = "sqrt",
    max_epochs: Annotated[int, typer.Option(min=1)] = 200,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without a better validation loss before stopping.")]
    = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-3,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Retrain only the classifier head on pooled features computed once and cached, with class weighting and early
    stopping on the validation loss; reports time and per-class AUROC changes and registers a candidate version
    (thresholds are kept: recalibrate the candidate with 'chexd calibrate --model PATH')."""
    from daemon.maintenance.finetune import FinetuneOptions
    from daemon.maintenance.finetune import finetune as run_finetune

    if class_weighting not in ("sqrt", "balanced", "none"):
        fail(f"Invalid --class-weighting {class_weighting!r} - expected sqrt, balanced or none", 2)
    if labels is not None and dicom_dir is None:
        fail("--labels goes with --dicom-dir", 2)
    if chestxray14 is not None and dicom_dir is not None:
        fail("choose one data source: --chestxray14 or --dicom-dir", 2)
    cfg = settings()
    loaded = parent(cfg, model)
    options = FinetuneOptions(train_images=train_images, val_images=val_images, seed=seed, render_size=render_size,
                              chestxray14=chestxray14, split=split, dicom_dir=dicom_dir, labels=labels,
                              class_weighting=class_weighting, max_epochs=max_epochs, patience=patience, lr=lr,
                              device=device, batch_size=batch_size, dry_run=dry_run)
    with progress_reporter() as report:
        data = guarded(run_finetune, cfg, loaded, options, progress=report)
    if json_out:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    _print_finetune(data)
    if loaded.manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")
