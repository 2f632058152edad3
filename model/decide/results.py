"""What a decision returns, as frozen JSON-able values: :class:`Diagnosis`, :class:`Option` and its :class:`Cost`,
:class:`Route` per finding, :class:`Decision`, and :class:`Composition` (several decisions applied to one head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.decide.rules import PROBLEMS, DecisionError

# ------------------------------------------------------------------------------------------------ result types


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class Cost:
    """What an intervention costs: ``parameters_changed`` (head weights + biases; 0 for a threshold),
    ``manifest_numbers`` (thresholds changed), ``findings_touched``, ``cpu_seconds`` (process time, all threads, to
    fit and verify it); ``note`` e.g. that a fine-tune run was shared."""

    parameters_changed: int
    manifest_numbers: int
    findings_touched: int
    cpu_seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters_changed": self.parameters_changed,
            "manifest_numbers": self.manifest_numbers,
            "findings_touched": self.findings_touched,
            "cpu_seconds": round(self.cpu_seconds, 4),
            "note": self.note,
        }

    def text(self) -> str:
        parts = [f"{self.parameters_changed} param", f"{self.findings_touched} finding", f"{self.cpu_seconds:.2f} s"]
        if self.manifest_numbers:
            parts.insert(1, f"{self.manifest_numbers} threshold")
        return ", ".join(parts)


@dataclass(frozen=True, kw_only=True, slots=True)
class Diagnosis:
    """One finding on the selection part.

    ``problems``: names from PROBLEMS (empty: nothing to fix); ``threshold``: the current one; ``f1``/``recall`` at it
    and ``f1_best``/``recall_best`` at ``best_threshold`` (F1-optimal on the selection part); ``auroc`` with its
    patient-bootstrap CI; ``reference_auroc``: the reference model's on the same images (None when not given);
    ``confirmed_false_positives``: feedback images marked absent that the model still calls present;
    ``shared_channels``: channels in the top contributions of at least half of them (and at least 2), strongest mean
    contribution first; ``channel_jaccard``:
    mean pairwise Jaccard of their top-channel sets; ``evidence``: one line per observation."""

    finding: str
    problems: tuple[str, ...]
    positives_selection: int
    positives_verification: int
    threshold: float
    f1: float | None
    recall: float | None
    best_threshold: float | None
    f1_best: float | None
    recall_best: float | None
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    reference_auroc: float | None
    confirmed_false_positives: int
    shared_channels: tuple[int, ...]
    channel_jaccard: float | None
    evidence: tuple[str, ...]

    @property
    def problem(self) -> str:
        """The problem routed: the first of PROBLEMS that applies (ranking problems count as one), or 'none'."""
        for name in PROBLEMS:
            if name in self.problems:
                return name
        return "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "problems": list(self.problems),
            "problem": self.problem,
            "positives_selection": self.positives_selection,
            "positives_verification": self.positives_verification,
            "threshold": self.threshold,
            "f1": self.f1,
            "recall": self.recall,
            "best_threshold": self.best_threshold,
            "f1_best": self.f1_best,
            "recall_best": self.recall_best,
            "auroc": self.auroc,
            "auroc_ci": _jsonable(self.auroc_ci),
            "reference_auroc": self.reference_auroc,
            "confirmed_false_positives": self.confirmed_false_positives,
            "shared_channels": list(self.shared_channels),
            "channel_jaccard": self.channel_jaccard,
            "evidence": list(self.evidence),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Option:
    """One intervention tried for one finding.

    ``kind``: one of INTERVENTIONS; ``accepted``: it met ``rule`` on the verification part; ``reason``: why it was
    accepted or rejected (a sentence); ``effect``: the verified effect (``metric``, ``before``, ``after``, ``delta``,
    ``ci`` and details such as held-out TP loss); ``change``: what it would change (threshold from/to, channels);
    ``cost`` (None when it was not run). ``row_weight`` float32 [C] / ``row_bias``: a fine-tuned row (not in
    ``to_dict``)."""

    kind: str
    accepted: bool
    rule: str
    reason: str
    effect: dict[str, Any] = field(default_factory=dict)
    change: dict[str, Any] = field(default_factory=dict)
    cost: Cost | None = None
    row_weight: np.ndarray | None = None
    row_bias: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "accepted": self.accepted,
            "rule": self.rule,
            "reason": self.reason,
            "effect": _jsonable(self.effect),
            "change": _jsonable(self.change),
            "cost": self.cost.to_dict() if self.cost else None,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Route:
    """One row of the routing table: a finding, its diagnosis, the chosen option (None: nothing to fix), the
    cheaper options rejected (in cost order), and what the choice does to the other findings."""

    finding: str
    diagnosis: Diagnosis
    chosen: Option | None
    rejected: tuple[Option, ...]
    other_findings: str

    @property
    def intervention(self) -> str:
        return "none" if self.chosen is None else self.chosen.kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "problem": self.diagnosis.problem,
            "intervention": self.intervention,
            "evidence": list(self.diagnosis.evidence),
            "diagnosis": self.diagnosis.to_dict(),
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "rejected": [o.to_dict() for o in self.rejected],
            "other_findings": self.other_findings,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """The routing table and how it was made.

    ``mode``: 'model' (head + features) or 'predictions' (scores only: thresholds only); ``split``: the
    selection/verification split (``SelectionSplit.to_dict()``); ``rules``: every acceptance rule; ``note``: what
    the mode cannot do; ``cpu_seconds``: process time of the whole decision."""

    mode: str
    labels: tuple[str, ...]
    routes: tuple[Route, ...]
    split: dict[str, Any]
    rules: dict[str, str]
    settings: dict[str, Any]
    note: str
    cpu_seconds: float

    def route(self, finding: str) -> Route:
        for r in self.routes:
            if r.finding == finding:
                return r
        raise DecisionError(f"Invalid finding {finding!r} - expected one of {', '.join(self.labels)}")

    @property
    def chosen(self) -> tuple[Route, ...]:
        """Routes whose chosen intervention changes the model (threshold, channel edit, head fine-tune)."""
        return tuple(r for r in self.routes if r.intervention in ("threshold", "channel_edit", "head_finetune"))

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.routes:
            counts[r.intervention] = counts.get(r.intervention, 0) + 1
        return {
            "mode": self.mode,
            "labels": list(self.labels),
            "note": self.note,
            "split": _jsonable(self.split),
            "routed": counts,
            "routes": [r.to_dict() for r in self.routes],
            "rules": dict(self.rules),
            "settings": _jsonable(self.settings),
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Composition:
    """The chosen interventions applied together: ``weight`` float32 [n, C], ``bias`` [n], ``thresholds``; ``steps``:
    one JSON-able record per applied intervention (for the provenance); ``parameters_changed``: head entries that
    differ from the parent's."""

    weight: np.ndarray
    bias: np.ndarray
    thresholds: dict[str, float]
    steps: tuple[dict[str, Any], ...]
    parameters_changed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": _jsonable(self.steps),
            "thresholds": dict(self.thresholds),
            "parameters_changed": self.parameters_changed,
        }
