"""``chexd train`` and ``chexd evaluate``: train the phantom demo model and evaluate artifacts (torch loads lazily)."""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daemon.console import err, fail
from daemon.console import out as stdout

SYNTHETIC_USE = "synthetic demo model, not for diagnosis: trained only on chexd's chest phantom"


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    )


def _reporter(progress: Progress):  # type: ignore[no-untyped-def]
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    return report


def train(
    out: Annotated[Path, typer.Option(help="Artifact folder to write.")] = Path("chexd-demo"),
    size: Annotated[int, typer.Option(help="Network input size in pixels.")] = 128,
    arch: Annotated[str, typer.Option(help="densenet121 or tiny (for smoke tests).")] = "densenet121",
    train_images: Annotated[int, typer.Option(help="Phantom training images.")] = 6000,
    val_images: Annotated[int, typer.Option(help="Phantom validation images.")] = 1000,
    test_images: Annotated[int, typer.Option(help="Phantom test images for the reported metrics.")] = 1000,
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weights in the artifact: float16 or float32.")] = "float16",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a DenseNet on the chest phantom (resumable) and write an artifact with test-split metrics.

    The result is a SYNTHETIC DEMO MODEL, NOT FOR DIAGNOSIS: it has only ever seen phantom images."""
    import torch

    from model.applicability import ApplicabilityModel
    from model.artifact import provenance_entry, save_artifact
    from model.network import Architecture, DenseNet
    from model.train import TrainConfig, evaluate_on_phantom
    from model.train import train as run_training
    from model.types import PreprocessRecipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if arch not in ("densenet121", "tiny"):
        fail(f"unknown --arch {arch!r} - expected densenet121 or tiny", 2)
    if not 64 <= size <= 512:
        fail(f"--size {size} must be in 64..512", 2)
    recipe = PreprocessRecipe(input_size=size, resize=None)
    config = TrainConfig(
        seed=seed,
        train_images=train_images,
        val_images=val_images,
        test_images=test_images,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        extra={"arch": arch, "input_size": size},
    )
    architecture = Architecture.densenet121() if arch == "densenet121" else Architecture.tiny()
    torch.manual_seed(seed)
    model = DenseNet(architecture)
    with _progress(quiet) as progress:
        report = _reporter(progress)
        model, metrics = run_training(
            model, config, recipe=recipe, state_path=out.with_name(out.name + ".train-state.pt"), progress=report
        )
        evaluation = evaluate_on_phantom(
            model, recipe=recipe, split="test", seed=seed, count=test_images, device=device, progress=report
        )
    applicability = ApplicabilityModel.from_dict(metrics.pop("applicability"))
    metrics["test"] = evaluation.to_dict()
    metrics["hardware"] = {
        "device": metrics["device"],
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    manifest = save_artifact(
        model,
        out,
        name="chexd-demo" if arch == "densenet121" else "chexd-demo-tiny",
        preprocessing=recipe,
        intended_use=SYNTHETIC_USE,
        synthetic=True,
        dtype=dtype,
        metrics=metrics,
        provenance=(provenance_entry("train", config.to_dict() | {"data": "chexd chest phantom (model.phantom)"}),),
        applicability=applicability,
    )
    stdout.print(
        f"wrote {manifest}: test mean AUROC {evaluation.mean_auroc:.4f} "
        f"(95% CI {evaluation.mean_auroc_ci[0]:.4f}-{evaluation.mean_auroc_ci[1]:.4f})"
        if evaluation.mean_auroc_ci
        else f"wrote {manifest}",
        highlight=False,
    )


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
    from daemon.calibrate_cli import fail_with, progress_reporter, validation_source
    from daemon.cli import settings
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
