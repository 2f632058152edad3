"""Polarized classifier channels and whether their finding pairs are mutually exclusive - against a null.

The paper claims "polarized classifier channels are bipolar discriminative axes exploiting label mutual exclusivity:
Jaccard < 0.1 in 89 of 100 polarized channels". In NIH ChestX-ray14 86 of the 91 finding pairs have Jaccard < 0.1
only because findings are rare, so the share alone says nothing; this module reports it beside two nulls.

- **Weights**: the classifier's weight ``[K findings, C channels]`` (numpy; no torch here). Channel k's column says how
  much each finding's logit rises per unit of channel k's pooled (post-ReLU, non-negative) activation.
- **Polarization score** of channel k: ``min(max_c w[c, k], -min_c w[c, k])`` - the smaller of its strongest positive
  and its strongest negative weight. A bipolar axis must be strong at *both* ends; the minimum is large only then (a
  channel with one large positive weight and tiny negative ones, an ordinary detector, scores near 0, and a channel
  with no negative weight scores <= 0). Its pair is (positive finding = argmax, negative finding = argmin).
  The score uses weights only (as the paper does): a channel's activation scale is not taken into account.
- **Top-N rule**: the N channels with the largest score (ties: lower channel index first), among channels with score
  > 0; fewer when fewer channels qualify (``eligible`` says how many did).
- **Pair statistics** from a 0/1 label matrix ``[images, K]`` (:func:`label_pairs`): counts, Jaccard
  n_ab / (n_a + n_b - n_ab) and lift P(a, b) / (P(a) P(b)) = n_ab n / (n_a n_b) over images - the point values of
  ``bench/derive_exclusions.py`` (which adds patient-bootstrap CIs for the shipped report table).
- **Observed**: the share of the top-N channels whose (positive, negative) pair has Jaccard < ``jaccard_cut`` (0.1)
  and their mean lift (1 = independent, < 1 = seen together less than chance). A pair whose expected co-occurrence
  n_a n_b / n is below ``min_expected`` (default 5 images) keeps its lift in the table but is left out of every
  lift statistic (observed, base rate, null): 0 images seen where 0.1 were expected is no evidence of exclusivity.
- **Null (a), base rate**: the same two statistics over all K(K-1)/2 finding pairs.
- **Null (b), row permutation**: shuffle which finding each weight row belongs to (one uniform permutation of the K
  rows per draw), recompute the top-N pairs and the statistic. The channels, their scores, the top-N set and its
  weight magnitudes stay exactly as they are, and so does the dependence between channels (many top channels sharing
  one axis count as one axis, not as N independent hits); only the link between an axis and *which* findings it
  joins is broken - which is the claim under test. Drawing other channels of the same network instead would compare
  polarized channels with channels of the same exclusivity-shaped head (testing "more than other channels", not
  "more than chance") and would need an arbitrary magnitude stratification; drawing pairs uniformly is null (a).
  One-sided permutation p-values for "polarized pairs co-occur less than chance":
  ``p_lift = (1 + #{null mean lift <= observed}) / (1 + draws)`` (the primary test: lift is normalised for
  prevalence) and ``p_jaccard = (1 + #{null share >= observed}) / (1 + draws)`` (Jaccard is not: a permutation that
  moves weight onto rare findings lowers Jaccard without any exclusivity). Draws whose statistic is undefined (every
  pair involves a finding without positives) are left out of both counts (``draws_used``).

The effective sample size is the number of distinct pairs among the top N (``distinct_pairs``), not N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from model.errors import ModelError
from model.types import LABELS

__all__ = [
    "JACCARD_CUT",
    "BaseRate",
    "ChannelAnalysis",
    "ChannelAnalysisError",
    "LabelPairs",
    "Observed",
    "PermutationNull",
    "PolarizedChannel",
    "analyse_channels",
    "label_pairs",
    "polarization",
    "top_polarized",
]

JACCARD_CUT = 0.1
ALPHA = 0.05  # the verdict's significance level for p_lift


class ChannelAnalysisError(ModelError, ValueError):
    """Unusable input to the channel analysis: the message names the parameter, the value and the rule."""


def _num(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


# --------------------------------------------------------------------------------------------------- pair statistics


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelPairs:
    """Co-occurrence of K findings over ``n_images`` images.

    ``counts`` int64 [K, K]: images with both findings (diagonal: images with the finding). ``jaccard`` and ``lift``
    float64 [K, K], symmetric, NaN on the diagonal and where undefined (Jaccard: neither finding has a positive;
    lift: either has none); ``expected`` float64 [K, K]: images with both expected under independence,
    n_a n_b / n. ``source`` says where the labels came from."""

    labels: tuple[str, ...]
    n_images: int
    counts: np.ndarray
    jaccard: np.ndarray
    lift: np.ndarray
    expected: np.ndarray
    source: str

    @property
    def positives(self) -> np.ndarray:
        return np.diag(self.counts).copy()

    def pair(self, a: int, b: int) -> dict[str, Any]:
        """One pair's statistics (finding positions ``a`` != ``b``)."""
        return {
            "a": self.labels[a],
            "b": self.labels[b],
            "n_a": int(self.counts[a, a]),
            "n_b": int(self.counts[b, b]),
            "n_ab": int(self.counts[a, b]),
            "expected_ab": float(self.expected[a, b]),
            "jaccard": _num(self.jaccard[a, b]),
            "lift": _num(self.lift[a, b]),
        }

    def to_dict(self) -> dict[str, Any]:
        k = len(self.labels)
        return {
            "source": self.source,
            "n_images": self.n_images,
            "positives": {name: int(n) for name, n in zip(self.labels, self.positives, strict=True)},
            "pairs": [self.pair(a, b) for a in range(k) for b in range(a + 1, k)],
        }


