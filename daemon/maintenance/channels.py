"""Polarized classifier channels (``chexd channels``; ``model.channels`` does the analysis): the model's classifier
weight [14, C] in LABELS row order, the label statistics of a labels file or the phantom validation split, and the
analysis against all pairs and a row-permutation null. Read-only: no job row, no new model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.errors import MaintenanceError
from daemon.maintenance.parent import load_parent

if TYPE_CHECKING:
    import numpy as np

    from daemon.settings import Settings
    from model.channels import LabelPairs

__all__ = ["analyse", "classifier_weight", "label_pairs"]


def classifier_weight(settings: Settings, model: Path | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The classifier weight [14, C] in LABELS row order, and {name, version, synthetic, path} of the model. Raises
    MaintenanceError when there is no model or its labels are not the 14 findings."""
    from model.types import LABELS

    parent = load_parent(settings, model)
    labels = tuple(parent.manifest.labels)
    if set(labels) != set(LABELS):
        raise MaintenanceError(f"model {parent.path}: its labels {list(labels)} are not the 14 findings {list(LABELS)}")
    weight = parent.network.classifier.weight.detach().cpu().numpy()
    order = [labels.index(name) for name in LABELS]
    return weight[order], {**parent.info(), "path": str(parent.path)}


def label_pairs(labels: Path | None, count: int, phantom_seed: int) -> LabelPairs:
    """Finding-pair statistics of a labels CSV, or of ``count`` phantom validation labels of series
    ``phantom_seed`` (drawn without rendering). Raises MaintenanceError(usage) for an unusable labels file."""
    from model.channels import label_pairs as pairs
    from model.datasets import DatasetError, PhantomSource, read_label_csv

    try:
        if labels is not None:
            table = read_label_csv(labels)
            return pairs(table.labels, source=f"labels file {table.path.name} ({len(table.ids):,} images)")
        source = PhantomSource("val", seed=phantom_seed, count=count)
    except DatasetError as exc:
        raise MaintenanceError(str(exc), usage=True) from exc
    return pairs(
        source.labels,
        source=f"phantom val split labels (series {phantom_seed}, {count:,} images; labels only, nothing rendered)",
    )


def analyse(settings: Settings, model: Path | None, labels: Path | None, *, count: int, phantom_seed: int, top: int,
            draws: int, seed: int, min_expected: float) -> dict[str, Any]:
    """``{model, **ChannelAnalysis.to_dict()}`` for the model and labels. Raises MaintenanceError."""
    from model.channels import ChannelAnalysisError, analyse_channels

    weight, info = classifier_weight(settings, model)
    pairs = label_pairs(labels, count, phantom_seed)
    try:
        result = analyse_channels(weight, pairs, top=top, draws=draws, seed=seed, min_expected=min_expected)
    except ChannelAnalysisError as exc:
        raise MaintenanceError(str(exc)) from exc
    return {"model": info, **result.to_dict()}
