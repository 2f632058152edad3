"""Threshold calibration: known optima, thresholds inside (0, 1), patient-disjoint halves, the real CheXNet ratios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import f1_score, precision_score, recall_score

from model.calibrate import (
    THRESHOLD_RANGE,
    ThresholdCalibrator,
    _rates,
    _weighted_counts,
    bootstrap_weights,
    calibrate,
    fit_threshold,
)
from model.datasets import patient_disjoint_halves
from model.types import LABELS

DATA = Path(__file__).parents[2].parent / "shared" / "data"


def _brute_force(y: np.ndarray, s: np.ndarray, objective: str) -> float:
    """Best value of the objective over every candidate threshold (each distinct score), by direct counting."""
    best = -1.0
    for t in np.unique(s):
        pred = s >= t
        if objective == "youden":
            value = pred[y == 1].mean() - pred[y == 0].mean()
        else:
            value = f1_score(y, pred, zero_division=0)
        best = max(best, value)
    return best


@pytest.mark.parametrize("objective", ["youden", "f1"])
def test_fitted_threshold_reaches_the_brute_force_optimum(objective: str) -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.2).astype(np.uint8)
    s = expit(rng.normal(0, 1, 400) + 1.2 * y)  # overlapping classes: the optimum is somewhere inside
    t = fit_threshold(y, s, objective)
    assert t is not None and THRESHOLD_RANGE[0] <= t <= THRESHOLD_RANGE[1]
    pred = s >= t
    achieved = pred[y == 1].mean() - pred[y == 0].mean() if objective == "youden" else f1_score(y, pred)
    assert achieved == pytest.approx(_brute_force(y, s, objective), abs=1e-12)


def test_youden_threshold_of_two_equal_gaussians_is_the_midpoint() -> None:
    # negatives N(0, 1) and positives N(2, 1) on the logit scale: J = TPR - FPR peaks where the densities cross, at 1
    rng = np.random.default_rng(0)
    n = 40_000
    y = np.repeat([0, 1], n // 2).astype(np.uint8)
    logits = rng.normal(0, 1, n) + 2.0 * y
    t = fit_threshold(y, expit(logits), "youden")
    assert t is not None and abs(np.log(t / (1 - t)) - 1.0) < 0.1


def test_separable_classes_get_the_lowest_positive_score_and_f1_one() -> None:
    y = np.array([0, 0, 0, 1, 1], np.uint8)
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    for objective in ("youden", "f1"):
        assert fit_threshold(y, s, objective) == pytest.approx(0.7)


def test_thresholds_stay_inside_the_open_interval() -> None:
    y = np.array([0, 0, 1, 1], np.uint8)
    assert fit_threshold(y, np.array([0.0, 0.0, 1.0, 1.0]), "youden") == THRESHOLD_RANGE[1]
    mostly_positive = np.array([0, 1, 1, 1], np.uint8)  # calling all of them (t = 0) gives F1 6/7, t = 1 only 1/2
    assert fit_threshold(mostly_positive, np.array([0.0, 0.0, 0.0, 1.0]), "f1") == THRESHOLD_RANGE[0]
    assert fit_threshold(np.zeros(4, np.uint8), np.array([0.1, 0.2, 0.3, 0.4]), "youden") is None
    calibrator = ThresholdCalibrator("f1").fit(np.array([[0.0], [1.0]]), np.array([[1], [1]]), fallback=[0.42])
    assert calibrator.thresholds_.tolist() == [0.42] and calibrator.fitted_.tolist() == [False]


def test_unknown_objective_and_bad_input_are_refused() -> None:
    with pytest.raises(ValueError, match="objective"):
        ThresholdCalibrator("auc")  # type: ignore[arg-type]
    scores = np.full((4, 14), 0.5)
    scores[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        calibrate(scores, np.zeros((4, 14)), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="shapes"):
        calibrate(np.zeros((4, 13)), np.zeros((4, 14)), ["a", "b", "c", "d"])


def test_halves_share_no_patient_and_cover_every_image() -> None:
    rng = np.random.default_rng(1)
    patients = [f"P{p}" for p in rng.integers(0, 150, 1000)]  # ~6-7 images per patient
    a, b = patient_disjoint_halves(patients, seed=5)
    assert (a ^ b).all(), "complementary masks"
    in_a = {p for p, m in zip(patients, a, strict=True) if m}
    in_b = {p for p, m in zip(patients, b, strict=True) if m}
    assert not in_a & in_b
    assert abs(a.sum() - 500) < 30, "about half the images each"
    other, _ = patient_disjoint_halves(patients, seed=6)
    assert (other != a).any(), "the seed chooses the split"


def test_without_patient_ids_the_split_is_by_image_and_says_so() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((200, 14)) < 0.3).astype(np.uint8)
    s = expit(rng.normal(0, 1, (200, 14)) + 2 * y)
    result = calibrate(s, y, [None] * 200, n_bootstrap=20)
    assert result.split == "image" and "no patient ids" in result.note
    assert result.n_fit + result.n_report == 200 and abs(result.n_fit - 100) <= 1
    assert result.patients_fit is None


def test_vectorised_bootstrap_counts_equal_sklearn_at_unit_weights() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random((300, 14)) < 0.2).astype(np.uint8)
    pred = (rng.random((300, 14)) < 0.3).astype(np.uint8)
    f1, recall, precision = _rates(*_weighted_counts(np.ones((1, 300)), pred, y))
    np.testing.assert_allclose(f1[0], f1_score(y, pred, average=None, zero_division=0))
    np.testing.assert_allclose(recall[0], recall_score(y, pred, average=None, zero_division=0))
    np.testing.assert_allclose(precision[0], precision_score(y, pred, average=None, zero_division=0))


def test_bootstrap_resamples_whole_patients() -> None:
    groups = np.array(["a", "a", "a", "b", "c", "c"], dtype=object)
    weights = bootstrap_weights(groups, 50, np.random.default_rng(0))
    assert weights.shape == (50, 6)
    np.testing.assert_array_equal(weights[:, 0], weights[:, 2])  # one patient's images move together
    np.testing.assert_array_equal(weights[:, 4], weights[:, 5])
    assert (weights[:, [0, 3, 4]].sum(axis=1) == 3).all(), "each resample draws as many patients as there are"


def test_calibration_on_synthetic_scores_reports_held_out_gains_with_cis() -> None:
    rng = np.random.default_rng(7)
    n = 3000
    patients = [f"P{i // 3}" for i in range(n)]
    prevalence = np.linspace(0.02, 0.2, 14)
    y = (rng.random((n, 14)) < prevalence).astype(np.uint8)
    s = expit(rng.normal(-3.5, 1, (n, 14)) + 2.5 * y)  # rare, under-confident positives: 0.5 misses most of them
    result = calibrate(s, y, patients, objective="youden", seed=1, n_bootstrap=100)
    fit, report = patient_disjoint_halves(patients, 1)
    assert result.n_fit == fit.sum() and result.n_report == report.sum()
    assert result.split == "patient" and result.patients_fit + result.patients_report == n // 3
    assert all(THRESHOLD_RANGE[0] <= t <= THRESHOLD_RANGE[1] for t in result.thresholds.values())
    assert result.recall_ratio.value > 2 and result.f1_ratio.value > 1
    low, high = result.f1_ratio.ci
    assert low <= result.f1_ratio.value <= high
    first = result.classes[0]
    pred = (s[report, 0] >= first.threshold).astype(np.uint8)
    assert first.f1.value == pytest.approx(f1_score(y[report, 0], pred))
    assert first.threshold == pytest.approx(fit_threshold(y[fit, 0], s[fit, 0], "youden"))
    data = result.to_dict()
    assert set(data["thresholds"]) == set(LABELS) and len(data["findings"]) == 14
    assert data["f1_ratio"] == result.f1_ratio.value and len(data["f1_ratio_ci"]) == 2


# Real CheXNet outputs on the ChestX-ray14 test split (22,433 images, 1,000+ patients). Expected from the issue:
# Youden F1 x~1.3 and recall x~6, F1-optimal F1 x~1.9 vs the 0.5 threshold. One split varies by ~0.1 in the F1
# ratio, so the test averages three patient-disjoint splits; tolerances: 0.15 on F1 ratios, 0.75 on the recall ratio.
EXPECTED = {"youden": {"f1_ratio": (1.3, 0.15), "recall_ratio": (6.0, 0.75)}, "f1": {"f1_ratio": (1.9, 0.15)}}


@pytest.fixture(scope="module")
def chexnet():  # type: ignore[no-untyped-def]
    from model.scores import read_scored_csv

    return read_scored_csv(DATA / "chexnet-preds" / "preds.csv", DATA / "nih" / "Data_Entry_2017_v2020.csv.gz")


@pytest.mark.parametrize("objective", ["youden", "f1"])
def test_real_chexnet_predictions_give_the_expected_ratios(chexnet, objective: str) -> None:  # type: ignore[no-untyped-def]
    results = [
        calibrate(chexnet.scores, chexnet.labels, chexnet.patients, objective=objective, seed=seed, n_bootstrap=50)
        for seed in range(3)
    ]
    for name, (expected, tolerance) in EXPECTED[objective].items():
        mean = np.mean([getattr(r, name).value for r in results])
        assert abs(mean - expected) <= tolerance, f"{objective} {name} {mean:.3f}, expected {expected} ± {tolerance}"
    for r in results:
        assert r.split == "patient" and r.f1_ratio.ci[0] > 1.0, "calibration helps on held-out patients"
        assert all(c.fitted for c in r.classes)
        assert all(THRESHOLD_RANGE[0] <= t <= THRESHOLD_RANGE[1] for t in r.thresholds.values())


def test_repeated_splits_average_the_splits_and_pool_their_bootstrap() -> None:
    rng = np.random.default_rng(11)
    n = 1500
    patients = [f"P{i // 3}" for i in range(n)]
    y = (rng.random((n, 14)) < np.linspace(0.03, 0.2, 14)).astype(np.uint8)
    s = expit(rng.normal(-3.5, 1, (n, 14)) + 2.5 * y)
    result = calibrate(s, y, patients, seed=4, n_splits=3, n_bootstrap=100)
    singles = [calibrate(s, y, patients, seed=seed, n_bootstrap=100) for seed in (4, 5, 6)]
    assert result.n_splits == 3 and [sp.seed for sp in result.splits] == [4, 5, 6]
    for split, single in zip(result.splits, singles, strict=True):  # each split is exactly the one-split calibration
        assert split.f1_ratio == pytest.approx(single.f1_ratio.value)
        assert split.thresholds == single.thresholds
    assert result.f1_ratio.value == pytest.approx(np.mean([r.f1_ratio.value for r in singles]))
    assert result.mean_recall.value == pytest.approx(np.mean([r.mean_recall.value for r in singles]))
    # pooled percentiles lie between the splits' own (a mixture's quantile is bracketed by its components')
    lows, highs = [r.f1_ratio.ci[0] for r in singles], [r.f1_ratio.ci[1] for r in singles]
    low, high = result.f1_ratio.ci
    assert min(lows) - 1e-3 <= low <= max(lows) + 1e-3 and min(highs) - 1e-3 <= high <= max(highs) + 1e-3
    # thresholds come from all the data, and the result says so
    every = ThresholdCalibrator("youden").fit(s, y).thresholds_
    assert list(result.thresholds.values()) == pytest.approx(list(every))
    assert "all 1500 images" in result.thresholds_source and "3 patient-disjoint splits" in result.note
    data = result.to_dict()
    assert data["n_splits"] == 3 and len(data["splits"]) == 3
    assert singles[0].n_splits == 1 and "fit half" in singles[0].thresholds_source
    with pytest.raises(ValueError, match="n_splits"):
        calibrate(s, y, patients, n_splits=0)
