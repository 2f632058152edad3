"""Surgical channel correction: the planner on constructed features (with brute-force oracles), the bit-identity
check, and end to end on a small DenseNet trained on the phantom with an injected false-positive pattern.

The end-to-end pattern: anti-scatter grid lines (bright rows every 4 px). A faulty label source marked every
training image with grid lines as Hernia, so the network learned a grid-line detector; a spurious weight from that
detector's most selective channel into the Effusion row (the "injected" pattern) then makes every image with grid
lines an Effusion false positive (tests/gridmodel.py; trained once per session). The correction must remove it on
held-out images with grid lines, lose no validation true positive, and leave the other 13 findings' logits
bit-identical through an fp16 save/load.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import load_artifact, save_artifact
from model.compress import compress
from model.correct import (
    CorrectionError,
    CorrectionRefused,
    apply_correction,
    check_held_out,
    plan_correction,
    verify_correction,
)
from model.engine import prepare
from model.features import FeatureSet, compute_features
from model.network import Architecture, DenseNet
from model.train import render_split
from model.types import LABELS, PreprocessRecipe
from tests.gridmodel import HERNIA, RECIPE, RENDER, USE, E, images
from tests.nets import one_thread


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


# ------------------------------------------------------------------------------------ constructed feature problems


def _problem(seed: int = 0, *, bias: float = -2.0, n: int = 400, channels: int = 48,
             artefact: tuple[int, ...] = (0, 5)) -> tuple[np.ndarray, np.ndarray, FeatureSet]:
    """A head and validation features: channels 1-3 carry real Effusion evidence, the rest is noise."""
    rng = np.random.default_rng(seed)
    pooled = rng.gamma(2.0, 0.15, (n, channels)).astype(np.float32)
    labels = np.zeros((n, 14), np.uint8)
    positive = rng.random(n) < 0.25
    labels[positive, E] = 1
    labels[:, HERNIA] = rng.random(n) < 0.1
    pooled[positive, 1:4] += rng.uniform(1.0, 2.0, (int(positive.sum()), 3)).astype(np.float32)
    weight = rng.normal(0, 0.1, (14, channels)).astype(np.float32)
    weight[E, 1:4] = 1.2
    weight[E, list(artefact)] = 2.0  # these channels fire only on the artefact added to the targets
    pooled[:, list(artefact)] = 0.0
    features = FeatureSet(ids=[f"v{i}" for i in range(n)], patients=[None] * n, pooled=pooled, labels=labels,
                          source="constructed")
    return weight, np.full(14, bias, np.float32), features


def _negatives(weight: np.ndarray, bias: np.ndarray, features: FeatureSet, n: int) -> list[int]:
    """The first ``n`` validation negatives that are clearly below the threshold (logit < -0.5) on their own."""
    z = features.pooled @ weight[E] + bias[E]
    return list(np.flatnonzero((features.labels[:, E] == 0) & (z < -0.5))[:n])


def _targets(features: FeatureSet, rows: list[int], artefact: dict[int, float]) -> np.ndarray:
    """Validation negatives with the artefact channels switched on."""
    t = features.pooled[rows].copy()
    for k, v in artefact.items():
        t[:, k] += v
    return t


def _oracle(weight: np.ndarray, bias: np.ndarray, features: FeatureSet, targets: np.ndarray,
            channels: tuple[int, ...]) -> tuple[bool, int]:
    """Brute force, independent of the planner: (all targets under 0.5, true positives lost) for one set."""
    def p(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(x.astype(np.float64) @ w.astype(np.float64) + bias[E])))

    edited = weight[E].copy()
    edited[list(channels)] = 0
    tp = (features.labels[:, E] == 1) & (p(features.pooled, weight[E]) >= 0.5)
    lost = int((tp & (p(features.pooled, edited) < 0.5)).sum())
    return bool((p(targets, edited) < 0.5).all()), lost


THRESHOLDS = dict.fromkeys(LABELS, 0.5)


def test_the_smallest_set_that_works_is_chosen_and_no_true_positive_is_lost() -> None:
    weight, bias, features = _problem()
    negatives = _negatives(weight, bias, features, 3)
    targets = _targets(features, negatives, {0: 1.2, 5: 1.2})  # +4.8 logits: one artefact channel is not enough
    plan = plan_correction(weight, bias, THRESHOLDS, features, targets, "Effusion")

    assert plan.channels == (0, 5)
    assert plan.original_weights == (2.0, 2.0) and plan.class_index == E
    v = plan.verification
    assert v.passed and v.true_positives > 50 and v.true_positives_lost == 0
    assert all(t.probability_before >= 0.5 > t.probability_after and t.delta < 0 for t in v.targets)
    assert v.other_findings_bit_identical and v.max_abs_logit_change_other == 0.0
    assert len(v.other_findings_checked) == 13 and "Effusion" not in v.other_findings_checked
    # minimal: no single channel of the row works (checked by brute force over all of them)
    assert not any(_oracle(weight, bias, features, targets, (k,))[0] for k in range(weight.shape[1]))
    assert _oracle(weight, bias, features, targets, plan.channels) == (True, 0)
    assert v.auroc_before is not None and v.auroc_after is not None
    assert v.false_positives_after <= v.false_positives_before


def test_larger_limits_are_searched_too() -> None:
    artefact = (0, 5, 6, 7, 8, 9)
    weight, bias, features = _problem(artefact=artefact)
    targets = _targets(features, _negatives(weight, bias, features, 2), dict.fromkeys(artefact, 0.5))  # +6 logits
    assert not any(_oracle(weight, bias, features, targets, c)[0] for c in itertools.combinations(artefact, 5))
    plan = plan_correction(weight, bias, THRESHOLDS, features, targets, "Effusion", max_channels=8)
    assert plan.channels == artefact and plan.verification.passed
    with pytest.raises(CorrectionRefused, match="needs 6 channels"):
        plan_correction(weight, bias, THRESHOLDS, features, targets, "Effusion", max_channels=5)


def test_a_channel_that_carries_true_positives_is_avoided() -> None:
    weight, bias, features = _problem(seed=1, bias=-4.0)
    negatives = _negatives(weight, bias, features, 2)
    # the false positive is pushed by the artefact (channel 0) and, even more, by real evidence (channel 2)
    targets = _targets(features, negatives, {0: 1.25, 2: 2.0})
    phi = targets * weight[E]
    assert (phi[:, 2] > phi[:, 0]).all()
    works, lost = _oracle(weight, bias, features, targets, (2,))
    assert works and lost > 0, "zeroing the evidence channel alone would fix the case but lose true positives"
    plan = plan_correction(weight, bias, THRESHOLDS, features, targets, "effusion")  # name matching is lenient
    assert plan.channels == (0,)
    assert plan.verification.true_positives_lost == 0 and plan.verification.true_positives > 0
    assert _oracle(weight, bias, features, targets, plan.channels) == (True, 0)


def test_refused_when_the_limit_is_too_small_with_the_cheapest_alternatives() -> None:
    weight, bias, features = _problem()
    negatives = _negatives(weight, bias, features, 3)
    targets = _targets(features, negatives, {0: 1.2, 5: 1.2})
    with pytest.raises(CorrectionRefused) as caught:
        plan_correction(weight, bias, THRESHOLDS, features, targets, "Effusion", max_channels=1)
    refusal = caught.value
    assert "needs 2 channels" in refusal.reason and "loses 0 true positives" in refusal.reason
    kinds = [a["kind"] for a in refusal.alternatives]
    assert kinds == ["threshold", "finetune"]
    threshold = refusal.alternatives[0]
    z = targets.astype(np.float64) @ weight[E].astype(np.float64) + bias[E]
    assert threshold["threshold"] > 1 / (1 + np.exp(-z.max())) - 1e-6  # above every target
    p = 1 / (1 + np.exp(-(features.pooled.astype(np.float64) @ weight[E].astype(np.float64) + bias[E])))
    tp = (features.labels[:, E] == 1) & (p >= 0.5)
    assert threshold["true_positives_lost"] == int((tp & (p < threshold["threshold"])).sum())
    assert refusal.to_dict()["refused"] is True and refusal.details["channels_needed"] == [0, 5]


def test_refused_when_every_fix_loses_true_positives() -> None:
    weight, bias, features = _problem(seed=2)
    tp = np.flatnonzero(features.labels[:, E] == 1)
    # "false positive" = a copy of the strongest validation true positive: whatever lowers it lowers that positive
    strongest = int(tp[np.argmax(features.pooled[tp] @ weight[E])])
    targets = features.pooled[[strongest]]
    with pytest.raises(CorrectionRefused) as caught:
        plan_correction(weight, bias, THRESHOLDS, features, targets, "Effusion", max_channels=3)
    assert "true positive" in caught.value.reason
    for size in (1, 2, 3):  # the oracle agrees: no set of up to 3 of the helpful channels works without a loss
        for channels in itertools.combinations(range(1, 4), size):
            works, lost = _oracle(weight, bias, features, targets, channels)
            assert not works or lost > 0


def test_inputs_that_make_no_sense_are_errors() -> None:
    weight, bias, features = _problem()
    negative = features.pooled[_negatives(weight, bias, features, 1)]
    with pytest.raises(CorrectionError, match="not a false positive"):
        plan_correction(weight, bias, THRESHOLDS, features, negative, "Effusion")
    with pytest.raises(CorrectionError, match="Invalid finding"):
        plan_correction(weight, bias, THRESHOLDS, features, negative, "Fracture")
    with pytest.raises(CorrectionError, match="channels"):
        plan_correction(weight, bias, THRESHOLDS, features, negative[:, :10], "Effusion")
    with pytest.raises(CorrectionError, match="max_channels"):
        plan_correction(weight, bias, THRESHOLDS, features, negative, "Effusion", max_channels=0)


def test_verification_notices_any_change_to_another_finding() -> None:
    weight, bias, features = _problem()
    before = torch.nn.Linear(weight.shape[1], 14)
    with torch.no_grad():
        before.weight.copy_(torch.from_numpy(weight))
        before.bias.copy_(torch.from_numpy(bias))
    after = copy.deepcopy(before)
    with torch.no_grad():  # the smallest possible change to another finding's row: one ulp of one weight
        w = after.weight[HERNIA, 7]
        after.weight[HERNIA, 7] = torch.nextafter(w, w + 1)
    targets = features.pooled[:2]
    v = verify_correction(before, after, finding="Effusion", thresholds=THRESHOLDS, features=features,
                          target_features=targets)
    assert not v.other_findings_bit_identical and not v.passed and v.max_abs_logit_change_other > 0
    same = verify_correction(before, copy.deepcopy(before), finding="Effusion", thresholds=THRESHOLDS,
                             features=features, target_features=targets)
    assert same.other_findings_bit_identical and same.true_positives_lost == 0


def test_apply_changes_only_the_planned_weights_of_a_real_network() -> None:
    torch.manual_seed(0)
    model = DenseNet(Architecture.tiny()).eval()
    x = torch.randn(6, 3, 64, 64)
    pooled = compute_features(model, [(str(i), None, x[i], np.zeros(14)) for i in range(6)], recipe=PreprocessRecipe(
        input_size=64, resize=None)).pooled
    head = model.classifier
    k = int(np.argmax(pooled[0]))
    with torch.no_grad():  # make image 0 a confident Effusion case through its strongest channel k
        head.weight[E, k] = 10.0 / float(pooled[0, k])
        head.bias[E] = -3.0
    weight, bias = head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()
    labels = np.zeros((6, 14), np.uint8)
    features = FeatureSet(ids=[str(i) for i in range(1, 6)], patients=[None] * 5, pooled=pooled[1:],
                          labels=labels[1:])
    plan = plan_correction(weight, bias, THRESHOLDS, features, pooled[:1], "Effusion")
    edited = apply_correction(model, plan)
    before, after = model.state_dict(), edited.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight"}
    diff = before["classifier.weight"] != after["classifier.weight"]
    assert diff.sum() == len(plan.channels) and diff[E, list(plan.channels)].all()
    assert k in plan.channels and model.classifier.weight[E, k] != 0, "the original model is not modified"
    with torch.inference_mode():
        a, b = model(x), edited(x)
    assert torch.equal(a[:, [j for j in range(14) if j != E]], b[:, [j for j in range(14) if j != E]])
    assert torch.sigmoid(b[0, E]) < 0.5 <= torch.sigmoid(a[0, E])
    with pytest.raises(CorrectionError, match="does not belong"):
        apply_correction(edited, plan)  # those weights are 0 now: the plan was made for the other model


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def compressed_grid_parent(grid_model: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The injected model compressed by chexd compress (calibrated on images with and without grid lines)."""
    parent, _ = load_artifact(grid_model[0])
    shown = itertools.chain(images("train", 150, skip=600, marked=False), images("train", 50, skip=750, marked=True))
    calibration = torch.stack([prepare(image, RECIPE) for _, _, image, _ in shown])
    with one_thread():
        model, report = compress(parent, calibration, target_params=0.7, target_macs=None, rows=4096)
    assert report.parameters_after < 0.7 * report.parameters_before and model.architecture.pool_first
    return save_artifact(model, tmp_path_factory.mktemp("grid-compressed") / "parent", name="grid-compressed",
                         preprocessing=RECIPE, intended_use=USE, synthetic=True, dtype="float16")


