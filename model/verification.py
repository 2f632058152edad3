"""Honest verification: patient-disjoint selection/verification parts, patient bootstrap, percentile intervals.

An effect is *verified* only on data that did not choose it. :func:`selection_split` cuts the images into two halves
that share no patient (``model.datasets.patient_disjoint_halves``): the *selection* part fits thresholds, picks
channels or trains a head; the *verification* part reports what that did. Confidence intervals come from a bootstrap
that resamples PATIENTS (:func:`patient_bootstrap_counts`): images of one patient are correlated, so resampling them
one by one would make intervals too narrow. A finding with fewer than :data:`MIN_POSITIVES` positive images in a part
is reported but gets no verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from model.datasets import patient_disjoint_halves, split_kind

if TYPE_CHECKING:
    from model.features import FeatureSet

__all__ = [
    "MIN_POSITIVES",
    "SelectionSplit",
    "group_counts",
    "interval",
    "patient_bootstrap_counts",
    "patient_groups",
    "selection_split",
    "split_features",
]

MIN_POSITIVES: int = 10  # a finding with fewer positives than this in a part is reported but gets no verdict


def patient_groups(patients: Sequence[str | None]) -> np.ndarray:
    """object [N]: the patient id of each image, or a unique ``"\\x00image:i"`` where the patient is None (such an
    image is its own patient)."""
    return np.array([p if p is not None else f"\x00image:{i}" for i, p in enumerate(patients)], dtype=object)


def group_counts(groups: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n_bootstrap, N]: each resample draws the G distinct groups of ``groups`` [N] with replacement; an image's
    count is how often its group was drawn. Raises ValueError for a negative ``n_bootstrap``."""
    if n_bootstrap < 0:
        raise ValueError(f"Invalid n_bootstrap {n_bootstrap} - must be >= 0")
    names, codes = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    g = len(names)
    if g == 0:
        return np.zeros((n_bootstrap, 0), np.int64)
    draws = rng.integers(0, g, (n_bootstrap, g))
    counts = np.bincount((draws + np.arange(n_bootstrap)[:, None] * g).ravel(), minlength=n_bootstrap * g)
    return counts.reshape(n_bootstrap, g)[:, codes].astype(np.int64)


def patient_bootstrap_counts(patients: Sequence[str | None], n_bootstrap: int, seed: int) -> np.ndarray:
    """int64 [n_bootstrap, N]: how often each image is drawn when PATIENTS are resampled with replacement
    (an image with patient None is its own patient). Deterministic for a given ``seed``."""
    return group_counts(patient_groups(list(patients)), n_bootstrap, np.random.default_rng(seed))


def interval(samples: np.ndarray) -> tuple[float, float] | None:
    """Percentile 95% interval (2.5th, 97.5th) of the finite samples; None when fewer than 10 are finite."""
    samples = np.asarray(samples, dtype=np.float64).ravel()
    samples = samples[np.isfinite(samples)]
    if len(samples) < 10:
        return None
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


@dataclass(frozen=True, kw_only=True, slots=True)
class SelectionSplit:
    """A patient-disjoint split of N images.

    ``selection`` bool [N]: fit thresholds, pick channels, train the head here; ``verification`` bool [N]: report
    effects here (shares no patient with ``selection`` unless ``kind`` is 'image' or 'mixed', see
    ``model.datasets.split_kind``). ``positives_*``: positive images per finding in each part (label order)."""

    selection: np.ndarray
    verification: np.ndarray
    kind: str
    seed: int
    positives_selection: tuple[int, ...]
    positives_verification: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        notes = {
            "patient": "selection and verification share no patient",
            "image": "no patient ids: split by image, so one patient's images may sit in both parts",
            "mixed": "some images have no patient id: each counts as its own patient, so parts may share patients",
        }
        return {
            "kind": self.kind,
            "note": notes.get(self.kind, ""),
            "seed": self.seed,
            "selection_images": int(self.selection.sum()),
            "verification_images": int(self.verification.sum()),
            "positives_selection": list(self.positives_selection),
            "positives_verification": list(self.positives_verification),
            "min_positives": MIN_POSITIVES,
        }


def selection_split(patients: Sequence[str | None], labels: np.ndarray, *, seed: int = 0) -> SelectionSplit:
    """Patient-disjoint halves (model.datasets.patient_disjoint_halves) with per-finding positive counts.

    ``labels`` {0, 1} [N, n_labels]. Raises ValueError when ``labels`` does not have one row per patient entry, or
    the images cannot be split (fewer than 2, a single patient)."""
    patients = list(patients)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != len(patients):
        raise ValueError(f"Invalid labels {labels.shape} - expected [{len(patients)}, n_labels] for the patients")
    selection, verification = patient_disjoint_halves(patients, seed)
    return SelectionSplit(
        selection=selection,
        verification=verification,
        kind=split_kind(patients),
        seed=seed,
        positives_selection=tuple(int(v) for v in labels[selection].sum(axis=0)),
        positives_verification=tuple(int(v) for v in labels[verification].sum(axis=0)),
    )


def split_features(features: FeatureSet, *, seed: int = 0) -> tuple[FeatureSet, FeatureSet, SelectionSplit]:
    """(selection part, verification part, the split) of a FeatureSet; patient-disjoint, see :func:`selection_split`."""
    split = selection_split(features.patients, features.labels, seed=seed)
    return features.subset(split.selection), features.subset(split.verification), split
