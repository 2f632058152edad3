"""model.verification: patient bootstrap counts, patient-disjoint selection split, percentile intervals."""

from __future__ import annotations

import numpy as np
import pytest

from model.features import FeatureSet
from model.verification import (
    MIN_POSITIVES,
    interval,
    patient_bootstrap_counts,
    selection_split,
    split_features,
)


def test_patient_bootstrap_moves_a_patients_images_together() -> None:
    patients = ["a", "a", "a", "b", None, None, "c"]
    counts = patient_bootstrap_counts(patients, 200, seed=3)
    assert counts.shape == (200, 7) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts[:, 0], counts[:, 1])
    np.testing.assert_array_equal(counts[:, 0], counts[:, 2])
    assert not np.array_equal(counts[:, 4], counts[:, 5]), "images without a patient are separate patients"
    # 5 groups (a, b, c, two None images): each resample draws 5 of them
    assert (counts[:, [0, 3, 4, 5, 6]].sum(axis=1) == 5).all()
    np.testing.assert_array_equal(counts, patient_bootstrap_counts(patients, 200, seed=3))
    assert not np.array_equal(counts, patient_bootstrap_counts(patients, 200, seed=4))


def test_patient_bootstrap_rejects_negative_count() -> None:
    with pytest.raises(ValueError, match="n_bootstrap"):
        patient_bootstrap_counts(["a"], -1, seed=0)


def test_interval_needs_ten_finite_samples() -> None:
    assert interval(np.array([1.0] * 9 + [np.nan] * 50)) is None
    low, high = interval(np.arange(101, dtype=float))
    assert low == pytest.approx(2.5) and high == pytest.approx(97.5)


def test_selection_split_is_patient_disjoint_and_counts_positives() -> None:
    rng = np.random.default_rng(0)
    n = 400
    patients = [f"P{i // 4}" for i in range(n)]
    labels = (rng.random((n, 14)) < 0.1).astype(np.uint8)
    split = selection_split(patients, labels, seed=2)
    assert split.kind == "patient" and split.seed == 2
    assert not (split.selection & split.verification).any() and (split.selection | split.verification).all()
    sel = {p for p, s in zip(patients, split.selection, strict=True) if s}
    ver = {p for p, v in zip(patients, split.verification, strict=True) if v}
    assert not sel & ver
    assert split.positives_selection == tuple(int(v) for v in labels[split.selection].sum(0))
    assert split.positives_verification == tuple(int(v) for v in labels[split.verification].sum(0))
    data = split.to_dict()
    assert data["min_positives"] == MIN_POSITIVES and data["selection_images"] + data["verification_images"] == n


def test_split_features_returns_the_two_parts() -> None:
    rng = np.random.default_rng(1)
    n = 60
    features = FeatureSet(
        ids=tuple(f"i{k}" for k in range(n)),
        patients=tuple(f"P{k // 2}" for k in range(n)),
        pooled=rng.random((n, 8)).astype(np.float32),
        labels=(rng.random((n, 14)) < 0.3).astype(np.uint8),
    )
    selection, verification, split = split_features(features, seed=0)
    assert len(selection) + len(verification) == n
    assert not set(selection.patients) & set(verification.patients)
    np.testing.assert_array_equal(verification.pooled, features.pooled[split.verification])
    with pytest.raises(ValueError, match="labels"):
        selection_split(["a", "b"], np.zeros((3, 14)))
