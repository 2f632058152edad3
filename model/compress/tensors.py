"""Tensor helpers of the compressor: folded BatchNorm, sampled calibration positions, channel rounding, the plans a
refit produces per layer and reader, and access to the original network's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.network import DenseNet

_CHUNK = 64  # images per forward chunk while refitting (bounds temporary memory)


# ------------------------------------------------------------------------------------------------- tensor helpers
def _bn(norm: nn.BatchNorm2d, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, optionally for a subset of its channels."""
    assert norm.running_var is not None and norm.running_mean is not None
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias.detach() - norm.running_mean * scale
    if positions is not None:
        scale, shift = scale[positions], shift[positions]
    return scale, shift


def _bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return torch.relu(x * scale[None, :, None, None] + shift[None, :, None, None])


@dataclass(frozen=True, slots=True)
class _Sample:
    """Positions (image, row, column) where a layer's inputs and outputs are sampled for its fit, sorted by image."""

    n: Tensor
    y: Tensor
    x: Tensor

    @classmethod
    def draw(cls, images: int, height: int, width: int, rows: int, rng: np.random.Generator) -> _Sample:
        per_image = min(height * width, max(1, math.ceil(rows / images)))
        if per_image == height * width:
            flat = np.tile(np.arange(per_image), images)
        else:
            flat = np.concatenate([rng.choice(height * width, per_image, replace=False) for _ in range(images)])
        n = np.repeat(np.arange(images), per_image)
        return cls(torch.from_numpy(n), torch.from_numpy(flat // width), torch.from_numpy(flat % width))

    def rows(self, maps: Tensor) -> Tensor:
        """[R, C] values of ``maps`` [N, C, H, W] at the sampled positions."""
        return maps[self.n, :, self.y, self.x]

    def patches(self, maps: Tensor) -> Tensor:
        """[R, C*9] 3x3 neighbourhoods (zero padded), ordered as a conv weight's ``[C, 3, 3]`` flattening."""
        padded = F.pad(maps, (1, 1, 1, 1))
        parts = [padded[self.n, :, self.y + dy, self.x + dx] for dy in range(3) for dx in range(3)]
        return torch.stack(parts, 2).reshape(len(self.n), -1)


def _round_channels(keep: int, total: int, multiple: int) -> int:
    """``keep`` rounded to the nearest multiple of ``multiple`` (CPU and GPU conv kernels work in blocks of channels),
    for convs with at least 8 such blocks; never below ``multiple`` (or 1) nor above ``total``."""
    keep = max(1, min(keep, total))
    if multiple <= 1 or keep == total or total < 8 * multiple:
        return keep
    return min(total, max(multiple, int(round(keep / multiple)) * multiple))


def _class_scale(logits: Tensor) -> Tensor:
    """[classes] 1/std of each class's logit over the images: AUROC depends on each class's ranking, so an error
    counts relative to how widely that class's logit varies between images."""
    std = logits.float().std(0)
    return 1 / std.clamp_min(1e-3 * float(std.max()) + 1e-12)


def _positions(indices: Tensor | None, available: int) -> list[int]:
    """A consumer's input channels (indices into the concatenation it is offered)."""
    return list(range(available)) if indices is None else [int(i) for i in indices.tolist()]


# -------------------------------------------------------------------------------------------- the original network
@dataclass(slots=True)
class _LayerPlan:
    """What the refit decided for one dense layer (indices refer to the original network)."""

    inputs: list[int]  # block-concatenation channels conv1 reads
    input_pos: list[int]  # their positions in the original layer's norm1/conv1
    bottleneck: list[int]  # original bottleneck channels kept
    w1: Tensor  # [len(bottleneck), len(inputs)]
    b1: Tensor  # [len(bottleneck)] folded into norm2's running mean
    w2: Tensor  # [growth, len(bottleneck), 3, 3]
    b2: Tensor  # [growth] folded into every consumer's BN running mean


@dataclass(slots=True)
class _ReaderPlan:
    """A transition's conv or the head: the block channels it reads and its refit weights."""

    inputs: list[int]
    input_pos: list[int]
    weight: Tensor  # [out, len(inputs)]
    bias: Tensor  # [out]


def _blocks(model: DenseNet) -> list[tuple[nn.Module, nn.Module | None]]:
    feats = model.features
    n = len(model.architecture.blocks)
    return [
        (getattr(feats, f"denseblock{b + 1}"), getattr(feats, f"transition{b + 1}") if b < n - 1 else None)
        for b in range(n)
    ]


def _stem(model: DenseNet, x: Tensor) -> Tensor:
    f = model.features
    return f.pool0(f.relu0(f.norm0(f.conv0(x))))