def test_correction_removes_an_injected_false_positive_pattern_end_to_end(
    grid_model: tuple[Path, int], tmp_path: Path
) -> None:
    _correct_end_to_end(*grid_model, tmp_path)


def test_correction_works_the_same_on_a_compressed_network(compressed_grid_parent: Path, tmp_path: Path) -> None:
    _correct_end_to_end(compressed_grid_parent, None, tmp_path)  # compression remapped the channels


def _correct_end_to_end(parent_path: Path, injected_channel: int | None, tmp_path: Path) -> None:
    parent, manifest = load_artifact(parent_path)  # as deployed: fp16 weights
    data = render_split("val", seed=0, count=200, recipe=RECIPE, render_size=RENDER)
    val = compute_features(parent, zip(map(str, data.indices), data.patients, data.x, data.y, strict=True),
                           recipe=RECIPE)
    reported = compute_features(parent, images("train", 30, skip=560, marked=True), recipe=RECIPE)
    test_marked = compute_features(parent, images("test", 80, marked=True), recipe=RECIPE)
    test_clean = compute_features(parent, images("test", 80, marked=False), recipe=RECIPE)

    def p_effusion(model: DenseNet, fs: FeatureSet) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(model.classifier(torch.from_numpy(fs.pooled))[:, E]).numpy()

    negative = test_marked.labels[:, E] == 0
    before_marked = (p_effusion(parent, test_marked)[negative] >= 0.5).mean()
    before_clean = (p_effusion(parent, test_clean)[negative] >= 0.5).mean()
    assert before_marked >= 0.8 and before_clean <= 0.1, "the injected pattern makes grid lines false positives"

    fp = np.flatnonzero((reported.labels[:, E] == 0) & (p_effusion(parent, reported) >= 0.5))[:2]
    assert len(fp) == 2
    head = parent.classifier
    plan = plan_correction(head.weight.detach().numpy(), head.bias.detach().numpy(), manifest.thresholds, val,
                           reported.pooled[fp], "Effusion", target_ids=[reported.ids[i] for i in fp])
    assert (injected_channel is None or injected_channel in plan.channels) and len(plan.channels) <= 5
    assert plan.verification.passed and plan.verification.true_positives > 0
    assert plan.verification.true_positives_lost == 0

    child_path = save_artifact(apply_correction(parent, plan), tmp_path / "child", name="grid-child",
                               preprocessing=RECIPE, intended_use=USE, synthetic=True, dtype="float16")
    child, _ = load_artifact(child_path)
    # held-out test images with grid lines: the pattern is gone (no more false positives than without grid lines)
    after_marked = (p_effusion(child, test_marked)[negative] >= 0.5).mean()
    assert after_marked <= before_clean + 0.02

    # full forward passes of both saved networks on the validation images: other findings bit-identical, no TP lost
    # (both freshly loaded, so both run in the same memory format: compute_features moved `parent` to channels_last)
    parent, _ = load_artifact(parent_path)
    x = data.x.float()
    with torch.inference_mode():
        z_parent = torch.cat([parent(x[i : i + 50]) for i in range(0, len(x), 50)])
        z_child = torch.cat([child(x[i : i + 50]) for i in range(0, len(x), 50)])
    others = [j for j in range(14) if j != E]
    assert torch.equal(z_parent[:, others], z_child[:, others])
    assert not torch.equal(z_parent[:, E], z_child[:, E])
    positive = torch.from_numpy(val.labels[:, E] == 1)
    tp = positive & (torch.sigmoid(z_parent[:, E]) >= 0.5)
    assert int(tp.sum()) > 0 and bool((torch.sigmoid(z_child[tp, E]) >= 0.5).all())


