"""Treatment decision system: route each finding's problem to the cheapest intervention that is verified to work.

**Parts.** Everything is diagnosed, fitted and planned on the *selection* part of the validation data and measured
on the patient-disjoint *verification* part (``model.verification.split_features``). Confidence intervals are
percentile 95% intervals of a bootstrap that resamples PATIENTS of the verification part; deltas are paired (the
same resamples before and after).

**Diagnosis** of one finding on the selection part (and the radiologist feedback), in this order:

- *too few positives*: fewer than ``MIN_POSITIVES`` positive images in the selection or the verification part. The
  finding is reported and routed to "needs data"; it gets no other verdict.
- *false-positive pattern*: at least ``MIN_CONFIRMED`` = 2 images that radiologists marked absent for the finding and
  that the model still calls present share contributing channels: a channel counts as shared when it is among the
  top ``TOP_CHANNELS`` = 10 channels by contribution ``φ_k = w_k · ā_k`` of at least half of them (and at least 2).
- *weak ranking*: the selection AUROC's upper 95% bound is below ``AUROC_FLOOR`` = 0.70; *regressed ranking*: it is
  below the reference (parent) model's AUROC on the same images, when one is given.
- *poor operating point*: at the current threshold, F1 is at least ``F1_GAP`` = 0.05 below, or recall at least
  ``RECALL_GAP`` = 0.20 below, what the F1-optimal threshold of the selection part gives ("far").
- otherwise *nothing to fix*.

A finding with several problems is routed for the first of: false-positive pattern, ranking, operating point (the
others are listed in its evidence; run ``decide`` again on the candidate to address them).

**Interventions**, cheapest first, each with its acceptance rule on the verification part:

1. *threshold* (1 number in the manifest, no weight). Operating point: the F1-optimal threshold of the selection
   part; accepted when the paired ΔF1 CI lies above 0. False-positive pattern: the lowest threshold above every
   confirmed false positive; accepted when it loses at most ``TOLERANCE`` = 2% of the held-out true positives.
   Ranking: rejected (a threshold cannot change AUROC).
2. *channel edit* (zero a few weights of the finding's row: ``model.correct.plan_correction`` on the selection part
   with the confirmed false positives as targets); accepted when ``model.correct.check_held_out`` passes on the
   verification part (held-out TP loss rate within ``TOLERANCE``). Only for a false-positive pattern.
3. *head fine-tune* (the finding's row and bias, ``C + 1`` parameters, from ``model.finetune.finetune_head`` trained
   on one patient-disjoint half of the selection part and stopped on the other; for a false-positive pattern the
   confirmed false positives are added as negatives). Ranking: accepted when the paired ΔAUROC CI lies above 0;
   operating point: when the ΔF1 CI does (threshold refitted on the selection part); false-positive pattern: when
   every confirmed false positive falls below the threshold (seen in training: stated, not verified) and
   ``check_held_out`` passes. The refit trains all rows jointly; only the finding's row is applied, and the other
   rows of the refit head are measured against their verification CIs and reported (``whole_head_check``).
4. *needs data / retraining*: nothing cheaper passed its rule.

**Other findings.** Every intervention changes only its finding's threshold or row of the head, and a finding's
probability depends only on its own row and bias, so the other findings are untouched *by construction* (a unit
test asserts the composed head's other rows are bit-identical); this is stated, never claimed as a result.

**Cost** of an intervention: parameters changed (weights and biases; a threshold changes 0 weights and 1 manifest
number), findings touched, and CPU seconds (``time.process_time``, all threads, for fitting plus verifying it).

With only predictions (no model, :func:`decide_predictions`) only thresholds can be routed, and the output says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.errors import ModelError
from model.features import FeatureSet
from model.types import LABELS
from model.verification import MIN_POSITIVES, SelectionSplit, interval, patient_bootstrap_counts, selection_split

__all__ = [
    "AUROC_FLOOR",
    "F1_GAP",
    "INTERVENTIONS",
    "MIN_CONFIRMED",
    "RECALL_GAP",
    "RULES",
    "TOLERANCE",
    "TOP_CHANNELS",
    "Composition",
    "Cost",
    "Decision",
    "DecisionError",
    "Diagnosis",
    "Option",
    "Route",
    "compose",
    "decide",
    "decide_predictions",
]

F1_GAP = 0.05  # operating point "far": F1 at the current threshold this much below the F1-optimal one (selection)
RECALL_GAP = 0.20  # ... or recall this much below
AUROC_FLOOR = 0.70  # weak ranking: the selection AUROC's upper 95% bound below this
TOP_CHANNELS = 10  # channels per confirmed false positive compared for a shared pattern
MIN_CONFIRMED = 2  # confirmed false positives needed to call a pattern "recurring"
TOLERANCE = 0.02  # largest acceptable held-out true-positive loss rate
INTERVENTIONS = ("threshold", "channel_edit", "head_finetune", "needs_data")
PROBLEMS = ("too_few_positives", "false_positive_pattern", "weak_ranking", "regressed_ranking", "operating_point")

RULES: dict[str, str] = {
    "threshold/operating_point": "the selection part's F1-optimal threshold; accepted when the verification ΔF1 "
    "(new - current threshold, paired patient bootstrap) has its 95% CI above 0",
    "threshold/false_positive_pattern": "the lowest threshold above every confirmed false positive; accepted when it "
    f"loses at most {TOLERANCE:.0%} of the verification true positives",
    "threshold/ranking": "never accepted: a threshold does not change the ranking (AUROC)",
    "channel_edit/false_positive_pattern": "plan_correction on the selection part (targets: the confirmed false "
    f"positives); accepted when check_held_out passes on the verification part (TP loss rate <= {TOLERANCE:.0%})",
    "channel_edit/other": "not applicable: a channel edit needs false-positive images to target",
    "head_finetune/ranking": "the finding's row refitted on the selection part; accepted when the verification "
    "ΔAUROC 95% CI lies above 0",
    "head_finetune/operating_point": "the finding's row refitted on the selection part, threshold refitted there; "
    "accepted when the verification ΔF1 95% CI lies above 0",
    "head_finetune/false_positive_pattern": "the finding's row refitted with the confirmed false positives as "
    "negatives; accepted when they fall below the threshold (in-sample) and check_held_out passes",
    "needs_data": "chosen when no cheaper intervention meets its rule, or the finding has too few positives",
}


class DecisionError(ModelError, ValueError):
    """The inputs of a decision are unusable: shapes, unknown findings, thresholds outside (0, 1)."""


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


# ------------------------------------------------------------------------------------------------ statistics


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _probabilities(pooled: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float64 [N, n]: the same float32 arithmetic as the classifier, then the sigmoid in float64."""
    z = pooled.astype(np.float32) @ weight.astype(np.float32).T + bias.astype(np.float32)
    return _sigmoid(z.astype(np.float64))


