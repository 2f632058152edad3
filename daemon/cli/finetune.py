"""``chexd finetune``: refit the whole 14 x C head on cached pooled features with class weighting and early
stopping (``model.finetune``); writes a candidate artifact, never activates it."""


from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout

if TYPE_CHECKING:
    from torch import nn

    from model.features import FeatureSet

from daemon.cli.correct import (
    BatchOpt,
    Cxr14Opt,
    DeviceOpt,
    DryRunOpt,
    JsonOpt,
    LabelsOpt,
    ModelOpt,
    RenderOpt,
    SeedOpt,
    _parent,
    _reporter,
    _run_job,
    _settings,
)


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
    import time

    import numpy as np

    from daemon.maintenance import SourceOptions, backbone_check, validation_features, write_candidate
    from model.finetune import finetune_head, with_head

    if class_weighting not in ("sqrt", "balanced", "none"):
        fail(f"Invalid --class-weighting {class_weighting!r} - expected sqrt, balanced or none", 2)
    if labels is not None and dicom_dir is None:
        fail("--labels goes with --dicom-dir", 2)
    if chestxray14 is not None and dicom_dir is not None:
        fail("choose one data source: --chestxray14 or --dicom-dir", 2)
    settings = _settings()
    parent = _parent(settings, model)
    network, manifest = parent.network, parent.manifest
    params: dict[str, Any] = {"class_weighting": class_weighting, "max_epochs": max_epochs, "patience": patience,
                              "lr": lr, "seed": seed, "parent_version": manifest.version_id, "dry_run": dry_run}

    def work(job: Any) -> dict[str, Any]:
        started = time.perf_counter()
        with _reporter(quiet=False) as report:
            if chestxray14 is None and dicom_dir is None:
                parts: list[tuple[FeatureSet, bool]] = [
                    validation_features(settings, parent, SourceOptions(phantom=split_name, count=n, seed=seed,
                                                                        render_size=render_size),
                                        device=device, batch_size=batch_size, progress=report)
                    for split_name, n in (("train", train_images), ("val", val_images))
                ]
                (train, hit_train), (val, hit_val) = parts
                cached = hit_train and hit_val
                params.update({"source": "phantom", "train_images": train_images, "val_images": val_images,
                               "render_size": render_size})
            else:
                from model.datasets import patient_disjoint_halves, split_kind

                everything, cached = validation_features(
                    settings, parent, SourceOptions(chestxray14=chestxray14, split=split, dicom_dir=dicom_dir,
                                                    labels=labels, seed=seed, render_size=render_size),
                    device=device, batch_size=batch_size, progress=report)
                a, b = patient_disjoint_halves(everything.patients, seed=seed)
                train, val = everything.subset(a), everything.subset(b)
                params.update({"source": everything.source, "train_images": len(train), "val_images": len(val),
                               "split_by": split_kind(everything.patients)})
            feature_seconds = time.perf_counter() - started
            network.cpu()  # the head is trained on the CPU, on the cached features
            head = network.classifier  # type: ignore[union-attr]
            result = finetune_head(train, val, head.weight.detach().float().numpy(),
                                   head.bias.detach().float().numpy(), labels=manifest.labels,
                                   class_weighting=class_weighting,  # type: ignore[arg-type]
                                   max_epochs=max_epochs, patience=patience, lr=lr, seed=seed, progress=report)
        summary = result.to_dict() | {"features_from_cache": cached, "feature_seconds": round(feature_seconds, 3),
                                      "train_source": train.source, "val_source": val.source}
        edited = with_head(network, result.weight, result.bias)

        def check(reloaded: nn.Module) -> dict[str, Any]:
            from model.finetune import head_aurocs

            backbone, changed = backbone_check(network, reloaded)
            if not backbone:
                raise ValueError("the saved artifact's backbone differs from the parent's - nothing was registered")
            saved = reloaded.classifier  # type: ignore[union-attr]
            aurocs = head_aurocs(val, saved.weight.detach().numpy(), saved.bias.detach().numpy(),
                                 labels=manifest.labels)
            known = [v for v in aurocs if v is not None]
            return {"dtype": manifest.dtype, "backbone_identical": backbone, "changed_weights": changed,
                    "mean_auroc_after": float(np.mean(known)) if known else None}

        if result.best_epoch == 0:
            candidate = None
            message = (f"no epoch improved the validation loss ({result.val_loss_before:.4f}): the head is unchanged "
                       "and nothing was registered - try another --lr or more training images")
        elif dry_run:
            candidate = None
            summary["saved_artifact"] = check(edited)
            message = "dry run: no candidate was written; the active model is unchanged"
        else:
            written = write_candidate(settings, edited, manifest, operation="finetune", params=params,
                                      report=summary, check=check)
            candidate, summary = written.to_dict(), written.report
            message = (f"registered candidate {written.version} (version {written.manifest_version}; thresholds kept "
                       f"from the parent; recalibrate with 'chexd calibrate --model {written.path}'); the active "
                       f"model is unchanged - 'chexd model activate {written.version}' makes it active")
        job.result = {"epochs": result.epochs, "seconds": round(result.seconds, 3),
                      "mean_auroc_before": result.mean_auroc_before, "mean_auroc_after": result.mean_auroc_after,
                      "candidate": candidate["version"] if candidate else None}
        return summary | {"model": parent.info(), "candidate": candidate, "message": message}

    data = _run_job(settings, "finetune", params, work)
    if json_out:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    _print_finetune(data)
    if manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")
