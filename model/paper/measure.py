"""Measurement helpers shared by the rows: a network's linear head, the head's probabilities on pooled features, and
one set of phantom images turned into features for several networks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from model.features import FeatureSet
from model.paper.claims import PaperError

# ---------------------------------------------------------------------------------------------- measurement helpers


def head_of(network: Any) -> tuple[np.ndarray, np.ndarray]:
    """(weight float32 [n, C], bias float32 [n]) of a network's linear ``classifier``. Raises PaperError without one."""
    head = getattr(network, "classifier", None)
    if head is None or getattr(head, "bias", None) is None:
        raise PaperError("the model has no linear 'classifier' head with a bias - expected a model.network.DenseNet")
    return (head.weight.detach().float().cpu().numpy().copy(), head.bias.detach().float().cpu().numpy().copy())


def head_scores(features: FeatureSet, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Probabilities float64 [N, n] of the head ``weight`` [n, C], ``bias`` [n] on pooled features (the network's own
    output up to float rounding: ``logit = W ā + b``)."""
    logits = features.pooled.astype(np.float64) @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64)
    return 1.0 / (1.0 + np.exp(-logits))


def phantom_feature_sets(
    networks: Sequence[Any],
    *,
    recipe: Any,
    split: str,
    seed: int,
    count: int,
    render_size: int = 256,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> list[FeatureSet]:
    """Render ``count`` phantom images of ``split`` once (``model.train.render_split``) and compute each network's
    pooled features on them (``model.features.compute_features``); one FeatureSet per network, same images."""
    from model.features import compute_features
    from model.train import render_split

    data = render_split(split, seed=seed, count=count, recipe=recipe, render_size=render_size, progress=progress)
    source = f"phantom {split} split (seed {seed}, {count} images, {len(set(data.patients))} patients)"
    ids = [f"phantom:{seed}:{i}" for i in data.indices]
    return [
        compute_features(
            network,
            zip(ids, data.patients, data.x, data.y, strict=True),
            recipe=recipe,
            total=count,
            device=device,
            source=source,
            progress=progress,
        )
        for network in networks
    ]