def _f1_recall(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float | None, float | None]:
    positives = int(y.sum())
    if positives == 0:
        return None, None
    pred = s >= t
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    return 2 * tp / (2 * tp + fp + (positives - tp)), tp / positives


def _boot_f1(y: np.ndarray, s: np.ndarray, t: float, counts: np.ndarray) -> np.ndarray:
    """F1 [B] at threshold ``t`` on each resample (NaN where a resample has no positive)."""
    pred = s >= t
    tp, fp, fn = counts @ (pred & y), counts @ (pred & ~y), counts @ (~pred & y)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), np.nan)


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _boot_auroc(y: np.ndarray, s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    from model.metrics import bootstrap_auroc

    return bootstrap_auroc(y.astype(np.int64), s.astype(np.float64), counts)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: tuple[float, float] | None, signed: bool = False) -> str:
    if ci is None:
        return "no CI"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _above_zero(ci: tuple[float, float] | None) -> bool:
    return ci is not None and ci[0] > 0


# ------------------------------------------------------------------------------------------------ the context


@dataclass(frozen=True, kw_only=True, slots=True)
class _Part:
    """Scores of one part: ``y`` bool [N, 14] (head order), ``p`` float64 [N, n] probabilities, patient bootstrap
    ``counts`` float64 [B, N] (verification only)."""

    y: np.ndarray
    p: np.ndarray
    patients: tuple[str | None, ...]
    counts: np.ndarray


@dataclass(frozen=True, kw_only=True, slots=True)
class _Context:
    labels: tuple[str, ...]
    thresholds: dict[str, float]
    selection: _Part
    verification: _Part
    n_bootstrap: int
    seed: int
    tolerance: float
    min_positives: int
    reference_auroc: dict[str, float]
    # model mode only
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    selection_features: FeatureSet | None = None
    verification_features: FeatureSet | None = None
    false_positives: dict[str, FeatureSet] = field(default_factory=dict)


def _columns(labels: Sequence[str]) -> list[int]:
    try:
        return [LABELS.index(label) for label in labels]
    except ValueError:
        unknown = [label for label in labels if label not in LABELS]
        raise DecisionError(f"Invalid labels {unknown} - expected ChestX-ray14 findings: {', '.join(LABELS)}") from None


