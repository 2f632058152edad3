"""Patient-disjoint phantom splits: which split a patient's images belong to (by a hash of the patient id: train 70%,
val 15%, test 15%), and one split rendered as prepared network inputs. Training, evaluation, features and the
datasets all split the phantom this way; :mod:`model.train` re-exports these names.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.engine import prepare
from model.types import PreprocessRecipe

__all__ = ["SPLITS", "PhantomSplit", "render_split", "split_of"]

log = logging.getLogger("model.train")  # the rendering messages keep the logger they had in model.train

Progress = Callable[[str, int, int], None]  # (stage, done, total)
SPLITS = ("train", "val", "test")


def split_of(patient_id: str) -> str:
    """'train' (70%), 'val' (15%) or 'test' (15%), fixed by the patient id alone."""
    bucket = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


@dataclass(frozen=True, kw_only=True, slots=True)
class PhantomSplit:
    """Prepared network inputs ``x`` float16 [N, C, S, S], labels uint8 [N, 14], phantom indices and patients."""

    name: str
    x: torch.Tensor
    y: np.ndarray
    indices: np.ndarray
    patients: tuple[str, ...]


def render_split(
    name: str,
    *,
    seed: int,
    count: int,
    recipe: PreprocessRecipe,
    render_size: int = 256,
    progress: Progress | None = None,
) -> PhantomSplit:
    """Render phantom images of one split until ``count`` are collected (indices whose patient falls in it)."""
    from model.phantom import generate, sample_labels

    if name not in SPLITS:
        raise ValueError(f"Invalid split {name!r} - expected one of {SPLITS}")
    xs, ys, indices, patients = [], [], [], []
    index = 0
    while len(xs) < count:
        if split_of(sample_labels(seed, index).patient_id) == name:  # cheap: no pixels rendered
            sample = generate(seed, index, size=render_size)
            xs.append(prepare(sample.image, recipe).half())
            ys.append(np.asarray(sample.labels, dtype=np.uint8))
            indices.append(index)
            patients.append(sample.patient_id)
            if progress:
                progress(f"render {name}", len(xs), count)
            if len(xs) % 1000 == 0:
                log.info("rendered %d/%d %s images", len(xs), count, name)
        index += 1
    return PhantomSplit(
        name=name, x=torch.stack(xs), y=np.stack(ys), indices=np.array(indices), patients=tuple(patients)
    )
