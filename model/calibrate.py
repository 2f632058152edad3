"""Per-class decision thresholds: fitted on one patient-disjoint half, reported on the other with bootstrap CIs.

``calibrate(scores, labels, patients)`` splits the images into two halves that share no patient
(``model.datasets.patient_disjoint_halves``), fits one threshold per finding on the first (Youden's J from
``sklearn.metrics.roc_curve``, or the F1-optimal point of ``precision_recall_curve``) and reports F1, recall and
precision on the held-out half at the fitted thresholds and at 0.5, each with a percentile bootstrap 95% CI
(patients resampled with replacement when known, else images). ``f1_ratio`` = mean F1 (fitted) / mean F1 (0.5) and
``recall_ratio`` likewise, on the held-out half; means are over the findings with a positive in that half.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve, precision_score, recall_score, roc_curve

from model.datasets import patient_disjoint_halves, split_kind
from model.types import LABELS
from model.verification import group_counts, interval

__all__ = [
    "OBJECTIVES",
    "THRESHOLD_RANGE",
    "CalibrationResult",
    "ClassCalibration",
    "Estimate",
    "ThresholdCalibrator",
    "calibrate",
    "fit_threshold",
]

Objective = Literal["youden", "f1"]
OBJECTIVES: tuple[str, ...] = ("youden", "f1")
THRESHOLD_RANGE = (1e-4, 1.0 - 1e-4)  # a manifest threshold must lie strictly inside (0, 1)
DEFAULT_THRESHOLD = 0.5


def fit_threshold(y: np.ndarray, s: np.ndarray, objective: Objective = "youden") -> float | None:
    """The threshold t (predict positive when ``s >= t``) that maximises Youden's J = TPR - FPR (``"youden"``) or F1
    (``"f1"``) on labels ``y`` {0, 1} [N] and scores ``s`` [N], clipped to THRESHOLD_RANGE; None when ``y`` has only
    one outcome (nothing to fit). Ties go to the highest threshold (fewest positive calls)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r} - expected one of {', '.join(OBJECTIVES)}")
    y = np.asarray(y)
    if not 0 < y.sum() < len(y):
        return None
    if objective == "youden":
        fpr, tpr, thresholds = roc_curve(y, s)
        best = int(np.argmax(tpr - fpr))  # thresholds decrease: argmax takes the highest of tied maxima
    else:
        precision, recall, thresholds = precision_recall_curve(y, s)
        p, r = precision[:-1], recall[:-1]  # the last point (precision 1, recall 0) has no threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # thresholds increase here: take the last of tied maxima
    return float(np.clip(thresholds[best], *THRESHOLD_RANGE))


class ThresholdCalibrator:
    """Estimator: ``ThresholdCalibrator("youden").fit(scores, labels).thresholds_`` -> float [n_labels].

    ``fitted_`` bool [n_labels] says which thresholds were fitted; a class with one outcome only keeps its
    ``fallback`` threshold (default 0.5)."""

    def __init__(self, objective: Objective = "youden") -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"Invalid objective {objective!r} - expected one of {', '.join(OBJECTIVES)}")
        self.objective = objective

    def fit(
        self, scores: np.ndarray, labels: np.ndarray, fallback: Sequence[float] | None = None
    ) -> ThresholdCalibrator:
        scores, labels = _check(scores, labels)
        fallback = np.full(scores.shape[1], DEFAULT_THRESHOLD) if fallback is None else np.asarray(fallback, float)
        fitted = [fit_threshold(labels[:, c], scores[:, c], self.objective) for c in range(scores.shape[1])]
        self.fitted_ = np.array([t is not None for t in fitted])
        self.thresholds_ = np.array([fallback[c] if t is None else t for c, t in enumerate(fitted)])
        return self


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"Invalid shapes: scores {scores.shape}, labels {labels.shape} - both must be [N, n_labels]")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Invalid scores - contain NaN or infinity")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("Invalid labels - must be 0 or 1")
    return scores, labels.astype(np.uint8)


