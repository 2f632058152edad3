"""Evaluation metrics: per-class AUROC with bootstrap confidence intervals, and F1/recall/precision at thresholds.

Inputs are ``scores`` float [N, n_labels] (probabilities) and ``targets`` {0, 1} [N, n_labels], rows paired with the
same images and columns with ``labels``. A class with only one outcome in the data has no AUROC (reported as None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassMetrics:
    """One finding: AUROC with its 95% bootstrap CI, and F1/recall/precision at ``threshold``; ``positives`` and
    ``n`` count images."""

    label: str
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    threshold: float
    f1: float
    recall: float
    precision: float
    positives: int
    n: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Evaluation:
    classes: tuple[ClassMetrics, ...]
    mean_auroc: float | None
    mean_auroc_ci: tuple[float, float] | None

    def to_dict(self) -> dict[str, object]:
        return {
            "mean_auroc": self.mean_auroc,
            "mean_auroc_ci": list(self.mean_auroc_ci) if self.mean_auroc_ci else None,
            "findings": [
                {
                    "label": c.label,
                    "auroc": c.auroc,
                    "auroc_ci": list(c.auroc_ci) if c.auroc_ci else None,
                    "threshold": c.threshold,
                    "f1": c.f1,
                    "recall": c.recall,
                    "precision": c.precision,
                    "positives": c.positives,
                    "n": c.n,
                }
                for c in self.classes
            ],
        }


def _check(scores: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> None:
    if scores.shape != targets.shape or scores.ndim != 2 or scores.shape[1] != len(labels):
        raise ValueError(
            f"Invalid shapes: scores {scores.shape}, targets {targets.shape} - both must be [N, {len(labels)}]"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("Invalid scores - contain NaN or infinity")
    if not np.all(np.isin(targets, (0, 1))):
        raise ValueError("Invalid targets - must be 0 or 1")


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def bootstrap_auroc(y: np.ndarray, s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of ``s`` against 0/1 ``y`` on each bootstrap resample, vectorised: ``counts`` [B, N] says how often each
    image was drawn. Equals ``roc_auc_score(y[idx], s[idx])`` for the resample with those counts (ties count one
    half, as there); NaN where a resample lacks one of the outcomes."""
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    c = counts[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # first index of each run of equal scores
    neg = np.add.reduceat(c * (y_sorted == 0), starts, axis=1)
    pos = np.add.reduceat(c * (y_sorted == 1), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    numerator = (pos * (below + 0.5 * neg)).sum(axis=1)
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def evaluate(
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> Evaluation:
    """Per-class and mean AUROC (mean over classes that have both outcomes) with percentile bootstrap 95% CIs
    (images resampled with replacement, ``n_bootstrap`` times), plus threshold metrics (default threshold 0.5)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    _check(scores, targets, labels)
    thresholds = thresholds or {}
    rng = np.random.default_rng(seed)
    n = len(scores)
    counts = np.zeros((n_bootstrap, n), np.int64)
    for b in range(n_bootstrap):
        counts[b] = np.bincount(rng.integers(0, n, n), minlength=n)
    boot = np.stack([bootstrap_auroc(targets[:, c], scores[:, c], counts) for c in range(len(labels))], axis=1)
    classes = []
    for c, label in enumerate(labels):
        y, s = targets[:, c], scores[:, c]
        threshold = float(thresholds.get(label, 0.5))
        pred = (s >= threshold).astype(np.int64)
        column = boot[:, c][np.isfinite(boot[:, c])]
        auroc = _auroc(y, s)
        classes.append(
            ClassMetrics(
                label=label,
                auroc=auroc,
                auroc_ci=(float(np.percentile(column, 2.5)), float(np.percentile(column, 97.5)))
                if auroc is not None and len(column) >= 10
                else None,
                threshold=threshold,
                f1=float(f1_score(y, pred, zero_division=0)),
                recall=float(recall_score(y, pred, zero_division=0)),
                precision=float(precision_score(y, pred, zero_division=0)),
                positives=int(y.sum()),
                n=n,
            )
        )
    valid = [c.auroc for c in classes if c.auroc is not None]
    mean = float(np.mean(valid)) if valid else None
    present = [c for c, m in enumerate(classes) if m.auroc is not None]
    kept = boot[:, present]
    rows = np.isfinite(kept).any(axis=1) if present else np.zeros(0, bool)
    boot_means = np.nanmean(kept[rows], axis=1) if rows.any() else np.array([])
    mean_ci = (
        (float(np.percentile(boot_means, 2.5)), float(np.percentile(boot_means, 97.5))) if len(boot_means) else None
    )
    return Evaluation(classes=tuple(classes), mean_auroc=mean, mean_auroc_ci=mean_ci)
