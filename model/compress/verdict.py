"""Paired evaluation of a compression: per-finding AUROC change with patient-bootstrap intervals
(:func:`paired_auroc_delta`) and the honest verdict on it (:func:`compression_verdict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

from model.verification import MIN_POSITIVES, interval


# ------------------------------------------------------------------------------------------------ paired evaluation
@dataclass(frozen=True, kw_only=True, slots=True)
class AurocDelta:
    """Two models' AUROC on the same images and its paired bootstrap difference (after - before).

    Per label: ``before``/``after`` AUROC, ``delta`` and its 95% percentile ``delta_ci`` (None for a label with one
    outcome only), ``positives`` (positive images). ``mean_*``: the mean over labels with both outcomes;
    ``mean_*_eligible``: over labels with >= ``min_positives`` positives (``eligible``; None when there are none). In
    every bootstrap resample both models are scored on the same resampled images, so the interval is for the
    difference itself, not two separate intervals. ``resampled``: "patients" or "images". ``samples`` float
    [n_bootstrap, labels]: the per-resample differences (NaN where a resample lacks an outcome), kept so a verdict can
    average another set of labels.
    """

    labels: tuple[str, ...]
    before: tuple[float | None, ...]
    after: tuple[float | None, ...]
    delta: tuple[float | None, ...]
    delta_ci: tuple[tuple[float, float] | None, ...]
    mean_before: float
    mean_after: float
    mean_delta: float
    mean_delta_ci: tuple[float, float]
    n_bootstrap: int
    images: int
    positives: tuple[int, ...] = ()
    min_positives: int = MIN_POSITIVES
    eligible: tuple[str, ...] = ()
    mean_before_eligible: float | None = None
    mean_after_eligible: float | None = None
    mean_delta_eligible: float | None = None
    mean_delta_eligible_ci: tuple[float, float] | None = None
    resampled: str = "images"
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "n_bootstrap": self.n_bootstrap,
            "resampled": self.resampled,
            "mean_before": self.mean_before,
            "mean_after": self.mean_after,
            "mean_delta": self.mean_delta,
            "mean_delta_ci": list(self.mean_delta_ci),
            "min_positives": self.min_positives,
            "eligible": list(self.eligible),
            "mean_before_eligible": self.mean_before_eligible,
            "mean_after_eligible": self.mean_after_eligible,
            "mean_delta_eligible": self.mean_delta_eligible,
            "mean_delta_eligible_ci": list(ci) if (ci := self.mean_delta_eligible_ci) else None,
            "findings": [
                {
                    "label": label,
                    "positives": self.positives[c] if self.positives else None,
                    "before": self.before[c],
                    "after": self.after[c],
                    "delta": self.delta[c],
                    "delta_ci": list(ci) if (ci := self.delta_ci[c]) else None,
                }
                for c, label in enumerate(self.labels)
            ],
        }


def _aurocs(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-column AUROC (Mann-Whitney, ties counted half) [classes]; NaN where a column has one outcome only."""
    ranks = rankdata(scores, axis=0)
    pos = targets.sum(0)
    neg = len(targets) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * targets).sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def paired_auroc_delta(
    scores_before: np.ndarray,
    scores_after: np.ndarray,
    targets: np.ndarray,
    labels: tuple[str, ...] | list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    patients: Sequence[str | None] | None = None,
    min_positives: int = MIN_POSITIVES,
) -> AurocDelta:
    """Paired bootstrap of the AUROC difference between two models' scores [N, classes] on the same images with
    targets {0, 1} [N, classes]. With ``patients`` [N] the bootstrap resamples patients (an image without an id is
    its own patient), else images. Raises ValueError for mismatched shapes, ``patients`` of another length, or
    when no label has both outcomes."""
    from model.metrics import bootstrap_counts

    before = np.asarray(scores_before, dtype=np.float64)
    after = np.asarray(scores_after, dtype=np.float64)
    y = np.asarray(targets).astype(np.float64)
    if before.shape != after.shape or before.shape != y.shape or y.ndim != 2 or y.shape[1] != len(labels):
        raise ValueError(
            f"Invalid shapes: before {before.shape}, after {after.shape}, targets {y.shape} - all must be "
            f"[N, {len(labels)}]"
        )
    if n_bootstrap < 10:
        raise ValueError(f"Invalid n_bootstrap {n_bootstrap} - at least 10 resamples are needed for an interval")
    a0, a1 = _aurocs(before, y), _aurocs(after, y)
    valid = np.isfinite(a0)
    if not valid.any():
        raise ValueError("no label has both positive and negative images - AUROC is undefined")
    n = len(y)
    positives = y.sum(0).astype(np.int64)
    eligible = valid & (positives >= min_positives)
    if patients is None:  # images, drawn exactly as before patients existed (results stay reproducible)
        rng = np.random.default_rng(seed)
        draws = (rng.integers(0, n, n) for _ in range(n_bootstrap))
        resampled = "images"
    else:
        counts, resampled = bootstrap_counts(n, n_bootstrap, seed, patients)
        draws = (np.repeat(np.arange(n), row) for row in counts)
    deltas = np.full((n_bootstrap, y.shape[1]), np.nan)
    for k, idx in enumerate(draws):
        deltas[k] = _aurocs(after[idx], y[idx]) - _aurocs(before[idx], y[idx])

    def mean_interval(columns: np.ndarray) -> tuple[float, float] | None:
        kept = deltas[:, columns]
        rows = np.isfinite(kept).any(axis=1)
        return interval(np.nanmean(kept[rows], axis=1)) if columns.any() and rows.any() else None

    def opt(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    return AurocDelta(
        labels=tuple(labels),
        before=tuple(opt(v) for v in a0),
        after=tuple(opt(v) for v in a1),
        delta=tuple(opt(v) for v in a1 - a0),
        delta_ci=tuple(interval(deltas[:, c]) if valid[c] else None for c in range(y.shape[1])),
        mean_before=float(a0[valid].mean()),
        mean_after=float(a1[valid].mean()),
        mean_delta=float((a1 - a0)[valid].mean()),
        mean_delta_ci=mean_interval(valid) or (float("nan"), float("nan")),
        n_bootstrap=n_bootstrap,
        images=n,
        positives=tuple(int(p) for p in positives),
        min_positives=min_positives,
        eligible=tuple(label for label, e in zip(labels, eligible, strict=True) if e),
        mean_before_eligible=float(a0[eligible].mean()) if eligible.any() else None,
        mean_after_eligible=float(a1[eligible].mean()) if eligible.any() else None,
        mean_delta_eligible=float((a1 - a0)[eligible].mean()) if eligible.any() else None,
        mean_delta_eligible_ci=mean_interval(eligible),
        resampled=resampled,
        samples=deltas,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionVerdict:
    """Does a compressed model keep its parent's ranking? The rule (issue 13): over the findings with at least
    ``min_positives`` positive images (``judged``), the 95% CI of the mean ΔAUROC (after - before) reaches 0 or
    lies above it, and no judged finding has its own CI entirely below ``floor``.

    ``excluded``: findings reported but not judged, with their positives (too few, or one outcome only); ``failing``:
    judged findings whose CI lies entirely below ``floor``; ``below_zero``: judged findings whose CI lies entirely
    below 0 (reported, not failing unless also below ``floor``). ``verdict``: 'met' or 'not met'; ``reason`` says why.
    """

    verdict: str
    reason: str
    min_positives: int
    floor: float
    judged: tuple[str, ...]
    excluded: tuple[tuple[str, int], ...]
    failing: tuple[str, ...]
    below_zero: tuple[str, ...]
    mean_delta: float | None
    mean_delta_ci: tuple[float, float] | None
    mean_delta_all: float
    mean_delta_all_ci: tuple[float, float]
    resampled: str
    images: int

    @property
    def met(self) -> bool:
        return self.verdict == "met"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "rule": f"mean ΔAUROC over findings with >= {self.min_positives} positives: 95% CI reaches 0 or above; "
            f"no such finding with its CI entirely below {self.floor:g}",
            "min_positives": self.min_positives,
            "floor": self.floor,
            "judged": list(self.judged),
            "excluded": [{"label": label, "positives": n} for label, n in self.excluded],
            "failing": list(self.failing),
            "below_zero": list(self.below_zero),
            "mean_delta": self.mean_delta,
            "mean_delta_ci": list(self.mean_delta_ci) if self.mean_delta_ci else None,
            "mean_delta_all": self.mean_delta_all,
            "mean_delta_all_ci": list(self.mean_delta_all_ci),
            "resampled": self.resampled,
            "images": self.images,
        }


def compression_verdict(
    delta: AurocDelta, *, min_positives: int = MIN_POSITIVES, floor: float = -0.005
) -> CompressionVerdict:
    """The honest compression verdict on ``delta`` (see :class:`CompressionVerdict`). Findings are judged when they
    have both outcomes and >= ``min_positives`` positives. Raises ValueError when ``delta`` carries no positive counts
    or bootstrap samples (made by an older version) or ``floor`` is positive."""
    if not delta.positives or delta.samples is None:
        raise ValueError("Invalid delta: no positives or bootstrap samples - recompute it with paired_auroc_delta")
    if floor > 0:
        raise ValueError(f"Invalid floor {floor} - must be <= 0 (a tolerated loss of AUROC)")
    judged = [c for c, label in enumerate(delta.labels)
              if delta.delta[c] is not None and delta.positives[c] >= min_positives]
    excluded = tuple((label, delta.positives[c]) for c, label in enumerate(delta.labels) if c not in judged)
    failing = tuple(delta.labels[c] for c in judged if (ci := delta.delta_ci[c]) is not None and ci[1] < floor)
    below_zero = tuple(delta.labels[c] for c in judged if (ci := delta.delta_ci[c]) is not None and ci[1] < 0)
    mean = float(np.mean([delta.delta[c] for c in judged])) if judged else None
    mean_ci = None
    if judged:
        kept = delta.samples[:, judged]
        rows = np.isfinite(kept).any(axis=1)
        mean_ci = interval(np.nanmean(kept[rows], axis=1)) if rows.any() else None
    few = f"{len(excluded)} finding(s) with fewer than {min_positives} positives are reported but not judged"
    if mean is None or mean_ci is None:
        verdict = "not met"
        reason = (f"no finding has {min_positives} or more positive images among the {delta.images} evaluated - "
                  "nothing can be judged; evaluate on more images")
    elif mean_ci[1] < 0:
        verdict = "not met"
        reason = (f"mean ΔAUROC over {len(judged)} findings is {mean:+.5f} with 95% CI [{mean_ci[0]:+.5f}, "
                  f"{mean_ci[1]:+.5f}], entirely below 0" + (f"; {', '.join(failing)} below {floor:g}" if failing
                                                            else "") + f"; {few}")
    elif failing:
        verdict = "not met"
        reason = (f"{', '.join(failing)} lose(s) AUROC: CI entirely below {floor:g} (mean ΔAUROC {mean:+.5f}, 95% CI "
                  f"[{mean_ci[0]:+.5f}, {mean_ci[1]:+.5f}]); {few}")
    else:
        verdict = "met"
        reason = (f"mean ΔAUROC over {len(judged)} findings is {mean:+.5f} with 95% CI [{mean_ci[0]:+.5f}, "
                  f"{mean_ci[1]:+.5f}] and no finding's CI lies entirely below {floor:g}; {few}")
    return CompressionVerdict(
        verdict=verdict,
        reason=reason,
        min_positives=min_positives,
        floor=floor,
        judged=tuple(delta.labels[c] for c in judged),
        excluded=excluded,
        failing=failing,
        below_zero=below_zero,
        mean_delta=mean,
        mean_delta_ci=mean_ci,
        mean_delta_all=delta.mean_delta,
        mean_delta_all_ci=delta.mean_delta_ci,
        resampled=delta.resampled,
        images=delta.images,
    )
