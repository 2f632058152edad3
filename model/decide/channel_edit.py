"""Intervention 2, a channel edit (``model.correct.plan_correction`` on the selection part with the confirmed false
positives as targets), accepted when ``model.correct.check_held_out`` passes on the verification part.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.decide.context import _Context
from model.decide.measures import _Clock, _probabilities
from model.decide.results import Cost, Diagnosis, Option
from model.decide.rules import RULES


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
