"""Per-class decision thresholds: fitted on one patient-disjoint half, reported on the other with bootstrap CIs.

``calibrate(scores, labels, patients)`` splits the images into two halves that share no patient
(``model.datasets.patient_disjoint_halves``), fits one threshold per finding on the first (Youden's J from
``sklearn.metrics.roc_curve``, or the F1-optimal point of ``precision_recall_curve``) and reports F1, recall and
precision on the held-out half at the fitted thresholds and at 0.5, each with a percentile bootstrap 95% CI
(patients resampled with replacement when known, else images). ``f1_ratio`` = mean F1 (fitted) / mean F1 (0.5) and
``recall_ratio`` likewise, on the held-out half; means are over the findings with a positive in that half.

One split is one draw: which patients land in which half moves the ratios by more than the bootstrap of one half
shows. ``n_splits`` > 1 repeats the split with seeds ``seed .. seed + n_splits - 1``: each figure is the mean over the
splits, and its CI comes from the pooled bootstrap samples of every split (patients of each split's held-out half
resampled), so it includes the split-to-split variability. The thresholds returned are then refitted on ALL the
images (nothing is left to report on): the figures describe the procedure "fit on half the patients, apply to new
ones", not these exact thresholds. With ``n_splits`` = 1 the thresholds are those of the fit half, as reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve, precision_score, recall_score, roc_curve

from model.datasets import patient_disjoint_halves, split_kind
from model.types import LABELS
from model.verification import group_counts, interval, patient_bootstrap_counts

__all__ = [
    "OBJECTIVES",
    "THRESHOLD_RANGE",
    "CalibrationResult",
    "ClassCalibration",
    "Estimate",
    "SplitResult",
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
class SplitResult:
    """One patient-disjoint split of a repeated calibration: its seed, sizes, the thresholds fitted on its fit half
    and the held-out figures they gave (None where undefined)."""

    seed: int
    n_fit: int
    n_report: int
    thresholds: dict[str, float]
    f1_ratio: float | None
    recall_ratio: float | None
    mean_f1: float | None
    mean_recall: float | None

    def to_dict(self) -> dict[str, object]:
        return {"seed": self.seed, "n_fit": self.n_fit, "n_report": self.n_report, "f1_ratio": self.f1_ratio,
                "recall_ratio": self.recall_ratio, "mean_f1": self.mean_f1, "mean_recall": self.mean_recall,
                "thresholds": dict(self.thresholds)}


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationResult:
    """Thresholds fitted on the fit half and their effect on the held-out (report) half.

    Means are macro averages over findings with a positive in the report half. ``split`` is "patient" (halves share
    no patient), "image" (no patient ids: images of one patient may sit in both halves) or "mixed"; ``note`` says
    what that means for the figures. ``n_splits``: how many patient-disjoint splits the figures average (``splits``:
    each one); ``thresholds_source`` says what the returned thresholds were fitted on. ``n_fit``/``n_report`` and the
    patient counts are those of the first split."""

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
    n_splits: int = 1
    splits: tuple[SplitResult, ...] = ()
    thresholds_source: str = ""

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
            "n_splits": self.n_splits,
            "thresholds_source": self.thresholds_source,
            "splits": [split.to_dict() for split in self.splits],
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


@dataclass(frozen=True, kw_only=True, slots=True)
class _Split:
    """Everything one split measured: per-class point values [L] and bootstrap samples [B, L] by metric name,
    findings present in the held-out half, per-resample means [B]."""

    seed: int
    fit: np.ndarray
    report: np.ndarray
    calibrator: ThresholdCalibrator
    point: dict[str, np.ndarray]
    boot: dict[str, np.ndarray]
    present: np.ndarray

    def mean(self, name: str) -> float | None:
        return float(self.point[name][self.present].mean()) if self.present.any() else None

    def boot_mean(self, name: str) -> np.ndarray:
        """Per resample, the mean over findings present in the held-out half and in that resample (NaN if none)."""
        values = np.where(self.present, self.boot[name], np.nan)
        count = np.isfinite(values).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, np.nansum(values, axis=1) / count, np.nan)

    def ratio(self, name: str) -> float | None:
        fitted, default = self.mean(name), self.mean(name + "_default")
        return fitted / default if fitted is not None and default else None

    def boot_ratio(self, name: str) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.boot_mean(name) / self.boot_mean(name + "_default")


def _one_split(scores: np.ndarray, labels: np.ndarray, patients: Sequence[str | None], objective: Objective,
               seed: int, n_bootstrap: int, fallback_values: list[float]) -> _Split:
    fit, report = patient_disjoint_halves(patients, seed)
    calibrator = ThresholdCalibrator(objective).fit(scores[fit], labels[fit], fallback_values)
    y, s = labels[report], scores[report]
    fitted_pred = (s >= calibrator.thresholds_).astype(np.uint8)
    default_pred = (s >= DEFAULT_THRESHOLD).astype(np.uint8)
    point: dict[str, np.ndarray] = {}
    boot: dict[str, np.ndarray] = {}
    weights = patient_bootstrap_counts([patients[i] for i in np.flatnonzero(report)], n_bootstrap, seed)
    for suffix, pred in (("", fitted_pred), ("_default", default_pred)):
        point["f1" + suffix] = f1_score(y, pred, average=None, zero_division=0)
        point["recall" + suffix] = recall_score(y, pred, average=None, zero_division=0)
        point["precision" + suffix] = precision_score(y, pred, average=None, zero_division=0)
        f1, recall, precision = _rates(*_weighted_counts(weights.astype(np.float64), pred, y))
        boot["f1" + suffix], boot["recall" + suffix], boot["precision" + suffix] = f1, recall, precision
    return _Split(seed=seed, fit=fit, report=report, calibrator=calibrator, point=point, boot=boot,
                  present=y.sum(axis=0) > 0)


def _average(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _pooled(samples: list[np.ndarray]) -> tuple[float, float] | None:
    return interval(np.concatenate(samples)) if samples else None


def _mean_estimate(splits: list[_Split], name: str) -> Estimate:
    """Mean over the splits of a per-split mean figure, CI from the pooled bootstrap samples."""
    value = _average([split.mean(name) for split in splits])
    return Estimate(value=value, ci=_pooled([sp.boot_mean(name) for sp in splits if sp.present.any()])
                    if value is not None else None)


def _ratio_estimate(splits: list[_Split], name: str) -> Estimate:
    """Mean over the splits of a fitted / default ratio, CI from the pooled bootstrap samples."""
    value = _average([split.ratio(name) for split in splits])
    return Estimate(value=value, ci=_pooled([sp.boot_ratio(name) for sp in splits if sp.ratio(name) is not None])
                    if value is not None else None)


def _class_estimate(splits: list[_Split], key: str, c: int) -> Estimate:
    """One class's figure ``key``: mean over the splits where the class has both outcomes (all splits otherwise)."""
    present = [sp for sp in splits if sp.present[c]]
    value = float(np.mean([sp.point[key][c] for sp in (present or splits)]))
    return Estimate(value=value, ci=_pooled([sp.boot[key][:, c] for sp in present]) if present else None)