def _check_thresholds(thresholds: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    out = {}
    for label in labels:
        if label not in thresholds:
            raise DecisionError(f"Invalid thresholds: no threshold for {label!r} - expected one per label")
        value = float(thresholds[label])
        if not 0.0 < value < 1.0:
            raise DecisionError(f"Invalid threshold for {label!r}: {value} - must be in (0, 1)")
        out[label] = value
    return out


def _part(y: np.ndarray, p: np.ndarray, patients: Sequence[str | None], n_bootstrap: int, seed: int) -> _Part:
    counts = patient_bootstrap_counts(patients, n_bootstrap, seed).astype(np.float64)
    return _Part(y=y.astype(bool), p=p, patients=tuple(patients), counts=counts)


# ------------------------------------------------------------------------------------------------ diagnosis


def _pattern(ctx: _Context, row: int, name: str) -> tuple[int, tuple[int, ...], float | None, list[str]]:
    """(confirmed false positives still called present, shared channels, mean pairwise Jaccard, evidence)."""
    fps = ctx.false_positives.get(name)
    if fps is None or len(fps) == 0 or ctx.weight is None or ctx.bias is None:
        return 0, (), None, []
    p = _probabilities(fps.pooled, ctx.weight[row : row + 1], ctx.bias[row : row + 1])[:, 0]
    present = p >= ctx.thresholds[name]
    n = int(present.sum())
    evidence = [f"{len(fps)} image(s) marked absent by radiologists, {n} still called present"]
    if n < MIN_CONFIRMED:
        if n:
            evidence.append(f"fewer than {MIN_CONFIRMED} confirmed false positives: no recurring pattern to judge")
        return n, (), None, evidence
    phi = fps.pooled[present].astype(np.float64) * ctx.weight[row].astype(np.float64)  # [n, C]
    k = min(TOP_CHANNELS, phi.shape[1])
    tops = [set(np.argsort(-r, kind="stable")[:k].tolist()) & set(np.flatnonzero(r > 0).tolist()) for r in phi]
    pairs = [(a, b) for i, a in enumerate(tops) for b in tops[i + 1 :]]
    jaccard = float(np.mean([len(a & b) / len(a | b) if a | b else 0.0 for a, b in pairs]))
    need = max(2, math.ceil(n / 2))
    counts: dict[int, int] = {}
    for top in tops:
        for c in top:
            counts[c] = counts.get(c, 0) + 1
    mean_phi = phi.mean(0)
    shared = tuple(sorted((c for c, m in counts.items() if m >= need), key=lambda c: (-mean_phi[c], c)))
    if shared:
        positive = np.maximum(phi, 0.0).sum(1)
        share = float(np.median(np.maximum(phi[:, list(shared)], 0.0).sum(1) / np.maximum(positive, 1e-12)))
        top = ", ".join(f"{c} (φ {mean_phi[c]:+.2f})" for c in shared[:5])
        evidence.append(
            f"{n} confirmed false positives share {len(shared)} channel(s) in their top {k}, strongest "
            f"{top} (mean pairwise Jaccard {jaccard:.2f}; median share of their positive evidence "
            f"{share:.0%})"
        )
    else:
        evidence.append(
            f"{n} confirmed false positives share no channel in their top {k} (mean pairwise Jaccard "
            f"{jaccard:.2f}): no recurring pattern"
        )
    return n, shared, jaccard, evidence


def _diagnose(ctx: _Context, row: int, name: str) -> Diagnosis:
    column = LABELS.index(name)
    sel = ctx.selection
    y = sel.y[:, column]
    s = sel.p[:, row]
    threshold = ctx.thresholds[name]
    pos_sel, pos_ver = int(y.sum()), int(ctx.verification.y[:, column].sum())
    f1, recall = _f1_recall(y, s, threshold)
    from model.calibrate import fit_threshold

    best = fit_threshold(y, s, "f1") if 0 < pos_sel < len(y) else None
    f1_best, recall_best = _f1_recall(y, s, best) if best is not None else (None, None)
    auroc = _auroc(y, s)
    auroc_ci = interval(_boot_auroc(y, s, sel.counts)) if auroc is not None else None
    reference = ctx.reference_auroc.get(name)
    n_fp, shared, jaccard, fp_evidence = _pattern(ctx, row, name)
    common = dict(
        finding=name,
        positives_selection=pos_sel,
        positives_verification=pos_ver,
        threshold=threshold,
        f1=f1,
        recall=recall,
        best_threshold=best,
        f1_best=f1_best,
        recall_best=recall_best,
        auroc=auroc,
        auroc_ci=auroc_ci,
        reference_auroc=reference,
        confirmed_false_positives=n_fp,
        shared_channels=shared,
        channel_jaccard=jaccard,
    )
    if min(pos_sel, pos_ver) < ctx.min_positives:
        evidence = (
            f"{pos_sel} positive(s) in the selection part, {pos_ver} in the verification part; at least "
            f"{ctx.min_positives} in each are needed for a verdict",
        )
        return Diagnosis(problems=("too_few_positives",), evidence=evidence, **common)  # type: ignore[arg-type]
    problems: list[str] = []
    evidence: list[str] = []
    if shared:
        problems.append("false_positive_pattern")
    evidence.extend(fp_evidence)
    if auroc_ci is not None and auroc_ci[1] < AUROC_FLOOR:
        problems.append("weak_ranking")
        evidence.append(f"AUROC {auroc:.3f} {_fmt_ci(auroc_ci)} entirely below the floor {AUROC_FLOOR}")
    if reference is not None and auroc_ci is not None and auroc_ci[1] < reference:
        problems.append("regressed_ranking")
        evidence.append(
            f"AUROC {auroc:.3f} {_fmt_ci(auroc_ci)} entirely below the reference model's {reference:.3f}"
            " on the same images"
        )
    if f1 is not None and f1_best is not None and recall is not None and recall_best is not None:
        text = (
            f"F1 {f1:.3f} / recall {recall:.3f} at threshold {threshold:.3g} vs F1 {f1_best:.3f} / recall "
            f"{recall_best:.3f} at the F1-optimal {best:.3g}"
        )
        if f1_best - f1 >= F1_GAP or recall_best - recall >= RECALL_GAP:
            problems.append("operating_point")
            evidence.append(f"{text} (far: F1 gap >= {F1_GAP} or recall gap >= {RECALL_GAP})")
        else:
            evidence.append(text)
    if auroc is not None and "weak_ranking" not in problems and "regressed_ranking" not in problems:
        evidence.append(f"AUROC {auroc:.3f} {_fmt_ci(auroc_ci)}")
    return Diagnosis(problems=tuple(problems), evidence=tuple(evidence), **common)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ interventions


class _Clock:
    def __init__(self) -> None:
        self.start = time.process_time()

    @property
    def seconds(self) -> float:
        return time.process_time() - self.start


def _verified_f1_change(
    ctx: _Context, row: int, column: int, s_before: np.ndarray, t_before: float, s_after: np.ndarray, t_after: float
) -> dict[str, Any]:
    ver = ctx.verification
    y = ver.y[:, column]
    f1_before, recall_before = _f1_recall(y, s_before, t_before)
    f1_after, recall_after = _f1_recall(y, s_after, t_after)
    samples = _boot_f1(y, s_after, t_after, ver.counts) - _boot_f1(y, s_before, t_before, ver.counts)
    return {
        "metric": "F1",
        "before": f1_before,
        "after": f1_after,
        "delta": None if f1_before is None or f1_after is None else f1_after - f1_before,
        "ci": interval(samples),
        "recall_before": recall_before,
        "recall_after": recall_after,
        "images": len(y),
        "positives": int(y.sum()),
    }


def _threshold_option(ctx: _Context, row: int, name: str, diagnosis: Diagnosis) -> Option:
    clock = _Clock()
    column = LABELS.index(name)
    t0 = ctx.thresholds[name]
    problem = diagnosis.problem
    if problem in ("weak_ranking", "regressed_ranking"):
        return Option(
            kind="threshold",
            accepted=False,
            rule=RULES["threshold/ranking"],
            reason="a threshold does not change the ranking: AUROC is threshold-free",
        )
    s_ver = ctx.verification.p[:, row]
    if problem == "false_positive_pattern":
        fps = ctx.false_positives[name]
        assert ctx.weight is not None and ctx.bias is not None
        worst = float(_probabilities(fps.pooled, ctx.weight[row : row + 1], ctx.bias[row : row + 1])[:, 0].max())
        new = float(np.nextafter(np.float32(worst), np.float32(1.0)))
        y = ctx.verification.y[:, column]
        tp = y & (s_ver >= t0)
        lost = tp & (s_ver < new)
        rate = float(lost.sum() / tp.sum()) if tp.sum() else None
        with np.errstate(invalid="ignore", divide="ignore"):
            tp_w = ctx.verification.counts @ tp
            samples = np.where(tp_w > 0, (ctx.verification.counts @ lost) / tp_w, np.nan)
        pattern = ~y & (s_ver >= t0)
        effect = {
            "metric": "held-out TP loss rate",
            "before": 0.0,
            "after": rate,
            "delta": rate,
            "ci": interval(samples) if rate is not None else None,
            "true_positives": int(tp.sum()),
            "true_positives_lost": int(lost.sum()),
            "pattern_examples": int(pattern.sum()),
            "pattern_corrected": int((pattern & (s_ver < new)).sum()),
        }
        f1 = _verified_f1_change(ctx, row, column, s_ver, t0, s_ver, new)
        effect["f1_before"], effect["f1_after"], effect["f1_delta_ci"] = f1["before"], f1["after"], f1["ci"]
        change = {"finding": name, "threshold_from": t0, "threshold_to": new}
        cost = Cost(parameters_changed=0, manifest_numbers=1, findings_touched=1, cpu_seconds=clock.seconds)
        if new >= 1.0 or rate is None:
            why = (
                "no threshold below 1 clears the confirmed false positives"
                if new >= 1.0
                else f"the model calls no verification {name} positive at {t0:.3g}: TP loss cannot be judged"
            )
            return Option(
                kind="threshold",
                accepted=False,
                rule=RULES["threshold/false_positive_pattern"],
                reason=why,
                effect=effect,
                change=change,
                cost=cost,
            )
        ok = rate <= ctx.tolerance
        reason = (
            f"raising the threshold {t0:.3g} -> {new:.4g} loses {int(lost.sum())} of {int(tp.sum())} held-out "
            f"true positives ({rate:.1%}, {'within' if ok else 'above'} the tolerance {ctx.tolerance:.0%})"
        )
        return Option(
            kind="threshold",
            accepted=ok,
            rule=RULES["threshold/false_positive_pattern"],
            reason=reason,
            effect=effect,
            change=change,
            cost=cost,
        )
    # operating point
    new = diagnosis.best_threshold
    if new is None:
        return Option(
            kind="threshold",
            accepted=False,
            rule=RULES["threshold/operating_point"],
            reason="no threshold could be fitted on the selection part (one outcome only)",
        )
    effect = _verified_f1_change(ctx, row, column, s_ver, t0, s_ver, new)
    ok = _above_zero(effect["ci"])
    cost = Cost(parameters_changed=0, manifest_numbers=1, findings_touched=1, cpu_seconds=clock.seconds)
    reason = (
        f"threshold {t0:.3g} -> {new:.4g}: verification F1 {_fmt(effect['before'])} -> {_fmt(effect['after'])}"
        f", ΔF1 95% CI {_fmt_ci(effect['ci'], True)} " + ("above 0" if ok else "not above 0")
    )
    return Option(
        kind="threshold",
        accepted=ok,
        rule=RULES["threshold/operating_point"],
        reason=reason,
        effect=effect,
        change={"finding": name, "threshold_from": t0, "threshold_to": new},
        cost=cost,
    )


def _held_out(ctx: _Context, row: int, name: str, weight_after: np.ndarray, bias_after: np.ndarray) -> Any:
    from model.correct import check_held_out

    assert ctx.weight is not None and ctx.bias is not None and ctx.verification_features is not None
    return check_held_out(
        ctx.weight,
        ctx.bias,
        weight_after,
        bias_after,
        ctx.thresholds,
        ctx.verification_features,
        finding=name,
        labels=ctx.labels,
        tolerance=ctx.tolerance,
        min_positives=ctx.min_positives,
        n_bootstrap=ctx.n_bootstrap,
        seed=ctx.seed,
    )


def _held_out_effect(check: Any) -> dict[str, Any]:
    return {
        "metric": "held-out TP loss rate",
        "before": 0.0,
        "after": check.tp_loss_rate,
        "delta": check.tp_loss_rate,
        "ci": check.tp_loss_ci,
        "true_positives": check.true_positives,
        "true_positives_lost": check.true_positives_lost,
        "pattern_examples": check.pattern_examples,
        "pattern_corrected": check.pattern_corrected,
        "pattern_delta_p": check.pattern_delta_p,
        "pattern_delta_p_ci": check.pattern_delta_p_ci,
        "auroc_delta": check.auroc_delta,
        "auroc_delta_ci": check.auroc_delta_ci,
        "held_out_check": check.to_dict(),
    }


def _channel_option(ctx: _Context, row: int, name: str, diagnosis: Diagnosis, max_channels: int) -> Option:
    if diagnosis.problem != "false_positive_pattern":
        return Option(
            kind="channel_edit",
            accepted=False,
            rule=RULES["channel_edit/other"],
            reason="no confirmed false-positive images to target: a channel edit removes a pattern, it "
            "cannot move an operating point or improve a ranking",
        )
    from model.correct import CorrectionRefused, plan_correction

    assert ctx.weight is not None and ctx.bias is not None and ctx.selection_features is not None
    clock = _Clock()
    fps = ctx.false_positives[name]
    p = _probabilities(fps.pooled, ctx.weight[row : row + 1], ctx.bias[row : row + 1])[:, 0]
    targets = fps.subset(p >= ctx.thresholds[name])
    rule = RULES["channel_edit/false_positive_pattern"]
    try:
        plan = plan_correction(
            ctx.weight,
            ctx.bias,
            ctx.thresholds,
            ctx.selection_features,
            targets.pooled,
            name,
            max_channels,
            target_ids=targets.ids,
            labels=ctx.labels,
        )
    except CorrectionRefused as exc:
        return Option(
            kind="channel_edit",
            accepted=False,
            rule=rule,
            reason=f"refused on the selection part: {exc.reason.split('. Alternatives')[0]}",
            cost=Cost(parameters_changed=0, manifest_numbers=0, findings_touched=0, cpu_seconds=clock.seconds),
        )
    edited = ctx.weight.copy()
    edited[row, list(plan.channels)] = 0.0
    check = _held_out(ctx, row, name, edited, ctx.bias)
    effect = _held_out_effect(check) | {
        "targets": len(targets),
        "targets_corrected": plan.verification.targets_corrected,
    }
    change = {
        "finding": name,
        "row": row,
        "channels": list(plan.channels),
        "original_weights": list(plan.original_weights),
    }
    cost = Cost(
        parameters_changed=len(plan.channels), manifest_numbers=0, findings_touched=1, cpu_seconds=clock.seconds
    )
    return Option(
        kind="channel_edit",
        accepted=check.passed,
        rule=rule,
        reason=f"zeroing channel(s) {list(plan.channels)}: {check.reason}",
        effect=effect,
        change=change,
        cost=cost,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Refit:
    weight: np.ndarray
    bias: np.ndarray
    cpu_seconds: float
    settings: dict[str, Any]


def _refit(ctx: _Context, extra_negatives: FeatureSet | None, name: str | None, epochs: int) -> _Refit:
    """Head refit on the selection part (one patient-disjoint half trains, the other stops early)."""
    from model.datasets import patient_disjoint_halves
    from model.finetune import finetune_head

    assert ctx.weight is not None and ctx.bias is not None and ctx.selection_features is not None
    clock = _Clock()
    features = ctx.selection_features
    train_mask, stop_mask = patient_disjoint_halves(features.patients, ctx.seed)
    train, stop = features.subset(train_mask), features.subset(stop_mask)
    if extra_negatives is not None and name is not None and len(extra_negatives):
        # the other rows are not applied (only the finding's row is), so their labels here do not matter
        labels = np.zeros((len(extra_negatives), len(LABELS)), np.uint8)
        train = FeatureSet(
            ids=train.ids + extra_negatives.ids,
            patients=train.patients + extra_negatives.patients,
            pooled=np.concatenate([train.pooled, extra_negatives.pooled]),
            labels=np.concatenate([train.labels, labels]),
            source=train.source,
        )
    result = finetune_head(train, stop, ctx.weight, ctx.bias, labels=ctx.labels, max_epochs=epochs, seed=ctx.seed)
    return _Refit(
        weight=result.weight,
        bias=result.bias,
        cpu_seconds=clock.seconds,
        settings={
            "train_images": len(train),
            "stop_images": len(stop),
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
        },
    )


def _whole_head_check(ctx: _Context, refit: _Refit, row: int) -> dict[str, Any]:
    """Where the refit head's OTHER rows would put each other finding's verification AUROC and F1, against the
    current head's 95% CI (informative: those rows are not applied)."""
    assert ctx.verification_features is not None
    ver = ctx.verification
    p_new = _probabilities(ctx.verification_features.pooled, refit.weight, refit.bias)
    moved = []
    checked = 0
    for j, other in enumerate(ctx.labels):
        if j == row:
            continue
        column = LABELS.index(other)
        y = ver.y[:, column]
        if int(y.sum()) < ctx.min_positives:
            continue
        checked += 1
        t = ctx.thresholds[other]
        auroc_ci = interval(_boot_auroc(y, ver.p[:, j], ver.counts))
        f1_ci = interval(_boot_f1(y, ver.p[:, j], t, ver.counts))
        auroc_new = _auroc(y, p_new[:, j])
        f1_new, _ = _f1_recall(y, p_new[:, j], t)
        outside = []
        if auroc_ci and auroc_new is not None and not auroc_ci[0] <= auroc_new <= auroc_ci[1]:
            outside.append(f"AUROC {auroc_new:.3f} outside {_fmt_ci(auroc_ci)}")
        if f1_ci and f1_new is not None and not f1_ci[0] <= f1_new <= f1_ci[1]:
            outside.append(f"F1 {f1_new:.3f} outside {_fmt_ci(f1_ci)}")
        if outside:
            moved.append({"finding": other, "outside": outside})
    return {
        "other_findings_checked": checked,
        "moved_outside_ci": moved,
        "note": "the refit's other rows are NOT applied (only this finding's row is); this says what a whole-head "
        "refit would have done to them",
    }


def _finetune_option(
    ctx: _Context, row: int, name: str, diagnosis: Diagnosis, refits: dict[str | None, _Refit], epochs: int
) -> Option:
    assert ctx.weight is not None and ctx.bias is not None and ctx.verification_features is not None
    problem = diagnosis.problem
    column = LABELS.index(name)
    key = name if problem == "false_positive_pattern" else None
    shared = key is None and None in refits
    if key not in refits:
        refits[key] = _refit(ctx, ctx.false_positives.get(name) if key else None, key, epochs)
    refit = refits[key]
    if refit.settings["best_epoch"] == 0:
        rule = RULES["head_finetune/" + ("ranking" if problem.endswith("ranking") else problem)]
        cost = Cost(
            parameters_changed=0,
            manifest_numbers=0,
            findings_touched=0,
            cpu_seconds=0.0 if shared else refit.cpu_seconds,
            note="the refit changed nothing",
        )
        return Option(
            kind="head_finetune",
            accepted=False,
            rule=rule,
            cost=cost,
            change={"finding": name, "row": row, "refit": refit.settings},
            reason=f"no refit epoch beat the current head on the selection part's stopping half "
            f"({refit.settings['epochs']} epochs): the row would not change",
        )
    clock = _Clock()
    weight = ctx.weight.copy()
    bias = ctx.bias.copy()
    weight[row], bias[row] = refit.weight[row], refit.bias[row]
    s_sel = _probabilities(ctx.selection_features.pooled, weight[row : row + 1], bias[row : row + 1])[:, 0]
    s_ver = _probabilities(ctx.verification_features.pooled, weight[row : row + 1], bias[row : row + 1])[:, 0]
    s_ver_before = ctx.verification.p[:, row]
    y_ver = ctx.verification.y[:, column]
    t0 = ctx.thresholds[name]
    change: dict[str, Any] = {"finding": name, "row": row, "refit": refit.settings}
    if problem == "false_positive_pattern":
        rule = RULES["head_finetune/false_positive_pattern"]
        fps = ctx.false_positives[name]
        p_fp = _probabilities(fps.pooled, weight[row : row + 1], bias[row : row + 1])[:, 0]
        p_fp_before = _probabilities(fps.pooled, ctx.weight[row : row + 1], ctx.bias[row : row + 1])[:, 0]
        confirmed = p_fp_before >= t0
        cleared = int((confirmed & (p_fp < t0)).sum())
        check = _held_out(ctx, row, name, weight, bias)
        effect = _held_out_effect(check) | {"targets": int(confirmed.sum()), "targets_corrected_in_sample": cleared}
        ok = check.passed and cleared == int(confirmed.sum())
        reason = (
            f"refit row clears {cleared} of {int(confirmed.sum())} confirmed false positives (in-sample: they "
            f"were training negatives); held out: {check.reason}"
        )
        new_threshold = t0
    else:
        from model.calibrate import fit_threshold

        new_threshold = fit_threshold(ctx.selection.y[:, column], s_sel, "f1") or t0
        f1 = _verified_f1_change(ctx, row, column, s_ver_before, t0, s_ver, new_threshold)
        if problem == "operating_point":
            rule = RULES["head_finetune/operating_point"]
            effect = f1
            ok = _above_zero(f1["ci"])
            reason = (
                f"refit row, threshold {new_threshold:.4g}: verification F1 {_fmt(f1['before'])} -> "
                f"{_fmt(f1['after'])}, ΔF1 95% CI {_fmt_ci(f1['ci'], True)} " + ("above 0" if ok else "not above 0")
            )
        else:
            rule = RULES["head_finetune/ranking"]
            before, after = _auroc(y_ver, s_ver_before), _auroc(y_ver, s_ver)
            samples = _boot_auroc(y_ver, s_ver, ctx.verification.counts) - _boot_auroc(
                y_ver, s_ver_before, ctx.verification.counts
            )
            ci = interval(samples)
            ok = _above_zero(ci)
            effect = {
                "metric": "AUROC",
                "before": before,
                "after": after,
                "delta": None if before is None or after is None else after - before,
                "ci": ci,
                "f1_before": f1["before"],
                "f1_after": f1["after"],
                "f1_delta_ci": f1["ci"],
            }
            reason = (
                f"refit row: verification AUROC {_fmt(before)} -> {_fmt(after)}, ΔAUROC 95% CI "
                f"{_fmt_ci(ci, True)} " + ("above 0" if ok else "not above 0")
            )
    effect["whole_head_check"] = _whole_head_check(ctx, refit, row)
    change["threshold_from"], change["threshold_to"] = t0, float(new_threshold)
    changed = int((weight[row] != ctx.weight[row]).sum()) + int(bias[row] != ctx.bias[row])
    note = (
        "refit run shared with other findings (its CPU time is counted once, here only the verification)"
        if shared
        else f"includes the head refit ({refit.cpu_seconds:.2f} s)"
    )
    cost = Cost(
        parameters_changed=changed,
        manifest_numbers=int(new_threshold != t0),
        findings_touched=1,
        cpu_seconds=clock.seconds + (0.0 if shared else refit.cpu_seconds),
        note=note,
    )
    return Option(
        kind="head_finetune",
        accepted=ok,
        rule=rule,
        reason=reason,
        effect=effect,
        change=change,
        cost=cost,
        row_weight=weight[row].astype(np.float32),
        row_bias=float(bias[row]),
    )


def _needs_data(diagnosis: Diagnosis, tried: Sequence[Option]) -> Option:
    if diagnosis.problem == "too_few_positives":
        reason = (
            f"{diagnosis.positives_selection} selection / {diagnosis.positives_verification} verification "
            "positives: no intervention can be verified - collect more labelled positives"
        )
    elif tried:
        reason = (
            "no intervention's effect was verified on the verification part (the selection part's problem may be "
            "noise, or need more than this model's head): collect more labelled data or retrain the network"
        )
    else:
        reason = "no intervention applies here"
    return Option(kind="needs_data", accepted=True, rule=RULES["needs_data"], reason=reason)


def _other_findings(kind: str) -> str:
    if kind == "threshold":
        return "untouched by construction: only this finding's threshold changes"
    if kind in ("channel_edit", "head_finetune"):
        return "untouched by construction: only this finding's row of the head changes (its logit alone depends on it)"
    return "unchanged: nothing is applied"


def _route(
    ctx: _Context, row: int, name: str, *, model: bool, max_channels: int, epochs: int, refits: dict[str | None, _Refit]
) -> Route:
    diagnosis = _diagnose(ctx, row, name)
    problem = diagnosis.problem
    if problem == "none":
        return Route(
            finding=name, diagnosis=diagnosis, chosen=None, rejected=(), other_findings="unchanged: nothing to fix"
        )
    if problem == "too_few_positives":
        return Route(
            finding=name,
            diagnosis=diagnosis,
            chosen=_needs_data(diagnosis, ()),
            rejected=(),
            other_findings=_other_findings("needs_data"),
        )
    tried: list[Option] = [_threshold_option(ctx, row, name, diagnosis)]
    if model:
        if not tried[-1].accepted:
            tried.append(_channel_option(ctx, row, name, diagnosis, max_channels))
        if not tried[-1].accepted:
            tried.append(_finetune_option(ctx, row, name, diagnosis, refits, epochs))
    else:
        for kind in ("channel_edit", "head_finetune"):
            tried.append(
                Option(
                    kind=kind,
                    accepted=False,
                    rule="needs the model's head and features",
                    reason="predictions only: no model to edit (only thresholds can be routed)",
                )
            )
    chosen = next((o for o in tried if o.accepted), None)
    if chosen is None:
        chosen = _needs_data(diagnosis, tried)
    rejected = tuple(o for o in tried if o is not chosen)
    return Route(
        finding=name, diagnosis=diagnosis, chosen=chosen, rejected=rejected, other_findings=_other_findings(chosen.kind)
    )


def _run(ctx: _Context, *, mode: str, split: SelectionSplit, note: str, max_channels: int, epochs: int) -> Decision:
    clock = _Clock()
    refits: dict[str | None, _Refit] = {}
    routes = tuple(
        _route(ctx, row, name, model=mode == "model", max_channels=max_channels, epochs=epochs, refits=refits)
        for row, name in enumerate(ctx.labels)
    )
    settings = {
        "n_bootstrap": ctx.n_bootstrap,
        "seed": ctx.seed,
        "tolerance": ctx.tolerance,
        "min_positives": ctx.min_positives,
        "f1_gap": F1_GAP,
        "recall_gap": RECALL_GAP,
        "auroc_floor": AUROC_FLOOR,
        "top_channels": TOP_CHANNELS,
        "min_confirmed": MIN_CONFIRMED,
        "max_channels": max_channels,
        "finetune_max_epochs": epochs,
        "reference_auroc": dict(ctx.reference_auroc) or None,
        "feedback": {k: len(v) for k, v in ctx.false_positives.items()},
    }
    return Decision(
        mode=mode,
        labels=ctx.labels,
        routes=routes,
        split=split.to_dict(),
        rules=dict(RULES),
        settings=settings,
        note=note,
        cpu_seconds=clock.seconds,
    )


# ------------------------------------------------------------------------------------------------ public API


def decide(
    weight: np.ndarray,
    bias: np.ndarray,
    thresholds: Mapping[str, float],
    selection: FeatureSet,
    verification: FeatureSet,
    split: SelectionSplit,
    *,
    labels: Sequence[str] = LABELS,
    false_positives: Mapping[str, FeatureSet] | None = None,
    reference_auroc: Mapping[str, float] | None = None,
    tolerance: float = TOLERANCE,
    min_positives: int = MIN_POSITIVES,
    max_channels: int = 5,
    finetune_epochs: int = 200,
    n_bootstrap: int = 500,
    seed: int = 0,
) -> Decision:
    """Diagnose every finding on ``selection`` and route it to the cheapest intervention verified on ``verification``
    (see the module docstring for the rules).

    ``weight`` float32 [n, C], ``bias`` [n]: the head in ``labels`` order; ``thresholds``: label -> (0, 1);
    ``selection``/``verification``: the two patient-disjoint parts (``model.verification.split_features``, which also
    gives ``split``); ``false_positives``: finding -> features of images radiologists marked absent for it;
    ``reference_auroc``: finding -> the reference (parent) model's AUROC on the selection images. Raises
    DecisionError for unusable inputs."""
    labels = tuple(labels)
    _columns(labels)
    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[0] != len(labels) or bias.shape != (len(labels),):
        raise DecisionError(
            f"Invalid head: weight {weight.shape}, bias {bias.shape} - expected [{len(labels)}, C] and [{len(labels)}]"
        )
    for what, fs in (
        ("selection", selection),
        ("verification", verification),
        *((f"false_positives[{k!r}]", v) for k, v in (false_positives or {}).items()),
    ):
        if fs.channels != weight.shape[1]:
            raise DecisionError(f"Invalid {what} features: {fs.channels} channels - the head has {weight.shape[1]}")
    if len(selection) < 2 or len(verification) < 2:
        raise DecisionError(
            f"Invalid parts: {len(selection)} selection / {len(verification)} verification images - "
            "need at least 2 in each"
        )
    if not 0.0 <= tolerance <= 1.0:
        raise DecisionError(f"Invalid tolerance {tolerance} - must be a rate in [0, 1]")
    fps = {}
    for key, value in (false_positives or {}).items():
        if key not in labels:
            raise DecisionError(f"Invalid false_positives finding {key!r} - expected one of {', '.join(labels)}")
        fps[key] = value
    checked = _check_thresholds(thresholds, labels)
    ctx = _Context(
        labels=labels,
        thresholds=checked,
        selection=_part(
            selection.labels, _probabilities(selection.pooled, weight, bias), selection.patients, n_bootstrap, seed
        ),
        verification=_part(
            verification.labels,
            _probabilities(verification.pooled, weight, bias),
            verification.patients,
            n_bootstrap,
            seed,
        ),
        n_bootstrap=n_bootstrap,
        seed=seed,
        tolerance=tolerance,
        min_positives=min_positives,
        reference_auroc={k: float(v) for k, v in (reference_auroc or {}).items()},
        weight=weight,
        bias=bias,
        selection_features=selection,
        verification_features=verification,
        false_positives=fps,
    )
    note = (
        "model mode: thresholds, channel edits and head refits were considered; the other findings are untouched "
        "by construction (each intervention changes one finding's threshold or row)"
    )
    return _run(ctx, mode="model", split=split, note=note, max_channels=max_channels, epochs=finetune_epochs)


def decide_predictions(
    scores: np.ndarray,
    labels: np.ndarray,
    patients: Sequence[str | None],
    thresholds: Mapping[str, float] | None = None,
    *,
    label_names: Sequence[str] = LABELS,
    reference_auroc: Mapping[str, float] | None = None,
    tolerance: float = TOLERANCE,
    min_positives: int = MIN_POSITIVES,
    n_bootstrap: int = 500,
    seed: int = 0,
) -> Decision:
    """The decision for a predictions file: ``scores`` probabilities [N, n] and ``labels`` {0, 1} [N, 14] (LABELS
    order), ``patients`` [N]; ``thresholds`` default 0.5. Only thresholds can be routed (no head to edit, no channels
    to compare, so no false-positive pattern can be diagnosed); the Decision's ``note`` says so."""
    label_names = tuple(label_names)
    _columns(label_names)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[1] != len(label_names) or labels.shape != (len(scores), len(LABELS)):
        raise DecisionError(
            f"Invalid shapes: scores {scores.shape}, labels {labels.shape} - expected [N, "
            f"{len(label_names)}] and [N, {len(LABELS)}]"
        )
    if not np.all(np.isfinite(scores)) or scores.min(initial=0) < 0 or scores.max(initial=0) > 1:
        raise DecisionError("Invalid scores - must be finite probabilities in [0, 1]")
    if len(patients) != len(scores):
        raise DecisionError(f"Invalid patients: {len(patients)} for {len(scores)} images")
    split = selection_split(patients, labels, seed=seed)
    checked = _check_thresholds(thresholds or dict.fromkeys(label_names, 0.5), label_names)
    pats = np.asarray(patients, dtype=object)
    sel, ver = split.selection, split.verification
    ctx = _Context(
        labels=label_names,
        thresholds=checked,
        selection=_part(labels[sel], scores[sel], tuple(pats[sel]), n_bootstrap, seed),
        verification=_part(labels[ver], scores[ver], tuple(pats[ver]), n_bootstrap, seed),
        n_bootstrap=n_bootstrap,
        seed=seed,
        tolerance=tolerance,
        min_positives=min_positives,
        reference_auroc={k: float(v) for k, v in (reference_auroc or {}).items()},
    )
    note = (
        "predictions only: only thresholds can be routed - channel edits and head refits need the model, and a "
        "false-positive pattern (shared channels) cannot be diagnosed without it"
    )
    return _run(ctx, mode="predictions", split=split, note=note, max_channels=0, epochs=0)


def compose(decision: Decision, weight: np.ndarray, bias: np.ndarray, thresholds: Mapping[str, float]) -> Composition:
    """Apply every chosen intervention of ``decision`` to the head (``weight`` [n, C], ``bias`` [n], in
    ``decision.labels`` order) and ``thresholds``: one step per finding, each touching only that finding's row
    and/or threshold. Raises DecisionError when a channel edit's recorded weights do not match ``weight`` (the
    decision was made for another model) or a head change is asked of a predictions-only decision."""
    w = np.array(weight, dtype=np.float32, copy=True)
    b = np.array(bias, dtype=np.float32, copy=True)
    out = {k: float(v) for k, v in thresholds.items()}
    steps: list[dict[str, Any]] = []
    for route in decision.chosen:
        option = route.chosen
        assert option is not None
        name = route.finding
        row = decision.labels.index(name)
        step: dict[str, Any] = {
            "operation": f"decide:{option.kind}",
            "finding": name,
            "problem": route.diagnosis.problem,
        }
        if option.kind == "channel_edit":
            channels = option.change["channels"]
            current = w[row, channels].tolist()
            if any(
                np.float32(a) != np.float32(c) for a, c in zip(current, option.change["original_weights"], strict=True)
            ):
                raise DecisionError(
                    f"the decision's {name} channel edit does not belong to this head: weights at "
                    f"{channels} are {current}"
                )
            w[row, channels] = 0.0
            step["channels"] = list(channels)
        elif option.kind == "head_finetune":
            if option.row_weight is None or option.row_bias is None or decision.mode != "model":
                raise DecisionError(f"the decision's {name} head refit carries no weights (predictions mode?)")
            w[row] = option.row_weight
            b[row] = np.float32(option.row_bias)
            step["row"] = row
        if "threshold_to" in option.change and option.change["threshold_to"] != option.change["threshold_from"]:
            out[name] = float(option.change["threshold_to"])
            step["threshold_from"] = option.change["threshold_from"]
            step["threshold_to"] = out[name]
        step["verified_effect"] = {
            k: _jsonable(option.effect.get(k)) for k in ("metric", "before", "after", "delta", "ci")
        }
        steps.append(step)
    changed = int((w != np.asarray(weight, np.float32)).sum() + (b != np.asarray(bias, np.float32)).sum())
    return Composition(weight=w, bias=b, thresholds=out, steps=tuple(steps), parameters_changed=changed)