def label_pairs(labels: np.ndarray, *, names: Sequence[str] = LABELS, source: str = "labels") -> LabelPairs:
    """Pair statistics of a 0/1 label matrix ``labels`` [images, K] whose columns are ``names`` (K >= 2).

    Raises ChannelAnalysisError: not 2-D, no rows, column count != len(names), values other than 0/1."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] != len(names) or len(names) < 2:
        raise ChannelAnalysisError(
            f"Invalid labels shape {labels.shape} - expected [images >= 1, {len(names)}] (one column per finding, "
            "at least 2 findings)"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ChannelAnalysisError("Invalid labels - values must be 0 or 1")
    x = labels.astype(np.int64)
    counts = x.T @ x
    n = x.shape[0]
    single = np.diag(counts).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        union = single[:, None] + single[None, :] - counts
        jaccard = np.where(union > 0, counts / union, np.nan)
        lift = np.where(np.outer(single, single) > 0, counts * float(n) / np.outer(single, single), np.nan)
    np.fill_diagonal(jaccard, np.nan)
    np.fill_diagonal(lift, np.nan)
    expected = np.outer(single, single) / n
    return LabelPairs(
        labels=tuple(names), n_images=n, counts=counts, jaccard=jaccard, lift=lift, expected=expected, source=source
    )


# ------------------------------------------------------------------------------------------------------ polarization


def _check_weight(weight: np.ndarray, n_findings: int | None = None) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 2 or w.shape[1] < 1:
        raise ChannelAnalysisError(f"Invalid weight shape {w.shape} - expected [findings >= 2, channels >= 1]")
    if n_findings is not None and w.shape[0] != n_findings:
        raise ChannelAnalysisError(
            f"Invalid weight shape {w.shape} - {w.shape[0]} rows but {n_findings} findings (one row per finding)"
        )
    if not np.isfinite(w).all():
        raise ChannelAnalysisError("Invalid weight - contains NaN or infinite values")
    return w


def polarization(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score float64 [C], positive finding int64 [C], negative finding int64 [C]) of a weight [K, C] (module
    docstring: score = min(max_c w, -min_c w); > 0 only for channels with a positive and a negative weight)."""
    w = _check_weight(weight)
    score = np.minimum(w.max(axis=0), -w.min(axis=0))
    return score, w.argmax(axis=0), w.argmin(axis=0)


def top_polarized(weight: np.ndarray, top: int = 100) -> np.ndarray:
    """Channel indices int64 [<= top] of the most polarized channels, highest score first (ties: lower index),
    only channels with score > 0. Raises ChannelAnalysisError when ``top`` < 1."""
    if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
        raise ChannelAnalysisError(f"Invalid top {top!r} - must be an integer >= 1")
    score, _, _ = polarization(weight)
    order = np.lexsort((np.arange(score.size), -score))
    return order[score[order] > 0][:top].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True, slots=True)