@dataclass(frozen=True, kw_only=True, slots=True)
class Estimate:
    """A point value with its percentile bootstrap 95% CI (None when it could not be estimated)."""

    value: float | None
    ci: tuple[float, float] | None

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "ci": list(self.ci) if self.ci else None}


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassCalibration:
    """One finding on the held-out half: F1/recall/precision at ``threshold`` and at 0.5 (``*_default``).

    ``fitted`` False means the fit half had one outcome only and ``threshold`` is the fallback; ``note`` says so.
    ``fit_positives``/``report_positives`` count positive images in each half."""

    label: str
    threshold: float
    fitted: bool
    note: str
    fit_positives: int
    report_positives: int
    f1: Estimate
    recall: Estimate
    precision: Estimate
    f1_default: Estimate
    recall_default: Estimate
    precision_default: Estimate

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "label": self.label,
            "threshold": self.threshold,
            "fitted": self.fitted,
            "note": self.note,
            "fit_positives": self.fit_positives,
            "report_positives": self.report_positives,
        }
        for name in ("f1", "recall", "precision", "f1_default", "recall_default", "precision_default"):
            estimate: Estimate = getattr(self, name)
            out[name] = estimate.value
            out[f"{name}_ci"] = list(estimate.ci) if estimate.ci else None
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationResult:
    """Thresholds fitted on the fit half and their effect on the held-out (report) half.

    Means are macro averages over findings with a positive in the report half. ``split`` is "patient" (halves share
    no patient), "image" (no patient ids: images of one patient may sit in both halves) or "mixed"; ``note`` says
    what that means for the figures."""

    objective: str
    labels: tuple[str, ...]
    thresholds: dict[str, float]
    classes: tuple[ClassCalibration, ...]
    mean_f1: Estimate
    mean_recall: Estimate
    mean_precision: Estimate
    mean_f1_default: Estimate
    mean_recall_default: Estimate
    mean_precision_default: Estimate
    f1_ratio: Estimate
    recall_ratio: Estimate
    n_fit: int
    n_report: int
    patients_fit: int | None
    patients_report: int | None
    split: str
    note: str
    seed: int
    n_bootstrap: int

    def to_dict(self) -> dict[str, object]:
        """JSON-able: flat figures (``f1_ratio``, ``recall_ratio``, ``mean_f1``, ...) with ``*_ci`` beside each."""
        out: dict[str, object] = {"objective": self.objective, "thresholds": dict(self.thresholds)}
        for name in ("f1_ratio", "recall_ratio", "mean_f1", "mean_f1_default", "mean_recall", "mean_recall_default",
                     "mean_precision", "mean_precision_default"):
            estimate: Estimate = getattr(self, name)
            out[name] = estimate.value
            out[f"{name}_ci"] = list(estimate.ci) if estimate.ci else None
        out |= {
            "n_fit": self.n_fit,
            "n_report": self.n_report,
            "patients_fit": self.patients_fit,
            "patients_report": self.patients_report,
            "split": self.split,
            "note": self.note,
            "seed": self.seed,
            "n_bootstrap": self.n_bootstrap,
            "findings": [c.to_dict() for c in self.classes],
        }
        return out