def _classes(
    label_names: tuple[str, ...],
    labels: np.ndarray,
    final: ThresholdCalibrator,
    fit_mask: np.ndarray,
    splits: list[_Split],
) -> list[ClassCalibration]:
    """Per class: the final threshold (``final``, fitted on ``fit_mask``), whether it was fitted, and its figures."""
    thresholds = final.thresholds_
    classes = []
    for c, name in enumerate(label_names):
        fit_pos = int(labels[fit_mask, c].sum())
        fitted = bool(final.fitted_[c])
        where = "fit half" if len(splits) == 1 else "data"
        note = "" if fitted else (
            f"not fitted: the {where} has {'no' if fit_pos == 0 else 'only'} positive images - kept "
            f"{thresholds[c]:.4g}"
        )
        classes.append(
            ClassCalibration(
                label=name,
                threshold=float(thresholds[c]),
                fitted=fitted,
                note=note,
                fit_positives=fit_pos,
                report_positives=min(int(labels[sp.report, c].sum()) for sp in splits),
                **{key: _class_estimate(splits, key, c) for key in splits[0].point},
            )
        )
    return classes


def _split_note(kind: str, n_splits: int, seed: int) -> str:
    """How the halves were split (by patient, by image or mixed) and, for several splits, how the figures pool."""
    notes = {
        "patient": "halves are patient-disjoint; CIs resample patients",
        "image": "no patient ids: halves split by image, so one patient's images may sit in both halves and the "
        "held-out figures may be optimistic; CIs resample images",
        "mixed": "some images have no patient id: each such image counts as its own patient, so halves may share "
        "patients among them",
    }
    note = notes[kind]
    if n_splits > 1:
        note += (f"; figures are means over {n_splits} patient-disjoint splits (seeds {seed}-{seed + n_splits - 1}) "
                 "and CIs pool their bootstrap samples, so they include split variability")
    return note


