"""Model scores paired with labels: a predictions CSV joined with a labels CSV, or a model run over a source.

A predictions CSV has an image id column (e.g. 'Image Index') and 14 probability columns named ``prob_<Label>`` or
``<Label>`` (LABELS names, ignoring case, spaces and '_'); the labels CSV is read by
``model.datasets.read_label_csv`` (NIH ``Data_Entry_2017`` style or one 0/1 column per finding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.datasets import (
    ID_COLUMNS,
    DatasetError,
    LabelledSource,
    find_column,
    read_csv,
    read_label_csv,
)
from model.types import LABELS, PreprocessRecipe

if TYPE_CHECKING:
    import torch

__all__ = ["ScoredSet", "read_scored_csv", "score_source"]

_N = len(LABELS)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True, slots=True)
class ScoredSet:
    """Scores paired with labels, one row per image: ``scores`` float64 [N, 14] probabilities in [0, 1],
    ``labels`` uint8 [N, 14], both in LABELS order; ``patients`` None where unknown. ``dropped`` counts prediction
    rows without a label row (``dropped_examples``: the first few ids); ``source`` says where the data came from."""

    ids: tuple[str, ...]
    patients: tuple[str | None, ...]
    scores: np.ndarray
    labels: np.ndarray
    source: str = ""
    dropped: int = 0
    dropped_examples: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.scores.shape != (n, _N) or self.labels.shape != (n, _N):
            raise ValueError(
                f"Invalid shapes: scores {self.scores.shape}, labels {self.labels.shape} for {n} ids - "
                f"expected [{n}, {_N}]"
            )
        if len(self.patients) != n:
            raise ValueError(f"Invalid patients: {len(self.patients)} for {n} ids")
        if not np.all(np.isfinite(self.scores)) or self.scores.min(initial=0) < 0 or self.scores.max(initial=0) > 1:
            raise ValueError("Invalid scores - must be finite probabilities in [0, 1]")
        if self.labels.size and not np.isin(self.labels, (0, 1)).all():
            raise ValueError("Invalid labels - must be 0 or 1")


def _prob_columns(path: Path, header: list[str]) -> list[int]:
    columns = []
    missing = []
    for label in LABELS:
        col = find_column(header, [f"prob_{label}", label])
        if col is None:
            missing.append(label)
        columns.append(col)
    if missing:
        raise DatasetError(
            f"{path}: probability column(s) missing: {', '.join(missing)} - expected 'prob_<Label>' or '<Label>' "
            f"headers for all {_N} findings; the header is {header}"
        )
    return [c for c in columns if c is not None]


def read_predictions_csv(path: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """(ids, probabilities float64 [N, 14]) from a predictions CSV. The id column is one of ``ID_COLUMNS``, else the
    first column when it is not a probability column. Raises DatasetError: missing columns, non-numeric values or
    values outside [0, 1] (line named), duplicate or empty ids, no rows."""
    path = Path(path)
    header, rows = read_csv(path)
    prob_cols = _prob_columns(path, header)
    id_col = find_column(header, ID_COLUMNS)
    if id_col is None:
        if 0 in prob_cols:
            raise DatasetError(f"{path}: no image id column - expected one of {', '.join(ID_COLUMNS)}")
        id_col = 0
    if not rows:
        raise DatasetError(f"{path}: no data rows")
    try:
        scores = np.array([[row[c] for c in prob_cols] for row in rows], dtype=np.float64)
    except ValueError:
        for line, row in enumerate(rows, start=2):
            for c in prob_cols:
                try:
                    float(row[c])
                except ValueError:
                    raise DatasetError(
                        f"{path}: line {line}, column {header[c]!r}: {row[c]!r} is not a number"
                    ) from None
        raise
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1) | (scores < 0).any(axis=1) | (scores > 1).any(axis=1))
    if len(bad):
        raise DatasetError(
            f"{path}: {len(bad)} row(s) have values that are not probabilities in [0, 1] (line {bad[0] + 2} first) "
            "- write sigmoid outputs, not logits"
        )
    ids = tuple(row[id_col].strip() for row in rows)
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate image ids in {header[id_col]!r}")
    if not all(ids):
        raise DatasetError(f"{path}: empty image ids in {header[id_col]!r}")
    return ids, scores


def read_scored_csv(predictions: Path, labels: Path) -> ScoredSet:
    """Join a predictions CSV with a labels CSV on the image id.

    Rows of the predictions without a label row are dropped and counted (``dropped``); label rows without a
    prediction are ignored (a label file usually covers more images than one split). Raises DatasetError for an
    unusable file (see :func:`read_predictions_csv`, ``read_label_csv``) or when no row joins.
    """
    ids, scores = read_predictions_csv(predictions)
    table = read_label_csv(labels)
    lookup = table.index()
    rows = np.array([lookup.get(i, -1) for i in ids])
    joined = rows >= 0
    dropped = [i for i, ok in zip(ids, joined, strict=True) if not ok]
    if not joined.any():
        raise DatasetError(
            f"no prediction in {predictions} has a label row in {labels}: none of its {len(ids)} ids (e.g. "
            f"{ids[0]!r}) is in the labels' {table.id_column!r} column (e.g. {table.ids[0]!r})"
        )
    kept = rows[joined]
    return ScoredSet(
        ids=tuple(i for i, ok in zip(ids, joined, strict=True) if ok),
        patients=tuple(table.patients[r] for r in kept),
        scores=scores[joined],
        labels=table.labels[kept],
        source=f"{Path(predictions).name} joined with {Path(labels).name}",
        dropped=len(dropped),
        dropped_examples=tuple(dropped[:5]),
    )


def score_source(
    model: torch.nn.Module,
    source: LabelledSource,
    *,
    recipe: PreprocessRecipe,
    output_labels: Sequence[str] = LABELS,
    device: str = "auto",
    batch_size: int = 32,
    progress: Progress | None = None,
) -> ScoredSet:
    """Run ``model`` over every image of ``source``, ``batch_size`` at a time (only one batch of decoded images is
    in memory), and return its sigmoid outputs reordered from ``output_labels`` (the model's output order, e.g. a
    manifest's labels) to LABELS. Raises DatasetError when ``output_labels`` lacks one of LABELS, and (chained) for
    an image that fails to decode or prepare, naming it."""
    import torch

    from model.engine import pick_device, prepare
    from model.errors import ModelError
    from model.train import predict_scores

    output_labels = tuple(output_labels)
    missing = [label for label in LABELS if label not in output_labels]
    if missing:
        raise DatasetError(f"the model has no output for {', '.join(missing)} - it cannot be scored on the 14 findings")
    columns = [output_labels.index(label) for label in LABELS]
    target = pick_device(device)
    model.to(target, memory_format=torch.channels_last)
    n = len(source)
    out = []
    for start in range(0, n, batch_size):
        batch = []
        for i in range(start, min(start + batch_size, n)):
            try:
                batch.append(prepare(source.load(i), recipe))
            except ModelError as exc:
                raise DatasetError(f"image {source.ids[i]!r}: {exc}") from exc
        out.append(predict_scores(model, torch.stack(batch), target, batch_size=batch_size))
        if progress:
            progress("score images", min(start + batch_size, n), n)
    return ScoredSet(
        ids=source.ids,
        patients=source.patients,
        scores=np.concatenate(out)[:, columns].astype(np.float64),
        labels=source.labels,
        source=source.description,
    )
