"""Evaluation (``chexd evaluate``): per-finding and mean AUROC (bootstrap 95% CI), F1, recall and precision of a
model at its thresholds, on a phantom split or a labelled source. Read-only: no job row, no new model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.maintenance.errors import MaintenanceError, Progress, quiet

if TYPE_CHECKING:
    from daemon.maintenance.parent import Parent
    from model.datasets import LabelledSource
    from model.metrics import Evaluation

__all__ = ["evaluate_phantom", "evaluate_source", "evaluation_data"]


def evaluate_phantom(parent: Parent, split: str, *, seed: int, count: int, device: str, n_bootstrap: int,
                     progress: Progress = quiet) -> Evaluation:
    """The parent on ``count`` phantom images of ``split`` (series ``seed``)."""
    from model.train import evaluate_on_phantom

    manifest = parent.manifest
    return evaluate_on_phantom(parent.network, recipe=manifest.preprocessing, split=split, seed=seed, count=count,
                               thresholds=dict(manifest.thresholds), device=device, n_bootstrap=n_bootstrap,
                               progress=progress)


def evaluate_source(parent: Parent, source: LabelledSource, *, device: str, batch_size: int, n_bootstrap: int,
                    progress: Progress = quiet) -> Evaluation:
    """The parent on a labelled source (CIs resample patients when it names them). Raises MaintenanceError for an
    unreadable source or image."""
    from model.datasets import DatasetError
    from model.errors import ModelError
    from model.metrics import evaluate
    from model.scores import score_source
    from model.types import LABELS

    manifest = parent.manifest
    try:
        scored = score_source(parent.network, source, recipe=manifest.preprocessing, output_labels=manifest.labels,
                              device=device, batch_size=batch_size, progress=progress)
        return evaluate(scored.scores, scored.labels, LABELS, dict(manifest.thresholds), n_bootstrap=n_bootstrap,
                        patients=scored.patients)
    except (DatasetError, ModelError) as exc:
        raise MaintenanceError(str(exc)) from exc


def evaluation_data(parent: Parent, result: Evaluation, *, split: str | None, described: str, images: int
                    ) -> dict[str, Any]:
    """The ``--json`` object: the model, the data, then the evaluation's fields."""
    manifest = parent.manifest
    return {
        "model": manifest.name,
        "model_version": manifest.short_hash,
        "synthetic": manifest.synthetic,
        "split": split if split else described,
        "source": described,
        "images": images,
    } | result.to_dict()
