"""Intervention 3, a head fine-tune: the finding's row and bias refitted (``model.finetune.finetune_head``) on one
patient-disjoint half of the selection part and stopped on the other; the other rows of the refit are checked too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from model.decide.channel_edit import _held_out, _held_out_effect
from model.decide.context import _Context
from model.decide.measures import (
    _above_zero,
    _auroc,
    _boot_auroc,
    _boot_f1,
    _Clock,
    _f1_recall,
    _fmt,
    _fmt_ci,
    _probabilities,
)
from model.decide.results import Cost, Diagnosis, Option
from model.decide.rules import RULES
from model.decide.threshold import _verified_f1_change
from model.features import FeatureSet
from model.types import LABELS
from model.verification import interval


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


def _judge_pattern_refit(
    ctx: _Context, row: int, name: str, weight: np.ndarray, bias: np.ndarray
) -> tuple[str, dict[str, Any], bool, str]:
    """A refit head (``weight``, ``bias``) against a false-positive pattern of ``name``: accepted when every confirmed
    false positive falls below the threshold (in-sample) and the held-out check passes. Returns (rule, effect,
    accepted, reason)."""
    assert ctx.weight is not None and ctx.bias is not None
    t0 = ctx.thresholds[name]
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
    return rule, effect, ok, reason


def _judge_refit(
    ctx: _Context, row: int, name: str, problem: str, s_sel: np.ndarray, s_ver: np.ndarray
) -> tuple[str, dict[str, Any], bool, str, float]:
    """A refit row against a ranking or operating-point problem of ``name``, its threshold refitted (F1-optimal) on
    the selection part; ``s_sel`` / ``s_ver``: the refit row's probabilities on the selection / verification part.
    Returns (rule, effect, accepted, reason, new threshold)."""
    from model.calibrate import fit_threshold

    column = LABELS.index(name)
    t0 = ctx.thresholds[name]
    s_ver_before = ctx.verification.p[:, row]
    y_ver = ctx.verification.y[:, column]
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
    return rule, effect, ok, reason, new_threshold


def _finetune_option(
    ctx: _Context, row: int, name: str, diagnosis: Diagnosis, refits: dict[str | None, _Refit], epochs: int
) -> Option:
    """Intervention 3 for ``name`` (head row ``row``): its row from the head refit (``refits`` caches one refit per
    false-positive finding and one shared by the others; ``epochs``: refit epochs), judged by the rule of its
    problem; the cost counts a shared refit's CPU time once."""
    assert ctx.weight is not None and ctx.bias is not None and ctx.verification_features is not None
    problem = diagnosis.problem
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
    t0 = ctx.thresholds[name]
    change: dict[str, Any] = {"finding": name, "row": row, "refit": refit.settings}
    if problem == "false_positive_pattern":
        rule, effect, ok, reason = _judge_pattern_refit(ctx, row, name, weight, bias)
        new_threshold = t0
    else:
        rule, effect, ok, reason, new_threshold = _judge_refit(ctx, row, name, problem, s_sel, s_ver)
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
