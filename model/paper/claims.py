"""The paper's figures as its abstract states them (``PAPER``), the verdicts and data kinds a row can carry, the row
type (:class:`PaperRow`) and the ratio rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model.errors import ModelError

VERDICTS: tuple[str, ...] = ("reproduced", "not reproduced", "true by construction", "not measurable here")
REAL = "real CheXNet predictions"
DEMO = "demo model on the phantom"
STRUCTURAL = "structural"
DATA_KINDS: tuple[str, ...] = (REAL, DEMO, STRUCTURAL)

# The paper's figures, as its abstract states them.
PAPER: dict[str, Any] = {
    "parameters_before": 6_970_000,
    "parameters_after": 3_380_000,
    "parameters_removed": 0.5143,
    "delta_auroc": 0.0004,
    "latency_before_ms": 15.17,
    "latency_after_ms": 14.73,
    "correction_channels": 5,
    "correction_delta_p": -0.13,
    "correction_tp_lost": 0,
    "f1_ratio": 1.6,
    "recall_ratio": 7.0,
    "head_parameters": 18_000,
    "finetune_seconds": 85.0,
    "polarized_share": 0.89,
}
RATIO_TOLERANCE = 0.15  # a ratio counts as reproduced when its CI holds the paper's value or it is within 15% of it
MARGINAL_F1 = 0.02  # "marginal": the held-out mean F1 change is at most this in size
MIN_JUDGED = 7  # ΔAUROC gets a verdict only when at least half of the 14 findings have enough positives
BEST_CLASSES = 3  # "the best classes": the findings with the highest selection-part AUROC (enough positives)


class PaperError(ModelError, ValueError):
    """A paper-table row or measurement cannot be built from these inputs; the message names the value and rule."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PaperRow:
    """One claim of the paper's abstract and what was measured here.

    - ``section``: compression, correction, routing, calibration, finetune or polarized; ``claim``: the claim in words.
    - ``value``: the figure measured here (a number, or text where the figure is a description); ``unit`` says its
      unit; ``ci``: its 95% interval (None where there is none: counts, or too little data).
    - ``paper_value``: the paper's figure; ``data``: one of :data:`DATA_KINDS`; ``source``: exactly which data.
    - ``verdict``: one of :data:`VERDICTS`; ``reason``: the rule applied and the numbers, one or two sentences.
    - ``details``: JSON-able extras (per-finding figures, counts).

    Raises PaperError for an unknown verdict or data kind, a structural row marked 'reproduced', or an empty reason.
    """

    section: str
    claim: str
    value: float | int | str | None
    ci: tuple[float, float] | None
    paper_value: float | int | str
    data: str
    verdict: str
    reason: str
    unit: str = ""
    source: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise PaperError(f"Invalid verdict {self.verdict!r} for {self.claim!r} - expected one of {VERDICTS}")
        if self.data not in DATA_KINDS:
            raise PaperError(f"Invalid data {self.data!r} for {self.claim!r} - expected one of {DATA_KINDS}")
        if self.data == STRUCTURAL and self.verdict == "reproduced":
            raise PaperError(
                f"Invalid verdict for {self.claim!r}: a structural claim is never 'reproduced' - "
                "use 'true by construction' or 'not reproduced'"
            )
        if not self.reason.strip():
            raise PaperError(f"Invalid reason for {self.claim!r} - every row says why it got its verdict")
        if self.ci is not None:
            lo, hi = (float(v) for v in self.ci)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise PaperError(
                    f"Invalid ci {self.ci!r} for {self.claim!r} - expected finite (low, high), low <= high"
                )
            object.__setattr__(self, "ci", (lo, hi))

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "claim": self.claim,
            "value": self.value,
            "unit": self.unit,
            "ci": list(self.ci) if self.ci else None,
            "paper_value": self.paper_value,
            "data": self.data,
            "source": self.source,
            "verdict": self.verdict,
            "reason": self.reason,
            "details": dict(self.details),
        }


def _row(**kwargs: Any) -> PaperRow:
    return PaperRow(**kwargs)


def ratio_verdict(
    value: float | None, ci: tuple[float, float] | None, paper: float, tolerance: float = RATIO_TOLERANCE
) -> tuple[str, str]:
    """(verdict, reason) for a measured ratio against the paper's: 'reproduced' when the CI contains ``paper`` or the
    point estimate is within ``tolerance`` (relative) of it; 'not measurable here' when there is no estimate."""
    if value is None or not math.isfinite(value):
        return "not measurable here", "no estimate: too few positives or one outcome only"
    within = abs(value / paper - 1.0) <= tolerance
    covers = ci is not None and ci[0] <= paper <= ci[1]
    rule = f"rule: the CI contains {paper:g} or the estimate is within {tolerance:.0%} of it"
    if covers or within:
        how = "the CI contains it" if covers else f"{value:.3g} is within {tolerance:.0%}"
        return "reproduced", f"{how} ({rule})"
    return "not reproduced", f"{value:.3g} is {value / paper:.2f}x the paper's {paper:g} ({rule})"