# ------------------------------------------------------------------------------------------------ held-out check


def _held_out(seed: int = 5, n: int = 600) -> tuple[np.ndarray, np.ndarray, FeatureSet]:
    weight, bias, features = _problem(seed=seed, n=n, bias=-4.5)
    patients = tuple(f"P{i // 3}" for i in range(n))  # three images per patient
    return weight, bias, FeatureSet(ids=features.ids, patients=patients, pooled=features.pooled,
                                    labels=features.labels, source="constructed held-out")


def test_held_out_check_catches_an_edit_that_zeroes_the_strongest_channel() -> None:
    weight, bias, verification = _held_out()
    positives = verification.labels[:, E] == 1
    strongest = int(np.argmax((verification.pooled[positives] * weight[E]).mean(0)))
    assert strongest in (1, 2, 3)
    edited = weight.copy()
    edited[E, strongest] = 0.0
    check = check_held_out(weight, bias, edited, bias, THRESHOLDS, verification, finding="Effusion",
                           n_bootstrap=200)
    # an independent count of what the edit loses
    p = 1 / (1 + np.exp(-(verification.pooled.astype(np.float64) @ weight[E].astype(np.float64) + bias[E])))
    q = 1 / (1 + np.exp(-(verification.pooled.astype(np.float64) @ edited[E].astype(np.float64) + bias[E])))
    tp = positives & (p >= 0.5)
    assert check.true_positives == int(tp.sum()) > 50
    assert check.true_positives_lost == int((tp & (q < 0.5)).sum()) > 0
    assert check.verdict == "tp_loss" and "do not apply" in check.reason
    assert check.tp_loss_rate == pytest.approx(check.true_positives_lost / check.true_positives)
    low, high = check.tp_loss_ci
    assert low <= check.tp_loss_rate <= high and high - low > 0
    # the evidence of channels 1-3 separates the classes alone: ranking survives the loss of one of them
    assert check.auroc_delta is not None and check.auroc_delta <= 0 and check.auroc_delta_ci is not None
    assert check.to_dict()["verdict"] == "tp_loss" and check.to_dict()["passed"] is False