class PolarizedChannel:
    """One polarized channel: its score, (positive finding, weight), (negative finding, weight) and the label
    statistics of that pair (``jaccard``/``lift`` None where undefined; ``lift_counted`` False when the pair's
    expected co-occurrence is below ``min_expected`` and its lift is left out of the statistics)."""

    rank: int
    channel: int
    score: float
    positive: str
    positive_weight: float
    negative: str
    negative_weight: float
    n_positive: int
    n_negative: int
    n_both: int
    expected_both: float
    jaccard: float | None
    lift: float | None
    lift_counted: bool

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Observed:
    """The top-N channels' pairs: ``jaccard_below`` of ``jaccard_defined`` have Jaccard < the cut (``share``);
    ``mean_lift`` over the ``lift_defined`` channels whose pair has a lift that counts (defined, expected
    co-occurrence >= min_expected); ``distinct_pairs`` unordered pairs among all of them."""

    channels: int
    jaccard_defined: int
    jaccard_below: int
    share_jaccard_below: float | None
    lift_defined: int
    mean_lift: float | None
    median_lift: float | None
    lift_below_one: int
    distinct_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseRate:
    """Null (a): the statistics over all K(K-1)/2 finding pairs (each pair once)."""

    pairs: int
    jaccard_defined: int
    jaccard_below: int
    share_jaccard_below: float | None
    lift_defined: int
    mean_lift: float | None
    lift_below_one: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class PermutationNull:
    """Null (b): ``draws`` uniform permutations of the weight rows (``seed``); ``draws_used`` had a defined
    statistic. Null means with percentile 95% intervals, and the one-sided p-values (module docstring)."""

    method: str
    draws: int
    draws_used: int
    seed: int
    share_mean: float | None
    share_interval: tuple[float, float] | None
    mean_lift_mean: float | None
    mean_lift_interval: tuple[float, float] | None
    p_jaccard: float | None
    p_lift: float | None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("share_interval", "mean_lift_interval"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelAnalysis:
    """Everything ``chexd channels`` reports: the top channels, the observed statistics, both nulls, the verdict
    on "polarized pairs co-occur less than chance" (``'supported'`` when p_lift < ALPHA, ``'not supported'``
    otherwise, ``'undefined'`` without a p-value) and
    the pair statistics they were computed from."""

    n_findings: int
    n_channels: int
    top_requested: int
    eligible: int
    jaccard_cut: float
    min_expected: float
    channels: tuple[PolarizedChannel, ...]
    observed: Observed
    base_rate: BaseRate
    null: PermutationNull
    verdict: str
    pairs: LabelPairs

    @property
    def summary(self) -> str:
        """One paragraph a person can read: the claim's number, its base rate, the permutation null, the verdict."""
        o, b, n = self.observed, self.base_rate, self.null

        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def num(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        def pv(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2g}"

        def ci(x: tuple[float, float] | None, percent: bool = False) -> str:
            if x is None:
                return ""
            return f" [{pct(x[0])}, {pct(x[1])}]" if percent else f" [{x[0]:.3f}, {x[1]:.3f}]"

        return (
            f"Jaccard < {self.jaccard_cut:g} in {o.jaccard_below} of {o.channels} polarized channels "
            f"({pct(o.share_jaccard_below)}; {o.distinct_pairs} distinct pairs); base rate over all {b.pairs} pairs "
            f"{b.jaccard_below} of {b.jaccard_defined} ({pct(b.share_jaccard_below)}); row-permutation null "
            f"{pct(n.share_mean)}{ci(n.share_interval, True)}, p = {pv(n.p_jaccard)}. Mean lift {num(o.mean_lift)} "
            f"over {o.lift_defined} channels with expected co-occurrence >= {self.min_expected:g} "
            f"(all {b.lift_defined} such pairs {num(b.mean_lift)}; "
            f"null {num(n.mean_lift_mean)}{ci(n.mean_lift_interval)}), "
            f"p = {pv(n.p_lift)} ({n.draws_used} draws, seed {n.seed}): 'polarized pairs co-occur less than chance' "
            f"is {self.verdict} at alpha {ALPHA:g}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_findings": self.n_findings,
            "n_channels": self.n_channels,
            "top_requested": self.top_requested,
            "eligible": self.eligible,
            "jaccard_cut": self.jaccard_cut,
            "min_expected": self.min_expected,
            "score": "min(max_finding w, -min_finding w) per channel",
            "label_source": self.pairs.source,
            "n_images": self.pairs.n_images,
            "channels": [c.to_dict() for c in self.channels],
            "observed": self.observed.to_dict(),
            "base_rate": self.base_rate.to_dict(),
            "null": self.null.to_dict(),
            "alpha": ALPHA,
            "verdict": self.verdict,
            "summary": self.summary,
            "label_pairs": self.pairs.to_dict(),
        }


# ---------------------------------------------------------------------------------------------------------- analysis


def _interval(values: np.ndarray) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)]
    if finite.size < 10:
        return None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def _rowwise(values: np.ndarray, cut: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``values`` [D, N] (NaN = undefined): (statistic, defined count). With ``cut``: the share below it;
    without: the mean. Rows with nothing defined get NaN."""
    defined = np.isfinite(values)
    n = defined.sum(axis=1)
    total = np.where(defined, values < cut, 0).sum(axis=1) if cut is not None else np.where(defined, values, 0).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan), n


def _observed(pairs: LabelPairs, lifts: np.ndarray, pos: np.ndarray, neg: np.ndarray, cut: float) -> Observed:
    jac = pairs.jaccard[pos, neg]
    lift = lifts[pos, neg]
    share, _ = _rowwise(jac[None, :], cut)
    mean, _ = _rowwise(lift[None, :], None)
    defined_lift = lift[np.isfinite(lift)]
    return Observed(
        channels=int(pos.size),
        jaccard_defined=int(np.isfinite(jac).sum()),
        jaccard_below=int((jac[np.isfinite(jac)] < cut).sum()),
        share_jaccard_below=_num(share[0]),
        lift_defined=int(defined_lift.size),
        mean_lift=_num(mean[0]),
        median_lift=_num(np.median(defined_lift)) if defined_lift.size else None,
        lift_below_one=int((defined_lift < 1.0).sum()),
        distinct_pairs=len({(min(a, b), max(a, b)) for a, b in zip(pos.tolist(), neg.tolist(), strict=True)}),
    )


def _base_rate(pairs: LabelPairs, lifts: np.ndarray, cut: float) -> BaseRate:
    a, b = np.triu_indices(len(pairs.labels), k=1)
    jac, lift = pairs.jaccard[a, b], lifts[a, b]
    share, _ = _rowwise(jac[None, :], cut)
    mean, _ = _rowwise(lift[None, :], None)
    return BaseRate(
        pairs=int(a.size),
        jaccard_defined=int(np.isfinite(jac).sum()),
        jaccard_below=int((jac[np.isfinite(jac)] < cut).sum()),
        share_jaccard_below=_num(share[0]),
        lift_defined=int(np.isfinite(lift).sum()),
        mean_lift=_num(mean[0]),
        lift_below_one=int((lift[np.isfinite(lift)] < 1.0).sum()),
    )


def _permutation_null(
    pairs: LabelPairs,
    lifts: np.ndarray,
    pos: np.ndarray,
    neg: np.ndarray,
    observed: Observed,
    *,
    cut: float,
    draws: int,
    seed: int,
) -> PermutationNull:
    k = len(pairs.labels)
    rng = np.random.default_rng(seed)
    shares, means = [], []
    for start in range(0, draws, 2000):  # chunks bound the memory: [chunk, N] floats
        perms = np.argsort(rng.random((min(2000, draws - start), k)), axis=1)
        p, q = perms[:, pos], perms[:, neg]
        shares.append(_rowwise(pairs.jaccard[p, q], cut)[0])
        means.append(_rowwise(lifts[p, q], None)[0])
    share = np.concatenate(shares) if shares else np.empty(0)
    lift = np.concatenate(means) if means else np.empty(0)

    def p_value(null: np.ndarray, value: float | None, lower: bool) -> tuple[float | None, int]:
        used = null[np.isfinite(null)]
        if value is None or used.size == 0:
            return None, int(used.size)
        extreme = (used <= value) if lower else (used >= value)
        return float((1 + extreme.sum()) / (1 + used.size)), int(used.size)

    p_jaccard, _ = p_value(share, observed.share_jaccard_below, lower=False)
    p_lift, used = p_value(lift, observed.mean_lift, lower=True)
    return PermutationNull(
        method="row-permutation",
        draws=draws,
        draws_used=used,
        seed=seed,
        share_mean=_num(np.nanmean(share)) if np.isfinite(share).any() else None,
        share_interval=_interval(share),
        mean_lift_mean=_num(np.nanmean(lift)) if np.isfinite(lift).any() else None,
        mean_lift_interval=_interval(lift),
        p_jaccard=p_jaccard,
        p_lift=p_lift,
    )


def analyse_channels(
    weight: np.ndarray,
    pairs: LabelPairs,
    *,
    top: int = 100,
    draws: int = 10_000,
    seed: int = 0,
    jaccard_cut: float = JACCARD_CUT,
    min_expected: float = 5.0,
) -> ChannelAnalysis:
    """The polarized-channel analysis of a classifier weight [K, C] (rows in ``pairs.labels`` order) against the
    label pair statistics ``pairs`` (:func:`label_pairs`); see the module docstring for every number.

    Raises ChannelAnalysisError naming the parameter: weight rows != findings, non-finite weights, ``top`` < 1,
    ``draws`` < 1, ``jaccard_cut`` outside (0, 1], ``min_expected`` < 0, or no channel with score > 0."""
    w = _check_weight(weight, len(pairs.labels))
    if isinstance(draws, bool) or not isinstance(draws, int | np.integer) or draws < 1:
        raise ChannelAnalysisError(f"Invalid draws {draws!r} - must be an integer >= 1")
    if not 0.0 < jaccard_cut <= 1.0:
        raise ChannelAnalysisError(f"Invalid jaccard_cut {jaccard_cut!r} - must be in (0, 1]")
    if not min_expected >= 0.0:
        raise ChannelAnalysisError(f"Invalid min_expected {min_expected!r} - must be >= 0 (images)")
    lifts = np.where(pairs.expected >= min_expected, pairs.lift, np.nan)
    chosen = top_polarized(w, top)
    if chosen.size == 0:
        raise ChannelAnalysisError(
            "Invalid weight - no channel has both a positive and a negative weight (polarization score > 0)"
        )
    score, pos_all, neg_all = polarization(w)
    pos, neg = pos_all[chosen], neg_all[chosen]
    channels = tuple(
        PolarizedChannel(
            rank=rank + 1,
            channel=int(c),
            score=float(score[c]),
            positive=pairs.labels[a],
            positive_weight=float(w[a, c]),
            negative=pairs.labels[b],
            negative_weight=float(w[b, c]),
            n_positive=int(pairs.counts[a, a]),
            n_negative=int(pairs.counts[b, b]),
            n_both=int(pairs.counts[a, b]),
            expected_both=float(pairs.expected[a, b]),
            jaccard=_num(pairs.jaccard[a, b]),
            lift=_num(pairs.lift[a, b]),
            lift_counted=bool(np.isfinite(lifts[a, b])),
        )
        for rank, (c, a, b) in enumerate(zip(chosen.tolist(), pos.tolist(), neg.tolist(), strict=True))
    )
    observed = _observed(pairs, lifts, pos, neg, jaccard_cut)
    null = _permutation_null(pairs, lifts, pos, neg, observed, cut=jaccard_cut, draws=int(draws), seed=int(seed))
    if null.p_lift is None:
        verdict = "undefined"
    else:
        verdict = "supported" if null.p_lift < ALPHA else "not supported"
    return ChannelAnalysis(
        n_findings=w.shape[0],
        n_channels=w.shape[1],
        top_requested=int(top),
        eligible=int((score > 0).sum()),
        jaccard_cut=float(jaccard_cut),
        min_expected=float(min_expected),
        channels=channels,
        observed=observed,
        base_rate=_base_rate(pairs, lifts, jaccard_cut),
        null=null,
        verdict=verdict,
        pairs=pairs,
    )