def _split_results(splits: list[_Split], label_names: tuple[str, ...]) -> tuple[SplitResult, ...]:
    """Each split's thresholds and figures."""
    return tuple(
        SplitResult(
            seed=sp.seed,
            n_fit=int(sp.fit.sum()),
            n_report=int(sp.report.sum()),
            thresholds={name: float(t) for name, t in zip(label_names, sp.calibrator.thresholds_, strict=True)},
            f1_ratio=sp.ratio("f1"),
            recall_ratio=sp.ratio("recall"),
            mean_f1=sp.mean("f1"),
            mean_recall=sp.mean("recall"),
        )
        for sp in splits
    )


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
    n_splits: int = 1,
) -> CalibrationResult:
    """Fit per-class thresholds on one patient-disjoint half and report on the other (see the module docstring),
    ``n_splits`` times with seeds ``seed``, ``seed + 1``, ...; figures are means over the splits with CIs from the
    pooled bootstrap samples of all splits.

    ``scores`` float [N, n_labels] probabilities, ``labels`` {0, 1} [N, n_labels], ``patients`` [N] (None where
    unknown). ``fallback`` (label -> threshold, default 0.5) is kept for a class with one outcome in the fit half.
    Fitted thresholds lie in THRESHOLD_RANGE; with ``n_splits`` > 1 they are fitted on all images. Raises ValueError
    for mismatched shapes, NaN scores, labels other than 0/1, an unknown objective, ``n_splits`` < 1, or data that
    cannot be split into two halves.
    """
    scores, labels = _check(scores, labels)
    label_names = tuple(label_names)
    if scores.shape[1] != len(label_names):
        raise ValueError(f"Invalid scores: {scores.shape[1]} columns for {len(label_names)} labels")
    patients = list(patients)
    if len(patients) != len(scores):
        raise ValueError(f"Invalid patients: {len(patients)} for {len(scores)} images")
    if n_bootstrap < 0:
        raise ValueError(f"Invalid n_bootstrap {n_bootstrap} - must be >= 0")
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"Invalid n_splits {n_splits!r} - must be an integer >= 1")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r} - expected one of {', '.join(OBJECTIVES)}")
    kind = split_kind(patients)
    fallback_values = [float((fallback or {}).get(name, DEFAULT_THRESHOLD)) for name in label_names]
    splits = [_one_split(scores, labels, patients, objective, seed + i, n_bootstrap, fallback_values)
              for i in range(n_splits)]
    first = splits[0]
    if n_splits == 1:
        final = first.calibrator
        fit_mask = first.fit
        source = (f"the fit half of the split (seed {seed}, {int(first.fit.sum())} images): the figures describe "
                  "these thresholds on the other half")
    else:
        final = ThresholdCalibrator(objective).fit(scores, labels, fallback_values)
        fit_mask = np.ones(len(scores), bool)
        source = (f"all {len(scores)} images, after the estimate: the figures (means over {n_splits} patient-disjoint "
                  "splits) describe the procedure - fit on half the patients, apply to the others - not these exact "
                  "thresholds")
    thresholds = final.thresholds_
    classes = _classes(label_names, labels, final, fit_mask, splits)
    patient_array = np.asarray(patients, dtype=object)
    note = _split_note(kind, n_splits, seed)
    return CalibrationResult(
        objective=objective,
        labels=label_names,
        thresholds={name: float(t) for name, t in zip(label_names, thresholds, strict=True)},
        classes=tuple(classes),
        mean_f1=_mean_estimate(splits, "f1"),
        mean_recall=_mean_estimate(splits, "recall"),
        mean_precision=_mean_estimate(splits, "precision"),
        mean_f1_default=_mean_estimate(splits, "f1_default"),
        mean_recall_default=_mean_estimate(splits, "recall_default"),
        mean_precision_default=_mean_estimate(splits, "precision_default"),
        f1_ratio=_ratio_estimate(splits, "f1"),
        recall_ratio=_ratio_estimate(splits, "recall"),
        n_fit=int(first.fit.sum()),
        n_report=int(first.report.sum()),
        patients_fit=len({p for p in patient_array[first.fit] if p is not None}) if kind != "image" else None,
        patients_report=len({p for p in patient_array[first.report] if p is not None}) if kind != "image" else None,
        split=kind,
        note=note,
        seed=seed,
        n_bootstrap=n_bootstrap,
        n_splits=n_splits,
        splits=_split_results(splits, label_names),
        thresholds_source=source,
    )