def test_held_out_check_passes_an_edit_of_a_silent_channel() -> None:
    weight, bias, verification = _held_out()
    edited = weight.copy()
    edited[E, 0] = 0.0  # the artefact channel: zero on every verification image
    noisy = weight.copy()
    noisy[E, 10:] += 0.3  # a row that raises many negatives over the threshold: the pattern of a false positive
    check = check_held_out(noisy, bias, np.where(np.arange(14)[:, None] == E, weight, noisy), bias, THRESHOLDS,
                           verification, finding="Effusion", n_bootstrap=200)
    assert check.pattern_examples > 0 and check.pattern_corrected > 0
    assert check.pattern_delta_p is not None and check.pattern_delta_p < 0
    assert check.pattern_delta_p_ci is not None and check.pattern_delta_p_ci[1] < 0
    silent = check_held_out(weight, bias, edited, bias, THRESHOLDS, verification, finding="Effusion", n_bootstrap=50)
    assert silent.verdict == "passed" and silent.true_positives_lost == 0 and silent.tp_loss_rate == 0.0
    assert silent.auroc_delta == 0.0


def test_held_out_check_gives_no_verdict_with_too_few_positives() -> None:
    weight, bias, verification = _held_out()
    positives = np.flatnonzero(verification.labels[:, E] == 1)
    keep = np.concatenate([np.flatnonzero(verification.labels[:, E] == 0), positives[:4]])
    small = verification.subset(np.sort(keep))
    edited = weight.copy()
    edited[E, 1:4] = 0.0  # would lose every true positive
    check = check_held_out(weight, bias, edited, bias, THRESHOLDS, small, finding="Effusion", n_bootstrap=50)
    assert check.positives == 4 and check.min_positives == 10
    assert check.verdict == "too_few_positives" and "fewer than the minimum 10" in check.reason
    assert check_held_out(weight, bias, edited, bias, THRESHOLDS, small, finding="Effusion", min_positives=3,
                          n_bootstrap=50).verdict == "tp_loss"
    silent = weight.copy()
    silent[E, -1] = 0.0  # loses nothing, but 0 of 4 held-out true positives lost bounds nothing either
    few = check_held_out(weight, bias, silent, bias, THRESHOLDS, small, finding="Effusion", min_positives=3,
                         n_bootstrap=50)
    assert few.true_positives_lost == 0 and few.true_positives < 10
    assert check_held_out(weight, bias, silent, bias, THRESHOLDS, small, finding="Effusion", min_positives=3,
                          n_bootstrap=50).verdict == ("passed" if few.true_positives >= 3 else "too_few_positives")
    assert check_held_out(weight, bias, silent, bias, THRESHOLDS, small, finding="Effusion", min_positives=10,
                          n_bootstrap=50).verdict == "too_few_positives"
    with pytest.raises(CorrectionError, match="tolerance"):
        check_held_out(weight, bias, edited, bias, THRESHOLDS, small, finding="Effusion", tolerance=2.0)
    with pytest.raises(CorrectionError, match="Invalid head"):
        check_held_out(weight, bias, edited[:, :5], bias, THRESHOLDS, small, finding="Effusion")
