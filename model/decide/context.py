"""The inputs of one decision, checked and scored once: the selection and verification parts (labels, probabilities,
patient bootstrap counts) and, in model mode, the head and the features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.decide.rules import DecisionError
from model.features import FeatureSet
from model.types import LABELS
from model.verification import patient_bootstrap_counts

# ------------------------------------------------------------------------------------------------ the context


@dataclass(frozen=True, kw_only=True, slots=True)
class _Part:
    """Scores of one part: ``y`` bool [N, 14] (head order), ``p`` float64 [N, n] probabilities, patient bootstrap
    ``counts`` float64 [B, N] (verification only)."""

    y: np.ndarray
    p: np.ndarray
    patients: tuple[str | None, ...]
    counts: np.ndarray


@dataclass(frozen=True, kw_only=True, slots=True)
class _Context:
    labels: tuple[str, ...]
    thresholds: dict[str, float]
    selection: _Part
    verification: _Part
    n_bootstrap: int
    seed: int
    tolerance: float
    min_positives: int
    reference_auroc: dict[str, float]
    # model mode only
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    selection_features: FeatureSet | None = None
    verification_features: FeatureSet | None = None
    false_positives: dict[str, FeatureSet] = field(default_factory=dict)


def _columns(labels: Sequence[str]) -> list[int]:
    try:
        return [LABELS.index(label) for label in labels]
    except ValueError:
        unknown = [label for label in labels if label not in LABELS]
        raise DecisionError(f"Invalid labels {unknown} - expected ChestX-ray14 findings: {', '.join(LABELS)}") from None


def _check_thresholds(thresholds: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    out = {}
    for label in labels:
        if label not in thresholds:
            raise DecisionError(f"Invalid thresholds: no threshold for {label!r} - expected one per label")
        value = float(thresholds[label])
        if not 0.0 < value < 1.0:
            raise DecisionError(f"Invalid threshold for {label!r}: {value} - must be in (0, 1)")
        out[label] = value
    return out


def _part(y: np.ndarray, p: np.ndarray, patients: Sequence[str | None], n_bootstrap: int, seed: int) -> _Part:
    counts = patient_bootstrap_counts(patients, n_bootstrap, seed).astype(np.float64)
    return _Part(y=y.astype(bool), p=p, patients=tuple(patients), counts=counts)
