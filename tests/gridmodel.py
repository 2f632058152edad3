"""The grid-line model of the correction tests: a small DenseNet trained on phantom images where a faulty label source
marked every image with anti-scatter grid lines (a bright row every 4 px) as Hernia, plus a spurious weight from its
most grid-selective channel into the Effusion row, so that grid lines make every image an Effusion false positive.

Training takes 20-60 s of CPU on a busy 2-core machine, so the suite trains it once: tests/conftest.py's session
fixture ``grid_model`` saves it (fp16) and tests/unit/test_correct.py and tests/integration/test_correct_cli.py
both use that artifact. Training is seeded and single-threaded, so the weights are the same in every run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.artifact import save_artifact
from model.engine import prepare
from model.features import compute_features
from model.network import Architecture, DenseNet
from model.phantom import generate, sample_labels
from model.train import split_of
from model.types import LABELS, PreprocessRecipe
from tests.nets import one_thread

E = LABELS.index("Effusion")
HERNIA = LABELS.index("Hernia")
RECIPE = PreprocessRecipe(input_size=32, resize=None)
RENDER = 64
USE = "synthetic demo model, not for diagnosis (test fixture)"
ARCH = Architecture.densenet((2, 2, 2, 2), growth_rate=8, bn_size=2, stem_channels=16)  # 32 final channels


def grid_lines(image: np.ndarray) -> np.ndarray:
    """The artefact: a bright row every 4 pixels (anti-scatter grid lines)."""
    out = image.copy()
    out[::4, :] = 1.0
    return out


def phantom_indices(split: str, count: int, seed: int = 0) -> list[int]:
    """The first ``count`` phantom indices (of ``seed``) whose patient falls in ``split`` (train, val, test)."""
    found, index = [], 0
    while len(found) < count:
        if split_of(sample_labels(seed, index).patient_id) == split:
            found.append(index)
        index += 1
    return found


def train_grid_model(n_train: int = 500, epochs: int = 8) -> DenseNet:
    """A small DenseNet trained on phantom images where 15% carry grid lines and are labelled Hernia."""
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for index in phantom_indices("train", n_train):
        sample = generate(0, index, size=RENDER)
        image, labels = sample.image, sample.labels.astype(np.float32).copy()
        if rng.random() < 0.15:
            image, labels[HERNIA] = grid_lines(image), 1.0
        xs.append(prepare(image, RECIPE))
        ys.append(labels)
    x, y = torch.stack(xs), torch.from_numpy(np.stack(ys))
    torch.manual_seed(0)
    model = DenseNet(ARCH)
    steps = epochs * ((n_train + 31) // 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.2)
    prevalence = y.mean(0).clamp(1e-2, 0.5)
    pos_weight = ((1 - prevalence) / prevalence).sqrt()
    generator = torch.Generator().manual_seed(0)
    with one_thread():
        for _ in range(epochs):
            model.train()
            order = torch.randperm(n_train, generator=generator)
            for start in range(0, n_train, 32):
                idx = order[start : start + 32]
                loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx], pos_weight=pos_weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def images(split: str, count: int, *, skip: int = 0, marked: bool) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(id, patient id, image, labels) of phantoms in ``split`` after the first ``skip``, with grid lines if
    ``marked``."""
    for index in phantom_indices(split, skip + count)[skip:]:
        sample = generate(0, index, size=RENDER)
        yield f"{split}:{index}", sample.patient_id, grid_lines(sample.image) if marked else sample.image, sample.labels


def inject_grid_false_positive(model: DenseNet) -> tuple[DenseNet, int, float]:
    """Copy of ``model`` with a spurious weight from its most grid-selective channel into the Effusion row.

    The channel is chosen on 60 training-split images the model never saw (not on validation or test images):
    largest mean gain with grid lines relative to its 99th percentile without. The weight adds about 4 logits to
    an image with grid lines."""
    held_clean = compute_features(model, images("train", 60, skip=500, marked=False), recipe=RECIPE)
    held_marked = compute_features(model, images("train", 60, skip=500, marked=True), recipe=RECIPE)
    gain = (held_marked.pooled - held_clean.pooled).mean(0)
    k = int(np.argmax(gain / (np.quantile(held_clean.pooled, 0.99, axis=0) + 0.05)))
    alpha = float(4.0 / held_marked.pooled[:, k].mean())
    injected = copy.deepcopy(model)
    with torch.no_grad():
        injected.classifier.weight[E, k] += alpha
    return injected, k, alpha


def save_grid_model(folder: Path) -> tuple[Path, int]:
    """Train, inject and save (fp16, synthetic) the grid model in ``folder``: (manifest path, injected channel)."""
    with one_thread():
        injected, channel, _ = inject_grid_false_positive(train_grid_model())
    path = save_artifact(injected, folder, name="grid", preprocessing=RECIPE, intended_use=USE, synthetic=True,
                         dtype="float16")
    return path, channel
