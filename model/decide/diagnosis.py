"""Diagnosis of one finding on the selection part: too few positives, a false-positive pattern shared by confirmed
false positives, weak or regressed ranking, a poor operating point, or nothing to fix.
"""

from __future__ import annotations

import math

import numpy as np

from model.decide.context import _Context
from model.decide.measures import _auroc, _boot_auroc, _f1_recall, _fmt_ci, _probabilities
from model.decide.results import Diagnosis
from model.decide.rules import AUROC_FLOOR, F1_GAP, MIN_CONFIRMED, RECALL_GAP, TOP_CHANNELS
from model.types import LABELS
from model.verification import interval

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
