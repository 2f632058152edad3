"""Parameter and multiply-accumulate (MAC) counts of a DenseNet :class:`~model.network.Architecture`, and measured
forward latency (:func:`time_forward`).

MACs count the multiply-accumulates of every convolution and of the linear head for one image, exactly as
torchvision's ``_ops`` figure does (2.834 G for densenet121 at 224 px with 1000 classes; 2,833,152,000 with the
14-class CheXNet head). BatchNorm, ReLU, pooling and concatenation are memory-bound and not counted; tools that add
them (ptflops) report about 2.87-2.88 GMac for the same network.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.network import Architecture

__all__ = ["Complexity", "complexity", "count_macs", "feature_size", "time_forward"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Complexity:
    """Counts for one image of ``input_size`` × ``input_size`` pixels.

    ``parameters``: trainable parameters (as ``Architecture.parameters()``); ``macs``: conv + linear
    multiply-accumulates; ``macs_by_part``: the same split into ``stem``, ``conv1`` (1x1 bottlenecks), ``conv2``
    (3x3), ``transition`` and ``classifier`` (the parts sum to ``macs``).
    """

    input_size: int
    parameters: int
    macs: int
    macs_by_part: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return {
            "input_size": self.input_size,
            "parameters": self.parameters,
            "macs": self.macs,
            "macs_by_part": dict(self.macs_by_part),
        }


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_size(input_size: int) -> None:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"Invalid input_size {input_size!r} - must be a positive number of pixels")


def feature_size(architecture: Architecture, input_size: int) -> list[int]:
    """Spatial side of each dense block's feature maps for a square input (stem: /4, each transition: /2).

    Raises ValueError when the input is too small to leave at least one pixel in the last block."""
    _check_size(input_size)
    side = _conv_out(input_size, 7, 2, 3)  # conv0
    side = _conv_out(side, 3, 2, 1)  # pool0
    sides = []
    for b in range(len(architecture.blocks)):
        if side < 1:
            break
        sides.append(side)
        if b < len(architecture.transitions):
            side //= 2  # 2x2 average pooling, stride 2
    if len(sides) < len(architecture.blocks) or sides[-1] < 1:
        raise ValueError(
            f"Invalid input_size {input_size} - too small for {len(architecture.blocks)} dense blocks "
            "(the final feature map would be empty)"
        )
    return sides


def complexity(architecture: Architecture, input_size: int) -> Complexity:
    """Parameters and MACs of ``architecture`` for one square image of ``input_size`` pixels (see module doc)."""
    arch = architecture
    sides = feature_size(arch, input_size)
    stem_side = _conv_out(input_size, 7, 2, 3)
    parts = {"stem": arch.in_channels * arch.stem_channels * 49 * stem_side * stem_side}
    conv1 = conv2 = transition = 0
    for b, block in enumerate(arch.blocks):
        area = sides[b] * sides[b]
        for i, layer in enumerate(block):
            conv1 += arch.layer_inputs(b, i) * layer.bottleneck * area
            conv2 += layer.bottleneck * layer.growth * 9 * area
        if b < len(arch.transitions):
            conv_area = (sides[b] // 2) ** 2 if arch.pool_first else area  # the conv runs after or before pooling
            transition += arch.transition_inputs(b) * arch.transitions[b].out_channels * conv_area
    parts |= {
        "conv1": conv1,
        "conv2": conv2,
        "transition": transition,
        "classifier": arch.feature_channels * arch.num_classes,
    }
    return Complexity(
        input_size=input_size, parameters=arch.parameters(), macs=sum(parts.values()), macs_by_part=parts
    )


def count_macs(architecture: Architecture, input_size: int) -> int:
    """Conv + linear multiply-accumulates for one square image (see :func:`complexity`)."""
    return complexity(architecture, input_size).macs


def time_forward(
    models: Sequence[torch.nn.Module],
    *,
    input_size: int,
    batch_size: int,
    channels: int = 3,
    repeats: int = 30,
    warmup: int = 3,
    channels_last: bool = True,
    frozen: bool = False,
) -> list[float]:
    """Median wall-clock seconds per forward pass of a ``[batch_size, channels, input_size, input_size]`` batch, one
    figure per model, measured interleaved (model A, model B, A, B ...) so that other load on the machine hits every
    model alike. CPU, float32, ``torch.inference_mode``; ``channels_last`` memory layout or NCHW; ``frozen``: each
    model traced and frozen by TorchScript first (the engine's CPU path is channels_last + frozen). ``repeats`` >= 1."""
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"Invalid repeats {repeats} or batch_size {batch_size} - must be >= 1")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, channels, input_size, input_size).contiguous(memory_format=layout)
    prepared = [m.eval().to(memory_format=layout) for m in models]
    if frozen:
        from model.engine import freeze

        with torch.inference_mode():
            prepared = [freeze(m, x) for m in prepared]
    times: list[list[float]] = [[] for _ in prepared]
    with torch.inference_mode():
        for _ in range(warmup):
            for m in prepared:
                m(x)
        for _ in range(repeats):
            for k, m in enumerate(prepared):
                start = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
