"""Mutual-exclusivity rules from the real NIH ChestX-ray14 label statistics, and their application to one image.

The shipped table ``reporting/data/exclusions.json`` (derived by ``bench/derive_exclusions.py`` from
``Data_Entry_2017_v2020.csv.gz``; see reporting/data/README.md) holds for each of the 91 finding pairs the image
counts, the lift P(A,B) / (P(A) P(B)) with a 95% confidence interval (bootstrap over patients) and the Jaccard index.

A pair is **exclusive** when the upper bound of its lift CI is below ``max_lift_upper`` (default 0.6: seen together
well under chance, and surely so). Low Jaccard alone is not exclusivity — most pairs have it only because findings
are rare. With the default only Edema-Fibrosis, Pneumothorax-Edema and Cardiomegaly-Pneumothorax qualify.

A finding above its threshold is **excluded** — reported with its reason, never hidden — when an exclusive partner
is present with much higher confidence: confidence = probability / threshold, and the partner's confidence must be
at least ``margin`` times this finding's (default 2). Findings are visited from the most to the least confident, and
only findings that stay present can exclude others, so the result does not depend on label order and two findings
never exclude each other.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from reporting.errors import ReportError

__all__ = ["Exclusion", "ExclusionRules", "PairStatistics", "apply_exclusions", "load_pair_statistics"]

DATA_FILE = "exclusions.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class PairStatistics:
    """Co-occurrence of findings ``a`` and ``b`` over the NIH images (counts are images).

    ``lift`` = n_ab n / (n_a n_b), ``lift_low``/``lift_high`` its 95% CI, ``ci_method`` "patient-bootstrap" or
    "poisson-exact" (fewer than 5 images with both), ``jaccard`` = n_ab / (n_a + n_b - n_ab)."""

    a: str
    b: str
    n_a: int
    n_b: int
    n_ab: int
    expected_ab: float
    lift: float
    lift_low: float
    lift_high: float
    ci_method: str
    jaccard: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.lift_low <= self.lift <= self.lift_high:
            raise ReportError(f"Invalid lift CI for {self.a}-{self.b}: {self.lift_low} <= {self.lift} <= "
                             f"{self.lift_high} does not hold")
        if not 0 <= self.n_ab <= min(self.n_a, self.n_b):
            raise ReportError(f"Invalid counts for {self.a}-{self.b}: n_ab {self.n_ab} > min(n_a, n_b)")

    def other(self, label: str) -> str:
        return self.b if label == self.a else self.a


@dataclass(frozen=True, kw_only=True, slots=True)
class PairTable:
    """All pair statistics with the table's provenance (source file, sha256, rows, date, script)."""

    pairs: tuple[PairStatistics, ...]
    n_images: int
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def pair(self, a: str, b: str) -> PairStatistics:
        """Statistics of the unordered pair; KeyError naming both when the table has no such pair."""
        for p in self.pairs:
            if {p.a, p.b} == {a, b}:
                return p
        raise KeyError(f"no statistics for the pair {a!r}-{b!r} in {DATA_FILE}")


def _parse(data: Mapping[str, Any]) -> PairTable:
    pairs = tuple(
        PairStatistics(
            a=p["a"], b=p["b"], n_a=int(p["n_a"]), n_b=int(p["n_b"]), n_ab=int(p["n_ab"]),
            expected_ab=float(p["expected_ab"]), lift=float(p["lift"]), lift_low=float(p["lift_ci"][0]),
            lift_high=float(p["lift_ci"][1]), ci_method=str(p["ci_method"]), jaccard=float(p["jaccard"]),
        )
        for p in data["pairs"]
    )
    return PairTable(pairs=pairs, n_images=int(data["n_images"]), provenance=dict(data["provenance"]))


