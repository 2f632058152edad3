"""Routing, cheapest verified intervention first, and the public entry points: :func:`decide` (model mode),
:func:`decide_predictions` (thresholds only) and :func:`compose` (several decisions onto one head).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model.decide.channel_edit import _channel_option
from model.decide.context import _check_thresholds, _columns, _Context, _part
from model.decide.diagnosis import _diagnose
from model.decide.head_finetune import _finetune_option, _Refit
from model.decide.measures import _Clock, _probabilities
from model.decide.results import Composition, Decision, Diagnosis, Option, Route, _jsonable
from model.decide.rules import (
    AUROC_FLOOR,
    F1_GAP,
    MIN_CONFIRMED,
    RECALL_GAP,
    RULES,
    TOLERANCE,
    TOP_CHANNELS,
    DecisionError,
)
from model.decide.threshold import _threshold_option
from model.features import FeatureSet
from model.types import LABELS
from model.verification import MIN_POSITIVES, SelectionSplit, selection_split


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


def _check_model_inputs(
    labels: tuple[str, ...],
    weight: np.ndarray,
    bias: np.ndarray,
    selection: FeatureSet,
    verification: FeatureSet,
    false_positives: Mapping[str, FeatureSet] | None,
    tolerance: float,
) -> dict[str, FeatureSet]:
    """Raise DecisionError unless the head is [n, C] + [n], every feature set has C channels, each part has >= 2
    images, ``tolerance`` is a rate and every false-positive finding is one of ``labels``; return the false positives
    as a dict."""
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
    return fps


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
    fps = _check_model_inputs(labels, weight, bias, selection, verification, false_positives, tolerance)
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
