"""Intervention 1, a threshold: the F1-optimal one for a poor operating point, or the lowest above every confirmed
false positive for a pattern; verified on the verification part.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.decide.context import _Context
from model.decide.measures import _above_zero, _boot_f1, _Clock, _f1_recall, _fmt, _fmt_ci, _probabilities
from model.decide.results import Cost, Diagnosis, Option
from model.decide.rules import RULES
from model.types import LABELS
from model.verification import interval


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


def _pattern_threshold(ctx: _Context, row: int, name: str, t0: float, s_ver: np.ndarray, clock: _Clock) -> Option:
    """The lowest threshold above every confirmed false positive of ``name`` (head row ``row``), judged by the
    verification true positives it loses (``s_ver``: verification probabilities of that row; ``t0``: the current
    threshold)."""
    column = LABELS.index(name)
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


def _threshold_option(ctx: _Context, row: int, name: str, diagnosis: Diagnosis) -> Option:
    """Intervention 1 for ``name`` (head row ``row``): rejected for a ranking problem; for a false-positive pattern see
    :func:`_pattern_threshold`; for an operating point, the selection part's F1-optimal threshold, accepted when the
    verification ΔF1 CI lies above 0."""
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
        return _pattern_threshold(ctx, row, name, t0, s_ver, clock)
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