@functools.cache
def load_pair_statistics() -> PairTable:
    """The shipped table (read once from the package, never from ../shared).

    Raises RuntimeError when the package data file is missing or malformed (a broken installation)."""
    try:
        text = resources.files("reporting").joinpath("data", DATA_FILE).read_text()
        return _parse(json.loads(text))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RuntimeError(f"reporting/data/{DATA_FILE} is missing or malformed ({exc}) - reinstall chexd or "
                           "re-derive it with bench/derive_exclusions.py") from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class ExclusionRules:
    """When a present finding excludes another (see the module docstring).

    ``max_lift_upper``: a pair is exclusive when its lift CI upper bound is below this (in (0, 1]).
    ``margin``: the partner's confidence (probability / threshold) must be >= margin x this finding's (>= 1).
    ``table``: pair statistics (default: the shipped NIH table)."""

    max_lift_upper: float = 0.6
    margin: float = 2.0
    table: PairTable = field(default_factory=load_pair_statistics)

    def __post_init__(self) -> None:
        if not 0.0 < self.max_lift_upper <= 1.0:
            raise ReportError(f"Invalid max_lift_upper {self.max_lift_upper!r} - must be in (0, 1]")
        if not self.margin >= 1.0:
            raise ReportError(f"Invalid margin {self.margin!r} - must be >= 1 (the partner must be more confident)")

    def is_exclusive(self, pair: PairStatistics) -> bool:
        return pair.lift_high < self.max_lift_upper

    def exclusive_pairs(self) -> tuple[PairStatistics, ...]:
        """Exclusive pairs, lowest lift first."""
        return tuple(sorted((p for p in self.table.pairs if self.is_exclusive(p)), key=lambda p: p.lift))

    def partners(self, label: str) -> tuple[PairStatistics, ...]:
        return tuple(p for p in self.exclusive_pairs() if label in (p.a, p.b))


@dataclass(frozen=True, kw_only=True, slots=True)
class Exclusion:
    """Why ``label`` (above its threshold) is reported as excluded: ``by`` is present with ``ratio`` times its
    confidence, and the pair's NIH lift is ``pair.lift``."""

    label: str
    probability: float
    by: str
    by_probability: float
    ratio: float
    pair: PairStatistics

    @property
    def reason(self) -> str:
        p = self.pair
        return (
            f"{self.by} present (p={self.by_probability:.2f}, {self.ratio:.1f}x the confidence of {self.label}); "
            f"{p.a} and {p.b} co-occur at {p.lift:.2f}x chance in NIH ChestX-ray14 "
            f"(95% CI {p.lift_low:.2f}-{p.lift_high:.2f}; {p.n_ab} images with both, {p.expected_ab:.0f} expected)"
        )


def apply_exclusions(
    probabilities: Mapping[str, float], thresholds: Mapping[str, float], rules: ExclusionRules
) -> dict[str, Exclusion]:
    """The findings among ``probabilities`` (label -> probability) that the rules exclude, with their reasons.

    Only findings at or above their threshold can be excluded or exclude others. Raises ReportError naming a label
    that has no threshold, or a threshold outside (0, 1)."""
    confidence = {}
    for label, p in probabilities.items():
        if label not in thresholds:
            raise ReportError(f"No threshold for {label!r} - the thresholds must cover every finding")
        t = float(thresholds[label])
        if not 0.0 < t < 1.0:
            raise ReportError(f"Invalid threshold for {label!r}: {t} - must be in (0, 1)")
        if p >= t:
            confidence[label] = float(p) / t
    present: list[str] = []
    excluded: dict[str, Exclusion] = {}
    for label in sorted(confidence, key=lambda k: (-confidence[k], k)):
        for partner in present:
            try:
                pair = rules.table.pair(label, partner)
            except KeyError:
                continue
            ratio = confidence[partner] / confidence[label]
            if rules.is_exclusive(pair) and ratio >= rules.margin:
                excluded[label] = Exclusion(
                    label=label, probability=float(probabilities[label]), by=partner,
                    by_probability=float(probabilities[partner]), ratio=ratio, pair=pair,
                )
                break
        else:
            present.append(label)
    return excluded
