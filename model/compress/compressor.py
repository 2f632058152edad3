"""The compressor's state: the original network, its calibration images and settings, what the stages record (unit
reports, the greedy bottleneck order) and the helpers every stage uses (stem maps, block tensors, reader and BatchNorm
scales). The stages are functions of it: :mod:`~model.compress.analysis` (error curves and gains),
:mod:`~model.compress.allocation` (channels per conv), :mod:`~model.compress.refit` (selection and least-squares
refit) and :mod:`~model.compress.assembly` (the smaller network).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from model.compress.report import Progress, UnitReport
from model.compress.tensors import _CHUNK, _blocks, _stem
from model.network import DenseNet


# ---------------------------------------------------------------------------------------------------- the compressor
class _Compressor:
    """One compression run over ``model`` (eval mode) with calibration ``images`` [N, C, S, S]."""

    def __init__(
        self,
        model: DenseNet,
        images: Tensor,
        *,
        rows: int,
        seed: int,
        refit: bool,
        round_to: int,
        progress: Progress | None,
    ) -> None:
        self.model = model
        self.refit_weights = refit
        self.arch = model.architecture
        self.images = images
        self.n = len(images)
        self.rows = rows
        self.analysis_rows = max(4096, rows // 4)  # the curves only size the convs; the refit uses ``rows``
        self.round_to = round_to
        self.seed = seed
        self.progress = progress
        self.layers = [list(block.values()) for block, _ in _blocks(model)]
        self.transitions = [t for _, t in _blocks(model)]
        self.units: list[UnitReport] = []
        self.bottleneck_order: dict[tuple[int, int], np.ndarray] = {}  # (block, layer) -> greedy removal order

    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _stem_maps(self) -> Tensor:
        return torch.cat(
            [_stem(self.model, self.images[s : s + _CHUNK].float()) for s in range(0, self.n, _CHUNK)]
        )

    def _block_tensor(self, b: int, block_input: Tensor) -> Tensor:
        total = self.arch.block_output(b)
        n, c, h, w = block_input.shape
        t = torch.empty(n, total, h, w)
        t[:, :c] = block_input
        return t

    def _reader_scale(self, b: int) -> Tensor:
        """[block_output(b)] 1/std with which block ``b``'s last reader (its transition's or the final BatchNorm)
        normalises each output channel: target columns are weighted by it, so that the fits and the selection
        measure errors as the consumers see them (channels that reader skips: the mean weight)."""
        transition = self.transitions[b]
        if transition is not None:
            norm, kept = transition.norm, transition.kept_inputs
        else:
            norm, kept = self.model.features.norm5, torch.tensor(self._head_inputs())
        assert norm.running_var is not None
        inv = 1 / torch.sqrt(norm.running_var + norm.eps)
        out = torch.full((self.arch.block_output(b),), float(inv.mean()))
        out[kept if kept is not None else slice(None)] = inv
        return out

    @staticmethod
    def _norm_scale(norm: nn.BatchNorm2d, positions: list[int] | None = None) -> Tensor:
        """|gamma| / std of a BatchNorm's channels (how much an error in its input moves its output)."""
        assert norm.running_var is not None
        scale = norm.weight.detach().abs() / torch.sqrt(norm.running_var + norm.eps)
        scale = scale.clamp_min(1e-3 * float(scale.max()))
        return scale if positions is None else scale[positions]

    def _head_inputs(self) -> list[int]:
        b = len(self.arch.blocks) - 1
        head = self.arch.head_inputs
        return list(range(self.arch.block_output(b))) if head is None else list(head)
