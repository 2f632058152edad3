"""Head fine-tuning (``chexd finetune``): refit the whole 14 x C classifier head on cached pooled features with class
weighting and early stopping (``model.finetune``); registers a candidate (thresholds kept), never activates it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.candidate import backbone_check, write_candidate
from daemon.maintenance.errors import Progress, quiet
from daemon.maintenance.jobs import run_job
from daemon.maintenance.sources import SourceOptions, validation_features

if TYPE_CHECKING:
    from torch import nn

    from daemon.maintenance.parent import Parent
    from daemon.settings import Settings
    from model.features import FeatureSet

__all__ = ["FinetuneOptions", "finetune"]


@dataclass(frozen=True, kw_only=True, slots=True)
class FinetuneOptions:
    """The data (phantom ``train_images``/``val_images`` of series ``seed`` at ``render_size`` px, or one folder -
    ``chestxray14`` with ``split``, or ``dicom_dir`` with ``labels`` - cut into patient-disjoint halves) and the fit
    (``class_weighting``: sqrt, balanced or none; ``max_epochs``, ``patience``, ``lr``); ``dry_run``: write
    nothing."""

    train_images: int = 2000
    val_images: int = 500
    seed: int = 0
    render_size: int = 256
    chestxray14: Path | None = None
    split: str = "train_val"
    dicom_dir: Path | None = None
    labels: Path | None = None
    class_weighting: str = "sqrt"
    max_epochs: int = 200
    patience: int = 10
    lr: float = 1e-3
    device: str = "auto"
    batch_size: int = 32
    dry_run: bool = False

    @property
    def is_phantom(self) -> bool:
        return self.chestxray14 is None and self.dicom_dir is None


def finetune(settings: Settings, parent: Parent, options: FinetuneOptions, progress: Progress = quiet
             ) -> dict[str, Any]:
    """Fine-tune the parent's head inside a ``finetune`` job record; the report with ``candidate`` and ``message``
    (no candidate when no epoch improved the validation loss, or on a dry run). Raises MaintenanceError."""
    from model.finetune import finetune_head, with_head

    o, network, manifest = options, parent.network, parent.manifest
    params: dict[str, Any] = {"class_weighting": o.class_weighting, "max_epochs": o.max_epochs,
                              "patience": o.patience, "lr": o.lr, "seed": o.seed,
                              "parent_version": manifest.version_id, "dry_run": o.dry_run}

    def work(job: Any) -> dict[str, Any]:
        started = time.perf_counter()
        train, val, cached = _halves(settings, parent, o, params, progress)
        feature_seconds = time.perf_counter() - started
        network.cpu()  # the head is trained on the CPU, on the cached features
        head = network.classifier  # type: ignore[union-attr]
        result = finetune_head(train, val, head.weight.detach().float().numpy(), head.bias.detach().float().numpy(),
                               labels=manifest.labels, class_weighting=o.class_weighting,  # type: ignore[arg-type]
                               max_epochs=o.max_epochs, patience=o.patience, lr=o.lr, seed=o.seed, progress=progress)
        summary = result.to_dict() | {"features_from_cache": cached, "feature_seconds": round(feature_seconds, 3),
                                      "train_source": train.source, "val_source": val.source}
        candidate, summary, message = _finish(settings, parent, o, params, result, summary,
                                              with_head(network, result.weight, result.bias), val)
        job.result = {"epochs": result.epochs, "seconds": round(result.seconds, 3),
                      "mean_auroc_before": result.mean_auroc_before, "mean_auroc_after": result.mean_auroc_after,
                      "candidate": candidate["version"] if candidate else None}
        return summary | {"model": parent.info(), "candidate": candidate, "message": message}

    return run_job(settings, "finetune", params, work)


def _halves(settings: Settings, parent: Parent, o: FinetuneOptions, params: dict[str, Any], progress: Progress
            ) -> tuple[FeatureSet, FeatureSet, bool]:
    """(train features, validation features, both from the cache): the phantom's train and val splits, or one
    folder cut into patient-disjoint halves. Adds the data to ``params``."""
    if o.is_phantom:
        parts = [
            validation_features(settings, parent, SourceOptions(phantom=split_name, count=n, seed=o.seed,
                                                                render_size=o.render_size),
                                device=o.device, batch_size=o.batch_size, progress=progress)
            for split_name, n in (("train", o.train_images), ("val", o.val_images))
        ]
        (train, hit_train), (val, hit_val) = parts
        params.update({"source": "phantom", "train_images": o.train_images, "val_images": o.val_images,
                       "render_size": o.render_size})
        return train, val, hit_train and hit_val
    from model.datasets import patient_disjoint_halves, split_kind

    everything, cached = validation_features(
        settings, parent, SourceOptions(chestxray14=o.chestxray14, split=o.split, dicom_dir=o.dicom_dir,
                                        labels=o.labels, seed=o.seed, render_size=o.render_size),
        device=o.device, batch_size=o.batch_size, progress=progress)
    a, b = patient_disjoint_halves(everything.patients, seed=o.seed)
    train, val = everything.subset(a), everything.subset(b)
    params.update({"source": everything.source, "train_images": len(train), "val_images": len(val),
                   "split_by": split_kind(everything.patients)})
    return train, val, cached


def _finish(settings: Settings, parent: Parent, o: FinetuneOptions, params: dict[str, Any], result: Any,
            summary: dict[str, Any], edited: nn.Module, val: FeatureSet
            ) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """(candidate, report, message): nothing when no epoch improved, a checked dry run, or a registered candidate."""
    network, manifest = parent.network, parent.manifest

    def check(reloaded: nn.Module) -> dict[str, Any]:
        import numpy as np

        from model.finetune import head_aurocs

        backbone, changed = backbone_check(network, reloaded)
        if not backbone:
            raise ValueError("the saved artifact's backbone differs from the parent's - nothing was registered")
        saved = reloaded.classifier  # type: ignore[union-attr]
        aurocs = head_aurocs(val, saved.weight.detach().numpy(), saved.bias.detach().numpy(), labels=manifest.labels)
        known = [v for v in aurocs if v is not None]
        return {"dtype": manifest.dtype, "backbone_identical": backbone, "changed_weights": changed,
                "mean_auroc_after": float(np.mean(known)) if known else None}

    if result.best_epoch == 0:
        return None, summary, (f"no epoch improved the validation loss ({result.val_loss_before:.4f}): the head is "
                               "unchanged and nothing was registered - try another --lr or more training images")
    if o.dry_run:
        summary["saved_artifact"] = check(edited)
        return None, summary, "dry run: no candidate was written; the active model is unchanged"
    written = write_candidate(settings, edited, manifest, operation="finetune", params=params, report=summary,
                              check=check)
    message = (f"registered candidate {written.version} (version {written.manifest_version}; thresholds kept "
               f"from the parent; recalibrate with 'chexd calibrate --model {written.path}'); the active "
               f"model is unchanged - 'chexd model activate {written.version}' makes it active")
    return written.to_dict(), written.report, message
