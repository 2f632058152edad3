"""Labels, patients and views drawn from the real NIH ChestX-ray14 label table (``model/data/nih_label_table.npz``):
prevalence, co-occurrence, view, patient image counts, sex and age, follow-up persistence and label noise.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np

from model.phantom.values import (
    _BLOCK,
    _I,
    _N,
    _S_BLOCK,
    _S_LABELS,
    _S_NOISE_LABELS,
    _S_PATIENT,
    DEFAULT_CONFIG,
    PhantomConfig,
    PhantomLabels,
    _check_seed_index,
    _rng,
)
from model.types import LABELS

# ---------------------------------------------------------------------------------------------------- NIH table


@dataclass(frozen=True, slots=True)
class _Table:
    combo_mask: np.ndarray  # uint16 [K]
    combo_bits: np.ndarray  # uint8 [K, 14]
    joint_cdf: np.ndarray  # float64 [2K] over (combo, view) pairs, view-major: [PA..., AP...]
    combo_cdf: np.ndarray  # float64 [K]
    combo_ap_fraction: np.ndarray  # float64 [K]
    prevalence: np.ndarray  # float64 [14]
    patient_counts: np.ndarray  # int64 [M + 1]
    male_fraction: float
    age_cdf: np.ndarray  # float64 [2, 101]
    persistence: float
    boxes: tuple[np.ndarray, ...]  # per label: float32 [n, 4] (cx, cy, w, h), empty for findings without boxes


@functools.cache
def _table() -> _Table:
    with resources.files("model.data").joinpath("nih_label_table.npz").open("rb") as fh:
        raw = np.load(fh, allow_pickle=False)
        data = {key: raw[key] for key in raw.files}
    if tuple(str(v) for v in data["labels"]) != LABELS:
        raise RuntimeError("model/data/nih_label_table.npz labels do not match model.types.LABELS - re-derive it")
    masks = data["combo_mask"].astype(np.int64)
    counts = data["combo_count"].astype(np.float64)
    bits = ((masks[:, None] >> np.arange(_N)) & 1).astype(np.uint8)
    total = counts.sum()
    joint = np.concatenate([counts[:, 0], counts[:, 1]]) / total
    per_combo = counts.sum(axis=1) / total
    prevalence = (bits * per_combo[:, None]).sum(axis=0)
    chance = float((per_combo**2).sum())
    persistence = max(0.0, (float(data["follow_up_same_combo"]) - chance) / (1.0 - chance))
    ages = data["age_hist"].astype(np.float64)
    boxes = []
    for i in range(_N):
        b = data["bbox"][data["bbox_label"] == i].astype(np.float64)
        boxes.append(np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2, b[:, 2], b[:, 3]], axis=1))
    return _Table(
        combo_mask=data["combo_mask"],
        combo_bits=bits,
        joint_cdf=np.cumsum(joint),
        combo_cdf=np.cumsum(per_combo),
        combo_ap_fraction=counts[:, 1] / counts.sum(axis=1),
        prevalence=prevalence,
        patient_counts=data["patient_image_counts"].astype(np.int64),
        male_fraction=float(ages[0].sum() / ages.sum()),
        age_cdf=np.cumsum(ages, axis=1) / ages.sum(axis=1, keepdims=True),
        persistence=persistence,
        boxes=tuple(boxes),
    )


def _draw(cdf: np.ndarray, u: float) -> int:
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(cdf) - 1)


@functools.lru_cache(maxsize=256)
def _block_starts(seed: int, block: int, max_images: int) -> np.ndarray:
    """First index (within the block) of each patient of a block of ``_BLOCK`` consecutive indices."""
    counts = _table().patient_counts[1 : max_images + 1].astype(np.float64)
    cdf = np.cumsum(counts)
    rng = _rng(seed, _S_BLOCK, block)
    n = np.searchsorted(cdf, rng.random(_BLOCK) * cdf[-1], side="right") + 1
    ends = np.cumsum(n)
    k = int(np.searchsorted(ends, _BLOCK))
    return np.concatenate([[0], ends[:k]]).astype(np.int64)


@dataclass(frozen=True, slots=True)
class _Patient:
    patient_id: str
    key: tuple[int, int, int]
    follow_up: int
    sex: str
    age0: int
    base_combo: int
    first_date: _dt.date


@functools.lru_cache(maxsize=4096)
def _patient_of(seed: int, index: int, max_images: int) -> _Patient:
    block, pos = divmod(index, _BLOCK)
    starts = _block_starts(seed, block, max_images)
    j = int(np.searchsorted(starts, pos, side="right")) - 1
    t = _table()
    rng = _rng(seed, _S_PATIENT, block, j)
    u = rng.random(4)
    sex = "M" if u[0] < t.male_fraction else "F"
    age0 = _draw(t.age_cdf[0 if sex == "M" else 1], u[1])
    base_combo = _draw(t.combo_cdf, u[2])
    first = _dt.date(2012, 1, 1) + _dt.timedelta(days=int(u[3] * 3650))
    follow_up = pos - int(starts[j])
    return _Patient(f"PH{seed}-{block:05d}{j:03d}", (seed, block, j), follow_up, sex, age0, base_combo, first)


def sample_labels(
    seed: int,
    index: int,
    *,
    config: PhantomConfig = DEFAULT_CONFIG,
    force: Mapping[str, bool] | None = None,
) -> PhantomLabels:
    """The labels, patient and view of ``generate(seed, index, config=config, force=force)`` without any pixels.

    ``force`` maps finding names (``model.types.LABELS``) to present (True) or absent (False) and overrides the
    drawn ``true_labels``; label noise is then applied to the forced truth with the same random draws.

    Raises:
        ValueError: a negative or non-integer seed/index, or an unknown finding name in ``force``.
    """
    _check_seed_index(seed, index)
    seed, index = int(seed), int(index)
    t = _table()
    patient = _patient_of(seed, index, config.max_images_per_patient)
    rng = _rng(seed, _S_LABELS, index)
    u_persist, u_combo, u_view = rng.random(3)
    rho = t.persistence if config.follow_up_persistence is None else config.follow_up_persistence
    if patient.follow_up == 0 or u_persist < rho:
        combo = patient.base_combo
        view = "AP" if u_view < t.combo_ap_fraction[combo] else "PA"
    else:
        k = _draw(t.joint_cdf, u_combo)
        combo, view = k % len(t.combo_mask), ("PA", "AP")[k // len(t.combo_mask)]
    truth = t.combo_bits[combo].copy()
    if force:
        for name, present in force.items():
            if name not in _I:
                raise ValueError(f"Invalid finding {name!r} in force - expected one of {list(LABELS)}")
            truth[_I[name]] = 1 if present else 0
    noise = _rng(seed, _S_NOISE_LABELS, index)
    u_drop = noise.random(_N)
    u_fp, u_fp_label = noise.random(2)
    labels = truth.copy()
    labels[(truth == 1) & (u_drop < config.drop_rate)] = 0
    if u_fp < config.false_positive_rate:
        labels[_draw(np.cumsum(t.prevalence), u_fp_label)] = 1
    age = min(100, patient.age0 + patient.follow_up // 3)
    return PhantomLabels(
        labels=labels,
        true_labels=truth,
        patient_id=patient.patient_id,
        follow_up=patient.follow_up,
        view=view,
        age=age,
        sex=patient.sex,
    )
