"""Evaluation metrics: per-class AUROC with bootstrap confidence intervals, and F1/recall/precision at thresholds.

Inputs are ``scores`` float [N, n_labels] (probabilities) and ``targets`` {0, 1} [N, n_labels], rows paired with the
same images and columns with ``labels``. A class with only one outcome in the data has no AUROC (reported as None).
Given ``patients`` [N], the bootstrap resamples patients (``model.verification.patient_bootstrap_counts``), else
images. Besides the mean AUROC over every class with both outcomes, ``mean_auroc_eligible`` averages only the classes
with at least ``min_positives`` positive images: a class with 2 positives has an AUROC that swings between 0 and 1
from one resample to the next and would otherwise dominate the interval of the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from model.datasets import split_kind
from model.verification import MIN_POSITIVES, interval, patient_bootstrap_counts


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
    """Per-class metrics and two mean AUROCs with percentile bootstrap 95% CIs: ``mean_auroc`` over every class
    with both outcomes, ``mean_auroc_eligible`` over those with >= ``min_positives`` positives (``eligible`` names
    them; None when there are none). ``resampled``: what the bootstrap drew, "patients" or "images"."""

    classes: tuple[ClassMetrics, ...]
    mean_auroc: float | None
    mean_auroc_ci: tuple[float, float] | None
    mean_auroc_eligible: float | None = None
    mean_auroc_eligible_ci: tuple[float, float] | None = None
    eligible: tuple[str, ...] = ()
    min_positives: int = MIN_POSITIVES
    resampled: str = "images"
    n_bootstrap: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "mean_auroc": self.mean_auroc,
            "mean_auroc_ci": list(self.mean_auroc_ci) if self.mean_auroc_ci else None,
            "mean_auroc_eligible": self.mean_auroc_eligible,
            "mean_auroc_eligible_ci": list(self.mean_auroc_eligible_ci) if self.mean_auroc_eligible_ci else None,
            "eligible": list(self.eligible),
            "min_positives": self.min_positives,
            "resampled": self.resampled,
            "n_bootstrap": self.n_bootstrap,
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


def image_bootstrap_counts(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """int64 [n_bootstrap, n]: how often each of n images is drawn when IMAGES are resampled with replacement."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_bootstrap, n), np.int64)
    for b in range(n_bootstrap):
        counts[b] = np.bincount(rng.integers(0, n, n), minlength=n)
    return counts


def bootstrap_counts(
    n: int, n_bootstrap: int, seed: int, patients: Sequence[str | None] | None = None
) -> tuple[np.ndarray, str]:
    """(counts int64 [n_bootstrap, n], "patients" | "images"): patients are resampled when ``patients`` [n] is given
    and at least one id is known (an image without one is its own patient), else images. Raises ValueError when
    ``patients`` does not have n entries or ``n_bootstrap`` is negative."""
    if n_bootstrap < 0:
        raise ValueError(f"Invalid n_bootstrap {n_bootstrap} - must be >= 0")
    if patients is not None:
        patients = list(patients)
        if len(patients) != n:
            raise ValueError(f"Invalid patients: {len(patients)} for {n} images")
        if split_kind(patients) != "image":
            return patient_bootstrap_counts(patients, n_bootstrap, seed), "patients"
    return image_bootstrap_counts(n, n_bootstrap, seed), "images"


def _mean_ci(boot: np.ndarray, columns: list[int]) -> tuple[float, float] | None:
    """Interval of the per-resample mean over ``columns`` of ``boot`` [B, L] (a resample where a column has no AUROC
    averages the others)."""
    if not columns:
        return None
    kept = boot[:, columns]
    rows = np.isfinite(kept).any(axis=1)
    return interval(np.nanmean(kept[rows], axis=1)) if rows.any() else None


def evaluate(
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    patients: Sequence[str | None] | None = None,
    min_positives: int = MIN_POSITIVES,
) -> Evaluation:
    """Per-class and mean AUROC (mean over classes that have both outcomes; ``mean_auroc_eligible`` over those with
    >= ``min_positives`` positives) with percentile bootstrap 95% CIs (``n_bootstrap`` resamples of patients when
    ``patients`` [N] is given, else of images), plus threshold metrics (default threshold 0.5)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    _check(scores, targets, labels)
    thresholds = thresholds or {}
    n = len(scores)
    counts, resampled = bootstrap_counts(n, n_bootstrap, seed, patients)
    boot = np.stack([bootstrap_auroc(targets[:, c], scores[:, c], counts) for c in range(len(labels))], axis=1)
    classes = []
    for c, label in enumerate(labels):
        y, s = targets[:, c], scores[:, c]
        threshold = float(thresholds.get(label, 0.5))
        pred = (s >= threshold).astype(np.int64)
        auroc = _auroc(y, s)
        classes.append(
            ClassMetrics(
                label=label,
                auroc=auroc,
                auroc_ci=interval(boot[:, c]) if auroc is not None else None,
                threshold=threshold,
                f1=float(f1_score(y, pred, zero_division=0)),
                recall=float(recall_score(y, pred, zero_division=0)),
                precision=float(precision_score(y, pred, zero_division=0)),
                positives=int(y.sum()),
                n=n,
            )
        )
    present = [c for c, m in enumerate(classes) if m.auroc is not None]
    eligible = [c for c in present if classes[c].positives >= min_positives]
    return Evaluation(
        classes=tuple(classes),
        mean_auroc=float(np.mean([classes[c].auroc for c in present])) if present else None,
        mean_auroc_ci=_mean_ci(boot, present),
        mean_auroc_eligible=float(np.mean([classes[c].auroc for c in eligible])) if eligible else None,
        mean_auroc_eligible_ci=_mean_ci(boot, eligible),
        eligible=tuple(classes[c].label for c in eligible),
        min_positives=min_positives,
        resampled=resampled,
        n_bootstrap=n_bootstrap,
    )