def _rates(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """F1, recall, precision from weighted counts; like scikit-learn with zero_division=0, except that recall (and
    so F1) is NaN where there are no positives (the class is left out of the mean for that resample)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        positives = tp + fn
        recall = np.where(positives > 0, tp / positives, np.nan)
        called = tp + fp
        precision = np.where(called > 0, tp / np.where(called > 0, called, 1), 0.0)
        denom = 2 * tp + fp + fn
        f1 = np.where(positives > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
    return f1, recall, precision


def bootstrap_weights(groups: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Resampling weights float [n_bootstrap, N]: each resample draws the G groups (patients, or images) with
    replacement; an image's weight is how often its group was drawn (``model.verification.group_counts``)."""
    return group_counts(groups, n_bootstrap, rng).astype(np.float64)


def _weighted_counts(weights: np.ndarray, predicted: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, fn [n_bootstrap, n_labels] of 0/1 predictions [N, n_labels] under resampling weights [B, N]."""
    p, t = predicted.astype(np.float64), y.astype(np.float64)
    return weights @ (p * t), weights @ (p * (1 - t)), weights @ ((1 - p) * t)


def calibrate(
    scores: np.ndarray,
    labels: np.ndarray,
    patients: Sequence[str | None],
    *,
    objective: Objective = "youden",
    seed: int = 0,
    n_bootstrap: int = 200,
    label_names: Sequence[str] = LABELS,
    fallback: Mapping[str, float] | None = None,
) -> CalibrationResult:
    """Fit per-class thresholds on one patient-disjoint half and report on the other (see the module docstring).

    ``scores`` float [N, n_labels] probabilities, ``labels`` {0, 1} [N, n_labels], ``patients`` [N] (None where
    unknown). ``fallback`` (label -> threshold, default 0.5) is kept for a class with one outcome in the fit half.
    Fitted thresholds lie in THRESHOLD_RANGE. Raises ValueError for mismatched shapes, NaN scores, labels other than
    0/1, an unknown objective, or data that cannot be split into two halves.
    """
    scores, labels = _check(scores, labels)
    label_names = tuple(label_names)
    if scores.shape[1] != len(label_names):
        raise ValueError(f"Invalid scores: {scores.shape[1]} columns for {len(label_names)} labels")
    if len(patients) != len(scores):
        raise ValueError(f"Invalid patients: {len(patients)} for {len(scores)} images")
    if n_bootstrap < 0:
        raise ValueError(f"Invalid n_bootstrap {n_bootstrap} - must be >= 0")
    fit, report = patient_disjoint_halves(patients, seed)
    kind = split_kind(list(patients))
    fallback_values = [float((fallback or {}).get(name, DEFAULT_THRESHOLD)) for name in label_names]
    calibrator = ThresholdCalibrator(objective).fit(scores[fit], labels[fit], fallback_values)
    thresholds = calibrator.thresholds_

    y, s = labels[report], scores[report]
    fitted_pred = (s >= thresholds).astype(np.uint8)
    default_pred = (s >= DEFAULT_THRESHOLD).astype(np.uint8)
    point: dict[str, np.ndarray] = {}
    for suffix, pred in (("", fitted_pred), ("_default", default_pred)):
        point["f1" + suffix] = f1_score(y, pred, average=None, zero_division=0)
        point["recall" + suffix] = recall_score(y, pred, average=None, zero_division=0)
        point["precision" + suffix] = precision_score(y, pred, average=None, zero_division=0)
    present = y.sum(axis=0) > 0

    rng = np.random.default_rng(seed)
    groups = np.array(
        [p if p is not None else f"\x00image:{i}" for i, p in enumerate(np.asarray(patients, dtype=object)[report])],
        dtype=object,
    )
    weights = bootstrap_weights(groups, n_bootstrap, rng)
    boot: dict[str, np.ndarray] = {}
    for suffix, pred in (("", fitted_pred), ("_default", default_pred)):
        f1, recall, precision = _rates(*_weighted_counts(weights, pred, y))
        boot["f1" + suffix], boot["recall" + suffix], boot["precision" + suffix] = f1, recall, precision

    def boot_mean(name: str) -> np.ndarray:
        """Per resample, the mean over findings present in the held-out half and in that resample (NaN if none)."""
        values = np.where(present, boot[name], np.nan)
        count = np.isfinite(values).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, np.nansum(values, axis=1) / count, np.nan)

    def mean_estimate(name: str) -> Estimate:
        value = float(point[name][present].mean()) if present.any() else None
        return Estimate(value=value, ci=interval(boot_mean(name)) if value is not None else None)

    def ratio_estimate(name: str) -> Estimate:
        fitted_mean = point[name][present].mean() if present.any() else np.nan
        default_mean = point[name + "_default"][present].mean() if present.any() else np.nan
        value = float(fitted_mean / default_mean) if default_mean > 0 else None
        with np.errstate(invalid="ignore", divide="ignore"):
            samples = boot_mean(name) / boot_mean(name + "_default")
        return Estimate(value=value, ci=interval(samples) if value is not None else None)

    classes = []
    for c, name in enumerate(label_names):
        fit_pos = int(labels[fit, c].sum())
        fitted = bool(calibrator.fitted_[c])
        note = "" if fitted else (
            f"not fitted: the fit half has {'no' if fit_pos == 0 else 'only'} positive images - kept "
            f"{thresholds[c]:.4g}"
        )
        estimates = {
            key: Estimate(
                value=float(point[key][c]),
                ci=interval(boot[key][:, c]) if present[c] else None,
            )
            for key in point
        }
        classes.append(
            ClassCalibration(
                label=name,
                threshold=float(thresholds[c]),
                fitted=fitted,
                note=note,
                fit_positives=fit_pos,
                report_positives=int(y[:, c].sum()),
                **estimates,
            )
        )
    patient_array = np.asarray(patients, dtype=object)
    notes = {
        "patient": "halves are patient-disjoint; CIs resample patients",
        "image": "no patient ids: halves split by image, so one patient's images may sit in both halves and the "
        "held-out figures may be optimistic; CIs resample images",
        "mixed": "some images have no patient id: each such image counts as its own patient, so halves may share "
        "patients among them",
    }
    return CalibrationResult(
        objective=objective,
        labels=label_names,
        thresholds={name: float(t) for name, t in zip(label_names, thresholds, strict=True)},
        classes=tuple(classes),
        mean_f1=mean_estimate("f1"),
        mean_recall=mean_estimate("recall"),
        mean_precision=mean_estimate("precision"),
        mean_f1_default=mean_estimate("f1_default"),
        mean_recall_default=mean_estimate("recall_default"),
        mean_precision_default=mean_estimate("precision_default"),
        f1_ratio=ratio_estimate("f1"),
        recall_ratio=ratio_estimate("recall"),
        n_fit=int(fit.sum()),
        n_report=int(report.sum()),
        patients_fit=len({p for p in patient_array[fit] if p is not None}) if kind != "image" else None,
        patients_report=len({p for p in patient_array[report] if p is not None}) if kind != "image" else None,
        split=kind,
        note=notes[kind],
        seed=seed,
        n_bootstrap=n_bootstrap,
    )
