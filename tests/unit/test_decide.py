"""Treatment decision system on constructed features where each finding's problem is true by design.

Pooled features [N, 24] of 300 patients (2 images each); finding j's signal is channel j (2 + noise for a positive,
noise otherwise), and a clean head row reads it. Then:

- Atelectasis: the row is right but its bias is far too low, so at 0.5 almost nothing is called: a threshold-only
  problem (ranking is perfect).
- Cardiomegaly: an artefact channel (20) present in 15% of images feeds its row strongly, so every artefact image is
  a confident false positive that a higher threshold cannot remove without losing the true positives; radiologists
  marked 6 such images absent: a false-positive pattern a one-channel edit fixes.
- Effusion: the row reads a noise channel instead of its signal: weak ranking, which only a head refit can fix.
- Hernia: 6 positives in all: too few for any verdict.
- every other finding is clean: nothing to fix.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.decide import (
    AUROC_FLOOR,
    DecisionError,
    compose,
    decide,
    decide_predictions,
)
from model.features import FeatureSet
from model.types import LABELS
from model.verification import split_features

C = 24
ARTEFACT = 20
NOISE = 21
A, CM, EFF, HERNIA = (LABELS.index(n) for n in ("Atelectasis", "Cardiomegaly", "Effusion", "Hernia"))
THRESHOLDS = dict.fromkeys(LABELS, 0.5)


def _features(
    rng: np.random.Generator, patients: int, *, artefact_rate: float, prefix: str, positives: bool = True
) -> FeatureSet:
    n = patients * 2
    labels = (rng.random((n, len(LABELS))) < 0.2).astype(np.uint8) if positives else np.zeros((n, 14), np.uint8)
    labels[:, HERNIA] = 0
    pooled = rng.uniform(0.0, 0.5, (n, C))
    for j in range(13):
        pooled[:, j] += 2.0 * labels[:, j]
    artefact = rng.random(n) < artefact_rate
    pooled[:, ARTEFACT] = np.where(artefact, 2.0, 0.0)
    return FeatureSet(
        ids=tuple(f"{prefix}{i}" for i in range(n)),
        patients=tuple(f"{prefix}p{i // 2}" for i in range(n)),
        pooled=pooled.astype(np.float32),
        labels=labels,
        source=f"synthetic {prefix}",
    )


def _head(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    weight = rng.normal(0.0, 0.05, (14, C))
    bias = np.full(14, -4.0)
    for j in range(13):
        weight[j, j] = 4.0
    bias[A] = -11.0  # positives at logit ~-2: p ~0.1 < 0.5, negatives far below: a threshold problem only
    weight[CM, ARTEFACT] = 6.0  # an artefact image is a confident Cardiomegaly false positive (logit ~9)
    weight[EFF, EFF] = 0.0  # Effusion reads noise instead of its signal
    weight[EFF, NOISE] = 1.0
    bias[EFF] = -1.0
    weight[HERNIA, 13] = 4.0
    return weight.astype(np.float32), bias.astype(np.float32)


@pytest.fixture(scope="module")
def case() -> dict:
    rng = np.random.default_rng(7)
    features = _features(rng, 300, artefact_rate=0.15, prefix="v")
    labels = features.labels.copy()
    labels[[5, 100, 201, 300, 402, 555], HERNIA] = 1  # a handful of Hernia positives
    features = FeatureSet(
        ids=features.ids, patients=features.patients, pooled=features.pooled, labels=labels, source=features.source
    )
    feedback = _features(rng, 3, artefact_rate=1.0, prefix="fb", positives=False)  # 6 artefact images, all negative
    weight, bias = _head(rng)
    selection, verification, split = split_features(features, seed=0)
    decision = decide(
        weight,
        bias,
        THRESHOLDS,
        selection,
        verification,
        split,
        false_positives={"Cardiomegaly": feedback},
        reference_auroc={"Effusion": 0.95, "Mass": 0.9},
        n_bootstrap=200,
        seed=0,
    )
    return {"decision": decision, "weight": weight, "bias": bias, "features": features, "feedback": feedback}


def test_threshold_only_problem_is_routed_to_a_threshold(case: dict) -> None:
    route = case["decision"].route("Atelectasis")
    assert route.diagnosis.problem == "operating_point"
    assert route.intervention == "threshold"
    assert route.rejected == ()  # the cheapest option worked: nothing more expensive was tried
    effect = route.chosen.effect
    assert effect["metric"] == "F1" and effect["ci"][0] > 0 and effect["after"] > effect["before"] + 0.5
    assert route.chosen.change["threshold_to"] < 0.5
    assert route.chosen.cost.parameters_changed == 0 and route.chosen.cost.manifest_numbers == 1
    assert "by construction" in route.other_findings


def test_false_positive_pattern_is_routed_to_a_channel_edit_with_held_out_tp_loss(case: dict) -> None:
    route = case["decision"].route("Cardiomegaly")
    assert route.diagnosis.problem == "false_positive_pattern"
    assert ARTEFACT in route.diagnosis.shared_channels
    assert route.diagnosis.confirmed_false_positives == 6
    assert route.intervention == "channel_edit"
    assert route.chosen.change["channels"] == [ARTEFACT]
    effect = route.chosen.effect
    # the held-out TP loss is reported (count, rate, CI) on the verification part, and the pattern goes away there
    assert effect["true_positives"] >= 10 and effect["true_positives_lost"] == 0
    assert effect["after"] == 0.0 and effect["ci"] is not None
    assert effect["held_out_check"]["images"] == len(case["features"]) - case["decision"].split["selection_images"]
    assert effect["pattern_examples"] > 0 and effect["pattern_corrected"] == effect["pattern_examples"]
    assert effect["pattern_delta_p"] < -0.5
    # the cheaper option (a threshold above the confirmed false positives) was tried and rejected for its TP loss
    (threshold,) = route.rejected
    assert threshold.kind == "threshold" and not threshold.accepted
    assert threshold.effect["after"] > 0.5 and "loses" in threshold.reason
    assert route.chosen.cost.parameters_changed == 1 and route.chosen.cost.findings_touched == 1


def test_too_few_positives_is_routed_to_needs_data_without_a_verdict(case: dict) -> None:
    route = case["decision"].route("Hernia")
    assert route.diagnosis.problems == ("too_few_positives",)
    assert route.intervention == "needs_data" and route.rejected == ()
    assert route.diagnosis.positives_selection + route.diagnosis.positives_verification == 6


def test_weak_ranking_goes_past_threshold_and_channel_edit_to_a_head_refit(case: dict) -> None:
    route = case["decision"].route("Effusion")
    assert route.diagnosis.problems[:2] == ("weak_ranking", "regressed_ranking")  # reference 0.95 on these images
    assert route.diagnosis.problem == "weak_ranking"
    assert route.diagnosis.auroc_ci[1] < AUROC_FLOOR
    assert [o.kind for o in route.rejected] == ["threshold", "channel_edit"]
    assert route.intervention == "head_finetune"
    effect = route.chosen.effect
    assert effect["metric"] == "AUROC" and effect["ci"][0] > 0
    assert route.chosen.cost.parameters_changed <= C + 1
    assert effect["whole_head_check"]["other_findings_checked"] >= 10


def test_clean_findings_have_nothing_to_fix(case: dict) -> None:
    for name in ("Mass", "Nodule", "Edema", "Pleural_Thickening"):
        route = case["decision"].route(name)
        assert route.diagnosis.problems == () and route.intervention == "none", name


def test_composition_touches_only_the_routed_rows_and_thresholds(case: dict) -> None:
    decision, weight, bias = case["decision"], case["weight"], case["bias"]
    composed = compose(decision, weight, bias, THRESHOLDS)
    routed = {r.finding for r in decision.chosen}
    assert routed == {"Atelectasis", "Cardiomegaly", "Effusion"}
    for row, name in enumerate(LABELS):
        if name not in ("Cardiomegaly", "Effusion"):  # the rows a channel edit or a refit owns
            assert np.array_equal(composed.weight[row], weight[row]) and composed.bias[row] == bias[row], name
        if name not in routed:
            assert composed.thresholds[name] == THRESHOLDS[name], name
    assert composed.weight[CM, ARTEFACT] == 0 and np.sum(composed.weight[CM] != weight[CM]) == 1
    assert composed.thresholds["Atelectasis"] < 0.5
    assert [s["finding"] for s in composed.steps] == ["Atelectasis", "Cardiomegaly", "Effusion"]
    data = decision.to_dict()
    assert data["routed"]["threshold"] == 1 and len(data["routes"]) == 14


def test_predictions_only_routes_thresholds_and_says_so(case: dict) -> None:
    features, weight, bias = case["features"], case["weight"], case["bias"]
    z = features.pooled @ weight.T + bias
    scores = 1 / (1 + np.exp(-z.astype(np.float64)))
    decision = decide_predictions(scores, features.labels, features.patients, n_bootstrap=200)
    assert decision.mode == "predictions" and "only thresholds" in decision.note
    assert decision.route("Atelectasis").intervention == "threshold"
    effusion = decision.route("Effusion")
    assert effusion.intervention == "needs_data"
    assert {o.kind for o in effusion.rejected} == {"threshold", "channel_edit", "head_finetune"}
    assert all(r.intervention in ("threshold", "needs_data", "none") for r in decision.routes)


def test_bad_inputs_name_the_parameter(case: dict) -> None:
    features = case["features"]
    sel, ver, split = split_features(features)
    with pytest.raises(DecisionError, match="threshold for 'Mass'"):
        decide(case["weight"], case["bias"], THRESHOLDS | {"Mass": 1.5}, sel, ver, split)
    with pytest.raises(DecisionError, match="Invalid head"):
        decide(case["weight"][:3], case["bias"], THRESHOLDS, sel, ver, split)


def test_one_confirmed_false_positive_is_not_a_recurring_pattern(case: dict) -> None:
    sel, ver, split = split_features(case["features"])
    row = slice(CM, CM + 1)  # the Cardiomegaly row alone: a one-finding head
    decision = decide(
        case["weight"][row],
        case["bias"][row],
        {"Cardiomegaly": 0.5},
        sel,
        ver,
        split,
        labels=("Cardiomegaly",),
        false_positives={"Cardiomegaly": case["feedback"].subset([0])},
        n_bootstrap=100,
    )
    route = decision.route("Cardiomegaly")
    assert route.diagnosis.confirmed_false_positives == 1 and route.diagnosis.shared_channels == ()
    assert "false_positive_pattern" not in route.diagnosis.problems
    assert any("no recurring pattern" in line for line in route.diagnosis.evidence)


def test_a_decision_composes_only_onto_the_head_it_was_made_for(case: dict) -> None:
    other = case["weight"].copy()
    other[CM, ARTEFACT] += 1.0
    with pytest.raises(DecisionError, match="channel edit does not belong to this head"):
        compose(case["decision"], other, case["bias"], THRESHOLDS)
