"""Evaluation metrics, including on the real CheXNet predictions of ../shared/data/chexnet-preds."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from model.metrics import evaluate
from model.types import LABELS
from tests.conftest import SHARED_DATA


def test_perfect_and_random_scores_give_auroc_1_and_about_half() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (400, 2))
    perfect = evaluate(targets.astype(float), targets, ("a", "b"), n_bootstrap=50)
    assert perfect.mean_auroc == 1.0 and perfect.classes[0].f1 == 1.0
    noise = evaluate(rng.random((400, 2)), targets, ("a", "b"), n_bootstrap=50)
    assert 0.4 < noise.mean_auroc < 0.6
    lo, hi = noise.classes[0].auroc_ci
    assert lo < noise.classes[0].auroc < hi


def test_a_class_with_one_outcome_has_no_auroc() -> None:
    targets = np.array([[0, 1], [0, 0], [0, 1], [0, 0]] * 5)
    result = evaluate(np.random.default_rng(1).random(targets.shape), targets, ("never", "sometimes"))
    assert result.classes[0].auroc is None and result.classes[1].auroc is not None
    assert result.mean_auroc == result.classes[1].auroc


def test_bad_shapes_and_values_are_refused() -> None:
    with pytest.raises(ValueError, match="shapes"):
        evaluate(np.zeros((3, 2)), np.zeros((3, 3)), ("a", "b"))
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.full((3, 1), np.nan), np.zeros((3, 1)), ("a",))


def test_real_chexnet_predictions_reproduce_the_published_aurocs() -> None:
    preds = SHARED_DATA / "chexnet-preds"
    header, *rows = (preds / "preds.csv").read_text().splitlines()
    columns = header.split(",")
    images = [r.split(",")[columns.index("Image Index")] for r in rows]
    scores = np.array([[float(r.split(",")[columns.index(f"prob_{label}")]) for label in LABELS] for r in rows])
    with gzip.open(SHARED_DATA / "nih" / "Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        lines = fh.read().splitlines()
    findings = {line.split(",")[0]: line.split(",")[1].split("|") for line in lines[1:]}
    targets = np.array([[label in findings[image] for label in LABELS] for image in images], dtype=int)
    result = evaluate(scores, targets, LABELS, n_bootstrap=20)
    published = dict(line.split(",")[:2] for line in (preds / "aucs.csv").read_text().splitlines()[1:])
    for metrics in result.classes:
        assert metrics.auroc == pytest.approx(float(published[metrics.label]), abs=0.002), metrics.label
    assert result.mean_auroc == pytest.approx(0.838, abs=0.002)


def test_vectorised_bootstrap_auroc_equals_sklearn_on_each_resample() -> None:
    from sklearn.metrics import roc_auc_score

    from model.metrics import bootstrap_auroc

    rng = np.random.default_rng(4)
    y = (rng.random(60) < 0.3).astype(int)
    s = np.round(rng.random(60) + 0.4 * y, 1)  # rounded: many ties
    idx = [rng.integers(0, 60, 60) for _ in range(25)]
    counts = np.stack([np.bincount(i, minlength=60) for i in idx])
    fast = bootstrap_auroc(y, s, counts)
    for b, i in enumerate(idx):
        expected = roc_auc_score(y[i], s[i]) if 0 < y[i].sum() < len(i) else np.nan
        assert np.isclose(fast[b], expected, equal_nan=True), b
    assert np.isnan(bootstrap_auroc(np.zeros(5, int), np.arange(5.0), np.ones((1, 5))))[0]


def test_patient_bootstrap_widens_the_interval_when_a_patient_has_duplicated_images() -> None:
    rng = np.random.default_rng(2)
    n_patients = 150
    y = (rng.random(n_patients) < 0.4).astype(int)
    s = y * 0.6 + rng.normal(size=n_patients)
    # every patient's image appears 4 times: 600 images, but only 150 independent observations
    targets, scores = np.repeat(y, 4)[:, None], np.repeat(s, 4)[:, None]
    patients = [f"P{i // 4}" for i in range(4 * n_patients)]
    by_image = evaluate(scores, targets, ("a",), n_bootstrap=300, seed=1)
    by_patient = evaluate(scores, targets, ("a",), n_bootstrap=300, seed=1, patients=patients)
    assert by_image.resampled == "images" and by_patient.resampled == "patients"
    assert by_patient.mean_auroc == by_image.mean_auroc  # the point estimate does not depend on the bootstrap
    width = {name: r.classes[0].auroc_ci[1] - r.classes[0].auroc_ci[0] for name, r in
             (("image", by_image), ("patient", by_patient))}
    assert width["patient"] > 1.5 * width["image"], width  # ~2x in theory (sqrt of 4 copies)
    # without any patient id the bootstrap falls back to images
    unknown = evaluate(scores, targets, ("a",), n_bootstrap=20, patients=[None] * len(patients))
    assert unknown.resampled == "images"
    with pytest.raises(ValueError, match="patients"):
        evaluate(scores, targets, ("a",), patients=patients[:-1])


def test_eligible_mean_leaves_out_a_finding_with_two_positives() -> None:
    rng = np.random.default_rng(3)
    n = 500
    targets = np.zeros((n, 3), int)
    targets[:, 0] = rng.random(n) < 0.3
    targets[:, 1] = rng.random(n) < 0.2
    targets[rng.choice(n, 2, replace=False), 2] = 1  # a Hernia-like finding: 2 positives
    scores = targets * 1.0 + rng.normal(size=targets.shape)
    scores[:, 2] = rng.random(n)  # and noise for it
    result = evaluate(scores, targets, ("a", "b", "rare"), n_bootstrap=300)
    assert [c.positives for c in result.classes][2] == 2
    assert result.eligible == ("a", "b") and result.min_positives == 10
    assert result.mean_auroc_eligible == pytest.approx(np.mean([result.classes[0].auroc, result.classes[1].auroc]))
    all_ci, eligible_ci = result.mean_auroc_ci, result.mean_auroc_eligible_ci
    assert eligible_ci[1] - eligible_ci[0] < all_ci[1] - all_ci[0]  # the rare finding's swings widen the mean's CI
    data = result.to_dict()
    assert data["eligible"] == ["a", "b"] and data["findings"][2]["positives"] == 2
    none = evaluate(scores, targets, ("a", "b", "rare"), n_bootstrap=20, min_positives=10_000)
    assert none.mean_auroc_eligible is None and none.mean_auroc_eligible_ci is None and none.eligible == ()
