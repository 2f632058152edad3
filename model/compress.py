"""Channel pruning with least-squares weight reconstruction for the DenseNet family (He et al. 2017 style).

A DenseNet layer reads the concatenation of every earlier feature map in its block through BN-ReLU-conv1x1 (the
bottleneck, ``conv1``), then BN-ReLU-conv3x3 (``conv2``) makes its ``growth`` new channels. :func:`compress` prunes:

- each consumer's *inputs* (``kept_inputs`` of every dense layer and transition, ``head_inputs`` of norm5 and the
  classifier): a consumer reads only the concatenated channels chosen for it; a channel that no consumer reads any
  more disappears from its producer (a dense layer's ``conv2``, a transition's or the stem's conv), and a layer whose
  output nobody reads disappears altogether;
- each layer's bottleneck width (``conv1`` outputs = ``norm2`` = ``conv2`` inputs).

Channels are chosen by backward greedy selection on calibration activations: starting from all channels, the one whose
removal increases the least-squares reconstruction error of the consumer's output the least goes first (the increase
is exact for a linear least-squares fit and computed from Gram matrices, as in Optimal Brain Surgeon). How many
channels each conv keeps is set once for the whole network: every conv's error-versus-size curve is measured on the
original model, and a single Lagrange multiplier trades relative reconstruction error against parameters (and MACs),
bisected until the network meets the parameter and MAC targets.

Then, block by block, every kept conv is refit by least squares (with an intercept) so that, fed by the *compressed*
network's own activations, it reproduces the *original* network's output on the calibration images; errors do not
accumulate from layer to layer. The intercepts re-estimate the BatchNorm running means of the consumers (a conv has no
bias; BN(z + b) is BN with its mean shifted by b). An optional short distillation on the unlabeled calibration images
follows: the network (or only its last block and head) is fine-tuned to the original's class activation maps (which
fixes the logits too); it is kept only when it brings the compressed network closer to the original on held-out
calibration images.

The result is a real, smaller :class:`~model.network.DenseNet` whose :class:`~model.network.Architecture` carries the
new channel counts; it saves and loads like any other artifact. Its transitions average-pool before their 1x1 conv
(``pool_first``, exact), so a transition's kept inputs cost a quarter of the MACs they cost in torchvision's order, and
the allocation spends the MACs saved on channels elsewhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor, nn

from model.complexity import complexity
from model.errors import ModelError
from model.network import Architecture, DenseNet, LayerSpec, TransitionSpec
from model.verification import MIN_POSITIVES, interval

__all__ = [
    "AurocDelta",
    "CompressionError",
    "CompressionReport",
    "CompressionVerdict",
    "UnitReport",
    "compress",
    "compression_verdict",
    "distill",
    "paired_auroc_delta",
    "predict_logits",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)

_RIDGE = 1e-4  # Tikhonov term relative to the mean feature energy: keeps the fits stable without biasing them
_CHUNK = 64  # images per forward chunk while refitting (bounds temporary memory)


class CompressionError(ModelError, ValueError):
    """Compression cannot run with these inputs or settings; the message names the value and the rule."""


@dataclass(frozen=True, kw_only=True, slots=True)
class UnitReport:
    """One pruned conv input set.

    ``name``: e.g. ``denseblock3.denselayer5.conv1`` (its input channels), ``...conv2`` (the bottleneck channels it
    reads), ``transition2.conv``, ``classifier``. ``kept``/``total``: channels read after/before. ``error``: squared
    reconstruction error of the conv's output on the calibration images relative to the output's variance, after the
    least-squares refit; ``error_without_refit``: the same channels with the original weights (no refit).
    """

    name: str
    kept: int
    total: int
    error: float
    error_without_refit: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kept": self.kept,
            "total": self.total,
            "error": self.error,
            "error_without_refit": self.error_without_refit,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionReport:
    """What :func:`compress` did. Counts are per image of ``input_size`` px; MACs are conv + linear
    multiply-accumulates (:mod:`model.complexity`). ``logit_rmse``/``logit_max_abs``: compressed versus original
    logits on the ``held_out_images`` calibration images that no fit saw. ``distilled``: whether the distilled weights
    were kept (``distill_steps`` > 0 and they were closer to the original on the held-out images).
    ``macs_before_pool_first``: the original's MACs with its transitions pooling before their conv, as the compressed
    network's do (an exact reorder, :class:`~model.network.Architecture`); ``macs_removed`` counts against the original
    as it was given, ``macs_removed_by_pruning`` against this figure."""

    input_size: int
    parameters_before: int
    parameters_after: int
    macs_before: int
    macs_after: int
    macs_before_pool_first: int
    target_params: float
    target_macs: float | None
    calibration_images: int
    held_out_images: int
    logit_rmse: float
    logit_max_abs: float
    logit_rmse_before_distill: float
    distill_steps: int
    distilled: bool
    seconds: float
    units: tuple[UnitReport, ...] = field(default=(), repr=False)

    @property
    def parameters_removed(self) -> float:
        """Fraction of the parameters removed (0.55 = 55% fewer)."""
        return 1 - self.parameters_after / self.parameters_before

    @property
    def macs_removed(self) -> float:
        """Fraction of the MACs removed."""
        return 1 - self.macs_after / self.macs_before

    @property
    def macs_removed_by_pruning(self) -> float:
        """Fraction of the MACs removed, counted against the original with the same transition order."""
        return 1 - self.macs_after / self.macs_before_pool_first

    def to_dict(self, *, units: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "input_size": self.input_size,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "parameters_removed": round(self.parameters_removed, 6),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_removed": round(self.macs_removed, 6),
            "macs_before_pool_first": self.macs_before_pool_first,
            "macs_removed_by_pruning": round(self.macs_removed_by_pruning, 6),
            "target_params": self.target_params,
            "target_macs": self.target_macs,
            "calibration_images": self.calibration_images,
            "held_out_images": self.held_out_images,
            "logit_rmse": self.logit_rmse,
            "logit_max_abs": self.logit_max_abs,
            "logit_rmse_before_distill": self.logit_rmse_before_distill,
            "distill_steps": self.distill_steps,
            "distilled": self.distilled,
            "seconds": round(self.seconds, 1),
        }
        if units:
            data["units"] = [u.to_dict() for u in self.units]
        return data


# ------------------------------------------------------------------------------------------- least-squares algebra
@dataclass(slots=True)
class _Stats:
    """Sufficient statistics of a linear fit ``Y ≈ [X, 1] W``: Gram ``G`` [(d+1), (d+1)], ``C = [X, 1]^T Y``
    [(d+1), m], and the target's sum of squares / column sums / row count (all float64)."""

    G: np.ndarray
    C: np.ndarray
    yy: float
    ysum: np.ndarray
    rows: int

    @classmethod
    def of(cls, x: Tensor, y: Tensor, scale: Tensor | None = None) -> _Stats:
        """Statistics of rows ``x`` [R, d] and targets ``y`` [R, m], each target column multiplied by ``scale``."""
        # float32 products (fast BLAS), accumulated by the BLAS in blocks; the algebra after this is float64
        x1 = torch.cat([x.float(), torch.ones(len(x), 1)], 1)
        y = y.float() if scale is None else y.float() * scale.float()[None, :]
        return cls(
            G=(x1.T @ x1).double().numpy(),
            C=(x1.T @ y).double().numpy(),
            yy=float(y.double().pow(2).sum()),
            ysum=y.double().sum(0).numpy(),
            rows=len(x),
        )

    @property
    def variance(self) -> float:
        """Sum over outputs of the centred sum of squares (the error of predicting each output by its mean)."""
        return max(self.yy - float((self.ysum**2).sum()) / self.rows, 1e-30)

    def features(self, candidates: np.ndarray, group: int) -> np.ndarray:
        """Feature indices of the given candidates (``group`` consecutive features each) plus the intercept."""
        cols = (np.asarray(candidates)[:, None] * group + np.arange(group)).ravel()
        return np.concatenate([cols, [self.G.shape[0] - 1]])

    def regularised(self, feats: np.ndarray) -> np.ndarray:
        g = self.G[np.ix_(feats, feats)].copy()
        n = len(feats) - 1  # the intercept (last) is not penalised
        if n:
            scale = max(float(np.mean(np.diag(g)[:n])), 1e-12)
            g[np.arange(n), np.arange(n)] += _RIDGE * scale
        return g

    def solve(self, candidates: np.ndarray, group: int) -> np.ndarray:
        """Least-squares weights [(len(candidates)*group + 1), m] (the last row is the intercept)."""
        feats = self.features(candidates, group)
        return np.linalg.solve(self.regularised(feats), self.C[feats])

    def error(self, candidates: np.ndarray, group: int, weights: np.ndarray) -> float:
        """Relative squared error (to the target's variance) of ``[X_candidates, 1] @ weights``."""
        feats = self.features(candidates, group)
        g, c = self.G[np.ix_(feats, feats)], self.C[feats]
        sse = self.yy - 2 * float((weights * c).sum()) + float((weights * (g @ weights)).sum())
        return max(sse, 0.0) / self.variance


def _eliminate(
    stats: _Stats, n_candidates: int, group: int, n_keep: int, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Backward greedy selection: repeatedly remove the candidates whose removal increases the least-squares residual
    the least. For a group of features g the increase is exactly ``tr(B_g^T [(G^-1)_gg]^-1 B_g)`` (Optimal Brain
    Surgeon); the same formula over several groups gives the exact joint increase.

    While more than ``batch`` candidates remain, the ``1/batch`` cheapest are removed together (their joint increase
    is shared in proportion to their single costs); below that, one at a time. Returns (candidates in removal order,
    the residual increase of each removal), ``n_candidates - n_keep`` long. The inverse is downdated per step and
    recomputed from scratch whenever half of the candidates has gone (speed and numerical drift)."""
    alive = np.arange(n_candidates)
    removed: list[int] = []
    costs: list[float] = []
    while len(alive) > n_keep:
        feats = stats.features(alive, group)
        g_inv = np.linalg.inv(stats.regularised(feats))
        b = g_inv @ stats.C[feats]
        pos = np.arange(len(alive) * group).reshape(len(alive), group)
        live = np.ones(len(alive), dtype=bool)
        stop = max(n_keep, len(alive) - max(1, len(alive) // 2))
        count = len(alive)
        while count > stop:
            idx = np.flatnonzero(live)
            if group == 1:
                p = pos[idx, 0]
                cost = (b[p] ** 2).sum(1) / np.maximum(np.diag(g_inv)[p], 1e-30)
            else:
                p = pos[idx]
                s = g_inv[p[:, :, None], p[:, None, :]]
                bg = b[p]
                cost = (bg * np.linalg.solve(s, bg)).sum((1, 2))
            cost = np.maximum(cost, 0.0)
            r = min(count - stop, max(1, count // batch))
            order = np.argsort(cost, kind="stable")[:r]
            ks = idx[order]
            q = pos[ks].ravel()
            u = g_inv[:, q]
            s_inv = np.linalg.inv(g_inv[np.ix_(q, q)])
            bq = b[q]
            joint = max(float((bq * (s_inv @ bq)).sum()), 0.0) if r > 1 else float(cost[order[0]])
            b -= u @ (s_inv @ bq)
            g_inv -= u @ s_inv @ u.T
            single = cost[order]
            shares = single / single.sum() if single.sum() > 0 else np.full(r, 1 / r)
            live[ks] = False
            count -= r
            removed.extend(int(a) for a in alive[ks])
            costs.extend(float(joint * w) for w in shares)
        alive = alive[live]
    return np.array(removed, dtype=np.int64), np.array(costs)


def _select(stats: _Stats, n_candidates: int, group: int, n_keep: int) -> np.ndarray:
    """Candidates kept (sorted) after greedy elimination down to ``n_keep``."""
    removed, _ = _eliminate(stats, n_candidates, group, n_keep)
    keep = np.setdiff1d(np.arange(n_candidates), removed)
    return keep


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


# ---------------------------------------------------------------------------------------------------- the compressor
class _Compressor:
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

    # ----------------------------------------------------------------------------------------- phase A: curves
    def gains(self, images: int = 16, draws: int = 2, rho: float = 1e-3) -> dict[tuple[Any, ...], float]:
        """How strongly a relative error at each unit's output reaches the logits, measured on the original model.

        For every unit, a perturbation shaped like that unit's own output (a random mixing of its centred channels,
        weighted as its fit weights them) with relative energy ``rho`` is added on ``images`` calibration images;
        the gain is the resulting relative error of the class-normalised logits divided by ``rho``, averaged over
        ``draws`` mixings and image sets. The allocation
        weighs each unit's reconstruction error by it, so an error early in the network, which every later layer
        sees, costs more than the same relative error just before the head."""
        model = self.model
        generator = torch.Generator().manual_seed(self.seed)
        sets = [self.images[k * images : (k + 1) * images].float() for k in range(draws)]
        sets = [x for x in sets if len(x) >= 2] or [self.images.float()]
        references = [model(x) for x in sets]
        cls_scale = _class_scale(torch.cat(references))

        def perturb(out: Tensor, weight: Tensor) -> Tensor:
            dims = (0, 2, 3) if out.ndim == 4 else (0,)
            centred = out - out.mean(dims, keepdim=True)
            channels = out.shape[1]
            mix = torch.randn(channels, channels, generator=generator) / math.sqrt(channels)
            delta = torch.einsum("nc...,dc->nd...", centred, mix)
            shape = (1, -1, 1, 1) if out.ndim == 4 else (1, -1)
            w = weight.reshape(shape)
            energy = float((centred * w).pow(2).sum())
            size = float((delta * w).pow(2).sum())
            return out + delta * math.sqrt(rho * energy / max(size, 1e-30))

        def measure(module: nn.Module, weight: Tensor) -> float:
            handle = module.register_forward_hook(lambda _m, _i, out: perturb(out, weight))
            try:
                values = []
                for x, reference in zip(sets, references, strict=True):
                    spread = float(((reference - reference.mean(0)) * cls_scale).pow(2).mean())
                    error = float(((model(x) - reference) * cls_scale).pow(2).mean())
                    values.append(error / max(spread, 1e-30) / rho)
            finally:
                handle.remove()
            return float(np.mean(values))

        gains: dict[tuple[Any, ...], float] = {}
        for b, layers in enumerate(self.layers):
            out_scale = self._reader_scale(b)
            for i, layer in enumerate(layers):
                avail = self.arch.layer_available(b, i)
                gains[("conv1", b, i)] = measure(layer.conv1, self._norm_scale(layer.norm2))
                growth = layer.conv2.out_channels
                gains[("conv2", b, i)] = measure(layer.conv2, out_scale[avail : avail + growth])
            transition = self.transitions[b]
            if transition is not None:
                out = transition.conv.out_channels
                gains[("transition", b)] = measure(transition.conv, self._reader_scale(b + 1)[:out])
        gains[("head",)] = measure(model.classifier, cls_scale)
        return gains

    def curves(self) -> dict[tuple[Any, ...], np.ndarray]:
        """Relative residual increase per removal, in removal order, for every prunable unit (original model)."""
        curves: dict[tuple[Any, ...], np.ndarray] = {}
        total = sum(len(block) for block in self.layers) + len(self.layers)
        done = 0
        x = self._stem_maps()
        for b, layers in enumerate(self.layers):
            feat = self._block_tensor(b, x)
            _, _, h, w = feat.shape
            sample = _Sample.draw(self.n, h, w, self.analysis_rows, self._rng(0, b))
            out_scale = self._reader_scale(b)
            for i, layer in enumerate(layers):
                avail = self.arch.layer_available(b, i)
                pos = _positions(layer.kept_inputs, avail)
                a = F.relu(layer.norm1(feat[:, pos]))  # [N, n_in, H, W] post BN-ReLU inputs of conv1
                rows_a = sample.rows(a)
                y1 = layer.conv1(a)
                del a
                stats = _Stats.of(rows_a, sample.rows(y1), self._norm_scale(layer.norm2))
                _, costs = _eliminate(stats, len(pos), 1, 1)
                curves[("conv1", b, i)] = costs / stats.variance
                z = F.relu(layer.norm2(y1))
                del y1
                y2 = layer.conv2(z)
                stats = _Stats.of(sample.patches(z), sample.rows(y2), out_scale[avail : avail + y2.shape[1]])
                removed, costs = _eliminate(stats, z.shape[1], 9, 1)
                curves[("conv2", b, i)] = costs / stats.variance
                self.bottleneck_order[(b, i)] = removed
                feat[:, avail : avail + y2.shape[1]] = y2
                del z, y2
                done += 1
                self._report("compress: analyse", done, total)
            transition = self.transitions[b]
            if transition is not None:
                pos = _positions(transition.kept_inputs, feat.shape[1])
                a = F.avg_pool2d(F.relu(transition.norm(feat[:, pos])), 2)
                y = transition.conv(a)
                tsample = _Sample.draw(self.n, a.shape[2], a.shape[3], self.analysis_rows, self._rng(1, b))
                stats = _Stats.of(tsample.rows(a), tsample.rows(y), self._reader_scale(b + 1)[: y.shape[1]])
                _, costs = _eliminate(stats, len(pos), 1, 1)
                curves[("transition", b)] = costs / stats.variance
                x = y
            else:
                pos = self._head_inputs()
                a = F.relu(self.model.features.norm5(feat[:, pos]))
                y = torch.einsum("nchw,kc->nkhw", a, self.model.classifier.weight)
                stats = _Stats.of(sample.rows(a), sample.rows(y), _class_scale(y.mean((2, 3))))
                _, costs = _eliminate(stats, len(pos), 1, 1)
                curves[("head",)] = costs / stats.variance
            del feat
            done += 1
            self._report("compress: analyse", done, total)
        return curves

    # ----------------------------------------------------------------------------------------- phase B: sizes
    def _architecture(self, keep: dict[tuple[Any, ...], int]) -> Architecture:
        """The architecture implied by per-unit keep counts (channel identities do not matter for counting)."""
        arch = self.arch
        blocks = []
        for b, block in enumerate(arch.blocks):
            layers = []
            for i, spec in enumerate(block):
                n_in = keep[("conv1", b, i)]
                layers.append(
                    LayerSpec(
                        bottleneck=keep[("conv2", b, i)],
                        growth=spec.growth,
                        kept_inputs=tuple(range(n_in)) if n_in < arch.layer_available(b, i) else None,
                    )
                )
            blocks.append(tuple(layers))
        transitions = []
        for b, t in enumerate(arch.transitions):
            n_in = keep[("transition", b)]
            kept = tuple(range(n_in)) if n_in < arch.block_output(b) else None
            transitions.append(TransitionSpec(out_channels=t.out_channels, kept_inputs=kept))
        n_head = keep[("head",)]
        last = arch.block_output(len(arch.blocks) - 1)
        return Architecture(
            in_channels=arch.in_channels,
            stem_channels=arch.stem_channels,
            blocks=tuple(blocks),
            transitions=tuple(transitions),
            head_inputs=tuple(range(n_head)) if n_head < last else None,
            num_classes=arch.num_classes,
            pool_first=True,
        )

    def allocate(
        self,
        curves: dict[tuple[Any, ...], np.ndarray],
        *,
        target_params: float,
        target_macs: float | None,
        input_size: int,
        gains: dict[tuple[Any, ...], float] | None = None,
    ) -> dict[tuple[Any, ...], int]:
        """Keep counts per unit meeting both targets with the least total relative error (see module doc)."""
        arch = self.arch
        base = complexity(arch, input_size)
        from model.complexity import feature_size

        sides = feature_size(arch, input_size)
        totals = {u: len(c) + 1 for u, c in curves.items()}
        weights = gains or {}
        cumulative = {u: weights.get(u, 1.0) * np.concatenate([[0.0], np.cumsum(c)]) for u, c in curves.items()}

        def keep_for(lam: float, mu: float) -> dict[tuple[Any, ...], int]:
            keep = dict(totals)
            for _ in range(3):  # conv1 and bottleneck costs depend on each other: a few fixed-point rounds
                for u, cum in cumulative.items():
                    kind = u[0]
                    if kind == "conv1":
                        b, i = u[1], u[2]
                        width = keep[("conv2", b, i)]
                        params, macs = width + 2, width * sides[b] ** 2
                    elif kind == "conv2":
                        b, i = u[1], u[2]
                        growth = arch.blocks[b][i].growth
                        n_in = keep[("conv1", b, i)]
                        params, macs = n_in + 2 + 9 * growth, (n_in + 9 * growth) * sides[b] ** 2
                    elif kind == "transition":
                        b = u[1]
                        out = arch.transitions[b].out_channels
                        params, macs = out + 2, out * (sides[b] // 2) ** 2  # the output pools before its conv
                    else:
                        params, macs = arch.num_classes + 2, arch.num_classes
                    unit_cost = params / base.parameters + mu * macs / base.macs
                    k = np.arange(len(cum))
                    removed = int(np.argmin(cum - lam * unit_cost * k))
                    keep[u] = _round_channels(totals[u] - removed, totals[u], self.round_to)
            return keep

        limit = target_params * base.parameters
        mac_limit = None if target_macs is None else target_macs * base.macs
        Result = tuple[dict[tuple[Any, ...], int], int, int, float]

        def evaluate(keep: dict[tuple[Any, ...], int]) -> Result:
            counts = complexity(self._architecture(keep), input_size)
            error = sum(float(cum[totals[u] - keep[u]]) for u, cum in cumulative.items())
            return keep, counts.parameters, counts.macs, error

        def feasible(result: Result) -> bool:
            return result[1] <= limit and (mac_limit is None or result[2] <= mac_limit)

        def fit_lambda(mu: float) -> Result | None:
            """The least pruning (smallest lambda) meeting both targets at this MAC weight."""
            lo, hi = 1e-8, 1e8
            if not feasible(evaluate(keep_for(hi, mu))):
                return None
            for _ in range(80):
                mid = math.sqrt(lo * hi)
                if feasible(evaluate(keep_for(mid, mu))):
                    hi = mid
                else:
                    lo = mid
                if hi / lo < 1.0001:
                    break
            return evaluate(keep_for(hi, mu))

        # Two budgets, one multiplier each: lambda prices parameters, lambda * mu prices MACs. For each mu the
        # smallest feasible lambda; of those, the allocation with the least weighted error.
        mus = (0.0, *(2.0**k for k in range(-4, 15)))
        tried: list[tuple[float, Result | None]] = [(mu, fit_lambda(mu)) for mu in mus]
        found = [(r[3], mu, r) for mu, r in tried if r is not None]
        if found:
            _, mu, best = min(found, key=lambda item: item[0])
            log.info("allocation: mu %.3g: %d params, %d MACs, weighted error %.4g", mu, best[1], best[2], best[3])
            return best[0]
        smallest = evaluate(keep_for(1e8, 0.0))
        if smallest[1] > limit:
            raise CompressionError(
                f"Invalid target_params {target_params}: unreachable - pruning conv inputs and bottlenecks leaves this "
                f"network at least {smallest[1]:,} of {base.parameters:,} parameters "
                f"({smallest[1] / base.parameters:.0%})"
            )
        fewest = min(evaluate(keep_for(1e8, mu))[2] for mu, _ in tried)
        raise CompressionError(
            f"Invalid target_macs {target_macs}: not reachable together with target_params {target_params} - the "
            f"fewest MACs found were {fewest:,} of {base.macs:,} ({fewest / base.macs:.0%}); the stem conv is not "
            "pruned. Raise target_macs or lower target_params"
        )

    # ----------------------------------------------------------------------------------------- phase C: refit
    def _unit(self, name: str, kept: int, total: int, stats: _Stats, group: int, keep: np.ndarray,
              weights: np.ndarray, original: np.ndarray) -> None:
        self.units.append(
            UnitReport(
                name=name,
                kept=kept,
                total=total,
                error=stats.error(keep, group, weights),
                error_without_refit=stats.error(keep, group, original),
            )
        )

    def _fit_reader(
        self,
        name: str,
        stats: _Stats,
        pos: list[int],
        n_keep: int,
        weight: Tensor,
        bias: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Select ``n_keep`` of a 1x1 reader's inputs and refit (or keep the original weights when not refitting);
        ``stats`` has its target columns multiplied by ``scale``. Returns (kept positions, [kept + 1, out] weights
        with the intercept last, in the unscaled target units)."""
        keep = _select(stats, len(pos), 1, n_keep)
        w = weight.detach().double().numpy()
        col = np.ones(w.shape[0]) if scale is None else scale.double().numpy()
        intercept = np.zeros((1, w.shape[0])) if bias is None else bias.detach().double().numpy()[None]
        original = np.concatenate([w[:, keep].T, intercept]) * col
        fit = stats.solve(keep, 1) if self.refit_weights else original
        self._unit(name, len(keep), len(pos), stats, 1, keep, fit, original)
        return keep, fit / col

    def refit(self, keep: dict[tuple[Any, ...], int]) -> tuple[list[list[_LayerPlan]], list[_ReaderPlan], list[Tensor]]:
        """Sequential selection and refit; returns per-block layer plans, the readers (transitions then the head) and
        per-block biases of the block-input channels (zeros for the stem)."""
        arch = self.arch
        total = sum(len(block) for block in self.layers) + len(self.layers)
        done = 0
        stem = self._stem_maps()
        block_in = (stem, stem)  # the original's and the compressed network's input to the next block
        input_bias = [torch.zeros(stem.shape[1])]
        del stem
        plans: list[list[_LayerPlan]] = []
        readers: list[_ReaderPlan] = []
        for b, layers in enumerate(self.layers):
            orig = self._block_tensor(b, block_in[0])
            comp = self._block_tensor(b, block_in[1])
            _, _, h, w = orig.shape
            sample = _Sample.draw(self.n, h, w, self.rows, self._rng(2, b))
            out_scale = self._reader_scale(b)
            block_plans = []
            for i, layer in enumerate(layers):
                name = f"denseblock{b + 1}.denselayer{i + 1}"
                avail = arch.layer_available(b, i)
                pos = _positions(layer.kept_inputs, avail)
                scale1, shift1 = _bn(layer.norm1)
                w1 = layer.conv1.weight.detach()[:, :, 0, 0]
                # original activations (targets) at this layer
                a_o = _bn_relu(orig[:, pos], scale1, shift1)
                y1_o = F.conv2d(a_o, layer.conv1.weight)
                del a_o
                y2_o = layer.conv2(F.relu(layer.norm2(y1_o)))
                # bottleneck channels: the greedy order on the original conv2 inputs (the conv1 refit targets those)
                n_drop = w1.shape[0] - keep[("conv2", b, i)]
                bottleneck = sorted(set(range(w1.shape[0])) - set(self.bottleneck_order[(b, i)][:n_drop].tolist()))
                # conv1: choose inputs and refit from the compressed network's activations to the original outputs
                a_c = _bn_relu(comp[:, pos], scale1, shift1)
                scale1 = self._norm_scale(layer.norm2, bottleneck)
                stats1 = _Stats.of(sample.rows(a_c), sample.rows(y1_o)[:, bottleneck], scale1)
                del y1_o
                kept_in, fit1 = self._fit_reader(
                    f"{name}.conv1",
                    stats1,
                    pos,
                    keep[("conv1", b, i)],
                    layer.conv1.weight[bottleneck, :, 0, 0],
                    scale=scale1,
                )
                w1_new = torch.from_numpy(fit1[:-1].T.copy()).float()
                b1_new = torch.from_numpy(fit1[-1].copy()).float()
                y1_c = F.conv2d(a_c[:, kept_in], w1_new[:, :, None, None]) + b1_new[None, :, None, None]
                del a_c
                scale2, shift2 = _bn(layer.norm2, torch.tensor(bottleneck))
                z_c = _bn_relu(y1_c, scale2, shift2)
                del y1_c
                # conv2: refit on the compressed bottleneck to the original new channels
                scale2 = out_scale[avail : avail + y2_o.shape[1]]
                stats2 = _Stats.of(sample.patches(z_c), sample.rows(y2_o), scale2)
                all_b = np.arange(len(bottleneck))
                w2_orig = layer.conv2.weight.detach()[:, bottleneck].double().reshape(y2_o.shape[1], -1).numpy()
                col2 = scale2.double().numpy()
                original2 = np.concatenate([w2_orig.T, np.zeros((1, y2_o.shape[1]))]) * col2
                fit2 = stats2.solve(all_b, 9) if self.refit_weights else original2
                self._unit(f"{name}.conv2", len(bottleneck), w1.shape[0], stats2, 9, all_b, fit2, original2)
                fit2 = fit2 / col2
                growth = y2_o.shape[1]
                w2_new = torch.from_numpy(fit2[:-1].T.copy()).float().reshape(growth, len(bottleneck), 3, 3)
                b2_new = torch.from_numpy(fit2[-1].copy()).float()
                comp[:, avail : avail + growth] = F.conv2d(z_c, w2_new, padding=1) + b2_new[None, :, None, None]
                orig[:, avail : avail + growth] = y2_o
                del z_c, y2_o
                block_plans.append(
                    _LayerPlan(
                        inputs=[pos[k] for k in kept_in],
                        input_pos=kept_in.tolist(),
                        bottleneck=bottleneck,
                        w1=w1_new,
                        b1=b1_new,
                        w2=w2_new,
                        b2=b2_new,
                    )
                )
                done += 1
                self._report("compress: refit", done, total)
            plans.append(block_plans)
            transition = self.transitions[b]
            if transition is not None:
                pos = _positions(transition.kept_inputs, orig.shape[1])
                scale, shift = _bn(transition.norm)
                a_o = F.avg_pool2d(_bn_relu(orig[:, pos], scale, shift), 2)
                orig_x = transition.conv(a_o)
                del a_o, orig
                a_c = F.avg_pool2d(_bn_relu(comp[:, pos], scale, shift), 2)
                del comp
                tsample = _Sample.draw(self.n, a_c.shape[2], a_c.shape[3], self.rows, self._rng(3, b))
                scale_t = self._reader_scale(b + 1)[: orig_x.shape[1]]
                stats = _Stats.of(tsample.rows(a_c), tsample.rows(orig_x), scale_t)
                kept, fit = self._fit_reader(
                    f"transition{b + 1}.conv",
                    stats,
                    pos,
                    keep[("transition", b)],
                    transition.conv.weight[:, :, 0, 0],
                    scale=scale_t,
                )
                weight = torch.from_numpy(fit[:-1].T.copy()).float()
                bias = torch.from_numpy(fit[-1].copy()).float()
                block_in = (orig_x, F.conv2d(a_c[:, kept], weight[:, :, None, None]) + bias[None, :, None, None])
                del a_c, orig_x
                readers.append(
                    _ReaderPlan(inputs=[pos[k] for k in kept], input_pos=kept.tolist(), weight=weight, bias=bias)
                )
                input_bias.append(bias)
            else:
                pos = self._head_inputs()
                scale, shift = _bn(self.model.features.norm5)
                cls_w = self.model.classifier.weight.detach()
                cls_b = self.model.classifier.bias.detach()
                a_o = _bn_relu(orig[:, pos], scale, shift)
                y = sample.rows(a_o) @ cls_w.T + cls_b
                scale_h = _class_scale(a_o.mean((2, 3)) @ cls_w.T)
                del a_o, orig
                a_c = _bn_relu(comp[:, pos], scale, shift)
                stats = _Stats.of(sample.rows(a_c), y, scale_h)
                del a_c, comp
                kept, fit = self._fit_reader("classifier", stats, pos, keep[("head",)], cls_w, cls_b, scale_h)
                readers.append(
                    _ReaderPlan(
                        inputs=[pos[k] for k in kept],
                        input_pos=kept.tolist(),
                        weight=torch.from_numpy(fit[:-1].T.copy()).float(),
                        bias=torch.from_numpy(fit[-1].copy()).float(),
                    )
                )
            done += 1
            self._report("compress: refit", done, total)
        return plans, readers, input_bias

    # ----------------------------------------------------------------------------------------- assembly
    def _live(self, b: int, plans: list[_LayerPlan], read: set[int]) -> tuple[set[int], list[bool]]:
        """Channels of block ``b`` still read (starting from ``read``, the block reader's inputs) and which layers
        still have a reader, walking the layers backwards (a layer is read only by later ones)."""
        alive = set(read)
        live = [False] * len(plans)
        for i in reversed(range(len(plans))):
            start = self.arch.layer_available(b, i)
            if set(range(start, start + self.arch.blocks[b][i].growth)) & alive:
                live[i] = True
                alive |= set(plans[i].inputs)
        return alive, live

    def assemble(
        self, plans: list[list[_LayerPlan]], readers: list[_ReaderPlan], input_bias: list[Tensor]
    ) -> DenseNet:
        """Build the smaller DenseNet: drop channels nobody reads (and layers whose output nobody reads), renumber
        the kept inputs, fold every intercept into the consumers' BatchNorm running means."""
        arch = self.arch
        n_blocks = len(arch.blocks)
        # per block: which original block channels stay, which layers stay
        alive_sets: list[set[int]] = []
        live_layers: list[list[bool]] = []
        for b in range(n_blocks):
            last = len(plans[b]) - 1
            alive, live = self._live(b, plans[b], set(readers[b].inputs))
            if not any(live):  # nobody reads the block's layers: keep the last one (one channel), a block needs one
                alive, live = self._live(b, plans[b], set(readers[b].inputs) | {arch.layer_available(b, last)})
            alive_sets.append(alive)
            live_layers.append(live)

        state: dict[str, Tensor] = {}
        orig_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        blocks_spec = []
        transitions_spec = []
        head_inputs: tuple[int, ...] | None = None
        prefix_in = "features.conv0"
        for b in range(n_blocks):
            alive = alive_sets[b]
            c0 = arch.layer_available(b, 0)
            kept_in = [c for c in range(c0) if c in alive]
            # producer of the block input: the stem or the previous transition
            if b == 0:
                idx = torch.tensor(kept_in)
                state[f"{prefix_in}.weight"] = orig_state["features.conv0.weight"][idx]
                for key in ("weight", "bias", "running_mean", "running_var"):
                    state[f"features.norm0.{key}"] = orig_state[f"features.norm0.{key}"][idx]
                state["features.norm0.num_batches_tracked"] = orig_state["features.norm0.num_batches_tracked"]
                stem_channels = len(kept_in)
            else:
                reader = readers[b - 1]
                state[f"features.transition{b}.conv.weight"] = reader.weight[kept_in][:, :, None, None]
                transitions_spec[b - 1] = TransitionSpec(
                    out_channels=len(kept_in), kept_inputs=transitions_spec[b - 1].kept_inputs
                )
            bias = torch.zeros(arch.block_output(b))
            bias[:c0] = input_bias[b]
            new_index = {c: k for k, c in enumerate(kept_in)}
            next_index = len(kept_in)
            layer_specs = []
            new_i = 0
            for i, plan in enumerate(plans[b]):
                start = arch.layer_available(b, i)
                growth = arch.blocks[b][i].growth
                bias[start : start + growth] = plan.b2
                if not live_layers[b][i]:
                    continue
                outputs = [c for c in range(start, start + growth) if c in alive]
                if not outputs:  # the only layer left in a dead block: keep one channel
                    outputs = [start]
                available = next_index
                inputs = [new_index[c] for c in plan.inputs]
                key = f"features.denseblock{b + 1}.denselayer{new_i + 1}"
                okey = f"features.denseblock{b + 1}.denselayer{i + 1}"
                pos = torch.tensor(plan.input_pos)
                for k in ("weight", "bias", "running_var"):
                    state[f"{key}.norm1.{k}"] = orig_state[f"{okey}.norm1.{k}"][pos]
                state[f"{key}.norm1.running_mean"] = (
                    orig_state[f"{okey}.norm1.running_mean"][pos] - bias[torch.tensor(plan.inputs)]
                )
                state[f"{key}.conv1.weight"] = plan.w1[:, :, None, None].clone()
                bpos = torch.tensor(plan.bottleneck)
                for k in ("weight", "bias", "running_var"):
                    state[f"{key}.norm2.{k}"] = orig_state[f"{okey}.norm2.{k}"][bpos]
                state[f"{key}.norm2.running_mean"] = orig_state[f"{okey}.norm2.running_mean"][bpos] - plan.b1
                for norm in ("norm1", "norm2"):
                    state[f"{key}.{norm}.num_batches_tracked"] = orig_state[f"{okey}.{norm}.num_batches_tracked"]
                state[f"{key}.conv2.weight"] = plan.w2[torch.tensor([c - start for c in outputs])].clone()
                for c in outputs:
                    new_index[c] = next_index
                    next_index += 1
                layer_specs.append(
                    LayerSpec(
                        bottleneck=len(plan.bottleneck),
                        growth=len(outputs),
                        kept_inputs=None if inputs == list(range(available)) else tuple(inputs),
                    )
                )
                new_i += 1
            blocks_spec.append(tuple(layer_specs))
            reader = readers[b]
            inputs = [new_index[c] for c in reader.inputs]
            kept = None if inputs == list(range(next_index)) else tuple(inputs)
            pos = torch.tensor(reader.input_pos)
            rbias = bias[torch.tensor(reader.inputs)]
            norm = f"features.transition{b + 1}.norm" if b < n_blocks - 1 else "features.norm5"
            for k in ("weight", "bias", "running_var", "num_batches_tracked"):
                value = orig_state[f"{norm}.{k}"]
                state[f"{norm}.{k}"] = value if k == "num_batches_tracked" else value[pos]
            state[f"{norm}.running_mean"] = orig_state[f"{norm}.running_mean"][pos] - rbias
            if b < n_blocks - 1:
                transitions_spec.append(TransitionSpec(out_channels=1, kept_inputs=kept))  # width set by next block
            else:
                head_inputs = kept
                state["classifier.weight"] = reader.weight.clone()
                state["classifier.bias"] = reader.bias.clone()
        new_arch = Architecture(
            in_channels=arch.in_channels,
            stem_channels=stem_channels,
            blocks=tuple(blocks_spec),
            transitions=tuple(transitions_spec),
            head_inputs=head_inputs,
            num_classes=arch.num_classes,
            pool_first=True,
        )
        model = DenseNet(new_arch)
        model.load_state_dict(state, strict=True)
        return model.eval()


# ------------------------------------------------------------------------------------------------- distillation
def _class_maps(features: Tensor, classifier: nn.Linear) -> Tensor:
    """Class activation maps plus bias [B, classes, h, w] of post-ReLU features; their spatial mean is the logits."""
    return torch.einsum("nchw,kc->nkhw", features, classifier.weight) + classifier.bias[None, :, None, None]


def _cams(model: DenseNet, x: Tensor) -> Tensor:
    """The model's class activation maps plus bias [B, classes, h, w] for prepared images ``x``."""
    return _class_maps(model.forward_features(x), model.classifier)


def _augment(x: Tensor, rng: np.random.Generator) -> Tensor:
    """Small random shifts and gains, as in training (no flips: laterality matters on a chest radiograph)."""
    dy, dx = (int(v) for v in rng.integers(-6, 7, 2))
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (x.shape[0], 1, 1, 1)).astype(np.float32))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3)) * gain


_LOGIT_WEIGHT = 4.0  # distillation loss: CAM error plus this times the (spatially averaged) logit error


def _scope_cut(student: DenseNet, scope: str) -> int:
    """Index into ``student.features`` where a distillation ``scope`` starts (0: the whole network).
    Raises CompressionError for an unknown scope or one with more blocks than the network has."""
    blocks = len(student.architecture.blocks)
    if scope == "all":
        return 0
    if scope == "last_block":
        count = 1
    else:
        parts = scope.split("_")
        if len(parts) != 3 or parts[0] != "last" or parts[2] != "blocks" or not parts[1].isdigit():
            raise CompressionError(
                f"Invalid distill_scope {scope!r} - expected 'all', 'last_block' or 'last_<k>_blocks'"
            )
        count = int(parts[1])
    if not 1 <= count <= blocks:
        raise CompressionError(f"Invalid distill_scope {scope!r} - the network has {blocks} dense blocks")
    return list(student.features._modules).index(f"denseblock{blocks - count + 1}")


def _distill(
    student: DenseNet,
    teacher: DenseNet,
    images: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    scope: str,
    seed: int,
    progress: Progress | None,
) -> None:
    """Fine-tune the student so that its class activation maps and logits match the teacher's (each class's error
    relative to its logit's spread over the images). BatchNorm statistics stay frozen (eval mode); Adam with cosine
    decay.

    ``scope="all"``: every weight, on randomly shifted and scaled calibration images, the teacher run on the same
    batch. ``scope="last_block"`` / ``"last_<k>_blocks"``: only the last k dense blocks (with the transitions between
    them), the final BatchNorm affine and the classifier, on the calibration images as they are; the earlier layers'
    output and the teacher's maps are computed once and cached (far cheaper on a CPU, memory ~ images x the cut's
    activation size)."""
    feats = student.features
    names = list(feats._modules)
    cut = _scope_cut(student, scope)
    stem = [feats._modules[n] for n in names[:cut]]
    tail = [feats._modules[n] for n in names[cut:]]
    student.eval()
    teacher.eval()
    with torch.no_grad():
        cached, targets = [], []
        for start in range(0, len(images), _CHUNK):
            x = images[start : start + _CHUNK].float()
            t = _cams(teacher, x)
            targets.append(t)
            if scope != "all":
                for module in stem:
                    x = module(x)
                cached.append(x)
            if progress:
                progress("compress: distill (caching)", min(start + _CHUNK, len(images)), len(images))
        target = torch.cat(targets)
        inputs = torch.cat(cached) if cached else images
    weight = _class_scale(target.mean((2, 3)))
    params = [p for m in tail for p in m.parameters()] + list(student.classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    rng = np.random.default_rng([seed, 4])
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(inputs), min(batch_size, len(inputs)), replace=False))
        if scope == "all":
            z = _augment(inputs[idx].float(), rng)
            with torch.no_grad():
                goal = _cams(teacher, z)
        else:
            z, goal = inputs[idx], target[idx]
        with torch.enable_grad():
            for module in tail:
                z = module(z)
            cams = _class_maps(F.relu(z), student.classifier)
            error = (cams - goal) * weight[None, :, None, None]
            loss = error.pow(2).mean() + _LOGIT_WEIGHT * error.mean((2, 3)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        scheduler.step()
        if progress:
            progress("compress: distill", step + 1, steps)
        if (step + 1) % 25 == 0:
            log.info("distill step %d/%d loss %.5f", step + 1, steps, loss.item())
    student.eval()


def distill(
    student: DenseNet,
    teacher: DenseNet,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    scope: str = "last_2_blocks",
    seed: int = 0,
    progress: Progress | None = None,
) -> DenseNet:
    """Distil ``teacher`` into ``student`` (changed in place and returned, eval mode) on unlabeled prepared images
    [N, C, S, S]; see :func:`compress` for ``scope``. The student is typically a :func:`compress` result; both must
    take the same input. Raises CompressionError for invalid settings."""
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise CompressionError(f"Invalid distillation settings steps={steps} batch_size={batch_size} lr={lr}")
    if images.ndim != 4 or len(images) < 2:
        raise CompressionError(f"Invalid distillation images {tuple(images.shape)} - expected [N >= 2, C, S, S]")
    _scope_cut(student, scope)
    _distill(
        student, teacher, images, steps=steps, batch_size=batch_size, lr=lr, scope=scope, seed=seed,
        progress=progress,
    )
    for p in student.parameters():
        p.requires_grad_(True)
    return student


@torch.inference_mode()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """Logits [N, classes] of ``model`` (eval mode, CPU) for prepared images [N, C, S, S]."""
    model.eval()
    return torch.cat([model(images[s : s + batch_size].float()) for s in range(0, len(images), batch_size)])


def _fidelity(student: DenseNet, reference: Tensor, images: Tensor) -> tuple[float, float]:
    if len(images) == 0:
        return float("nan"), float("nan")
    diff = predict_logits(student, images) - reference
    return float(diff.pow(2).mean().sqrt()), float(diff.abs().max())


# ------------------------------------------------------------------------------------------------------ the job
def compress(
    model: DenseNet,
    calibration_images: Tensor,
    *,
    target_params: float = 0.45,
    target_macs: float | None = 0.55,
    distill_steps: int = 0,
    distill_batch_size: int = 32,
    distill_lr: float = 5e-5,
    distill_scope: str = "all",
    distill_images: Tensor | None = None,
    rows: int = 32768,
    held_out: float = 0.1,
    refit: bool = True,
    round_to: int = 8,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[DenseNet, CompressionReport]:
    """Compress ``model`` to at most ``target_params`` of its parameters (and ``target_macs`` of its MACs, None for
    no MAC target); return the new network (eval mode, CPU, float32) and a report. ``model`` is not changed.

    ``calibration_images``: prepared network inputs [N, C, S, S] (float16 or float32), N >= 16, unlabeled, not the
    images the result will be evaluated on. A ``held_out`` fraction (at least 4 images when N >= 40) is used only to
    measure how closely the result follows the original (and to decide whether distillation helped).
    ``rows``: calibration positions sampled per conv for its fit, spread over the images. ``refit=False`` selects
    the same way but keeps the original weights of the kept channels (the "pruning without refit" baseline).
    ``round_to``: channel counts of convs with at least ``8 * round_to`` inputs are multiples of it (1: none).
    ``distill_steps``: 0 for none; each step fits the network (``distill_scope="all"``, on shifted and scaled
    calibration images) or only its last dense block(s) and head (``"last_block"``, ``"last_<k>_blocks"``: cached
    inputs, far cheaper) to the original's class activation maps and logits on a batch of ``distill_batch_size``
    images; Adam at ``distill_lr``, cosine decay. ``distill_images``: more unlabeled prepared images [M, C, S, S]
    used for distillation only (besides the calibration images that are not held out).
    Raises CompressionError for invalid settings or inputs, or a MAC target not reachable with the parameter target.
    """
    started = time.perf_counter()
    if not isinstance(model, DenseNet):
        raise CompressionError(f"cannot compress {type(model).__name__} - expected a model.network.DenseNet")
    if isinstance(target_params, bool) or not 0 < target_params < 1:
        raise CompressionError(
            f"Invalid target_params {target_params!r} - the fraction of parameters to keep, in (0, 1)"
        )
    if target_macs is not None and not 0 < target_macs <= 1:
        raise CompressionError(f"Invalid target_macs {target_macs!r} - the fraction of MACs to keep, in (0, 1]")
    if distill_steps < 0:
        raise CompressionError(f"Invalid distill_steps {distill_steps} - must be >= 0")
    _scope_cut(model, distill_scope)
    if distill_images is not None and (
        not isinstance(distill_images, Tensor)
        or distill_images.ndim != 4
        or tuple(distill_images.shape[1:]) != tuple(getattr(calibration_images, "shape", ())[1:])
    ):
        shape = tuple(distill_images.shape) if isinstance(distill_images, Tensor) else type(distill_images).__name__
        raise CompressionError(
            f"Invalid distill_images {shape} - expected prepared images shaped like the calibration images"
        )
    if not 0 <= held_out < 0.5:
        raise CompressionError(f"Invalid held_out {held_out} - must be in [0, 0.5)")
    arch = model.architecture
    x = calibration_images
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != arch.in_channels or x.shape[2] != x.shape[3]:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise CompressionError(
            f"Invalid calibration images {shape} - expected a tensor [N, {arch.in_channels}, S, S] of prepared inputs"
        )
    if len(x) < 16:
        raise CompressionError(f"Invalid calibration images: {len(x)} - at least 16 are needed for the fits")
    if not torch.isfinite(x).all():
        raise CompressionError("Invalid calibration images - contain NaN or infinity")
    input_size = int(x.shape[2])
    before = complexity(arch, input_size)

    model = model.eval().cpu()
    n_held = int(round(len(x) * held_out)) if len(x) >= 40 else 0
    order = torch.from_numpy(np.random.default_rng([seed, 5]).permutation(len(x)))
    fit_x, held_x = x[order[n_held:]], x[order[:n_held]]
    reference = predict_logits(model, held_x) if n_held else torch.empty(0)

    with torch.inference_mode():
        worker = _Compressor(
            model, fit_x, rows=rows, seed=seed, refit=refit, round_to=round_to, progress=progress
        )
        curves = worker.curves()
        gains = worker.gains()
        keep = worker.allocate(
            curves, target_params=target_params, target_macs=target_macs, input_size=input_size, gains=gains
        )
        plans, readers, input_bias = worker.refit(keep)
    compressed = worker.assemble(plans, readers, input_bias)
    rmse_refit, max_refit = _fidelity(compressed, reference, held_x)
    log.info("refit: held-out logit RMSE %.4f (max %.4f)", rmse_refit, max_refit)

    distilled = False
    rmse, max_abs = rmse_refit, max_refit
    if distill_steps:
        state = {k: v.clone() for k, v in compressed.state_dict().items()}
        _distill(
            compressed,
            model,
            fit_x if distill_images is None else torch.cat([fit_x.float(), distill_images.float()]),
            steps=distill_steps,
            batch_size=distill_batch_size,
            lr=distill_lr,
            scope=distill_scope,
            seed=seed,
            progress=progress,
        )
        rmse_d, max_d = _fidelity(compressed, reference, held_x)
        log.info("distill: held-out logit RMSE %.4f (max %.4f)", rmse_d, max_d)
        if n_held == 0 or rmse_d < rmse_refit:
            distilled, rmse, max_abs = True, rmse_d, max_d
        else:
            compressed.load_state_dict(state)
    for p in compressed.parameters():
        p.requires_grad_(True)
    after = complexity(compressed.architecture, input_size)
    report = CompressionReport(
        input_size=input_size,
        parameters_before=before.parameters,
        parameters_after=after.parameters,
        macs_before=before.macs,
        macs_after=after.macs,
        macs_before_pool_first=complexity(replace(arch, pool_first=True), input_size).macs,
        target_params=target_params,
        target_macs=target_macs,
        calibration_images=len(fit_x),
        held_out_images=n_held,
        logit_rmse=rmse,
        logit_max_abs=max_abs,
        logit_rmse_before_distill=rmse_refit,
        distill_steps=distill_steps,
        distilled=distilled,
        seconds=time.perf_counter() - started,
        units=tuple(worker.units),
    )
    return compressed.eval(), report


# ------------------------------------------------------------------------------------------------ paired evaluation
@dataclass(frozen=True, kw_only=True, slots=True)
class AurocDelta:
    """Two models' AUROC on the same images and its paired bootstrap difference (after - before).

    Per label: ``before``/``after`` AUROC, ``delta`` and its 95% percentile ``delta_ci`` (None for a label with one
    outcome only), ``positives`` (positive images). ``mean_*``: the mean over labels with both outcomes;
    ``mean_*_eligible``: over labels with >= ``min_positives`` positives (``eligible``; None when there are none). In
    every bootstrap resample both models are scored on the same resampled images, so the interval is for the
    difference itself, not two separate intervals. ``resampled``: "patients" or "images". ``samples`` float
    [n_bootstrap, labels]: the per-resample differences (NaN where a resample lacks an outcome), kept so a verdict can
    average another set of labels.
    """

    labels: tuple[str, ...]
    before: tuple[float | None, ...]
    after: tuple[float | None, ...]
    delta: tuple[float | None, ...]
    delta_ci: tuple[tuple[float, float] | None, ...]
    mean_before: float
    mean_after: float
    mean_delta: float
    mean_delta_ci: tuple[float, float]
    n_bootstrap: int
    images: int
    positives: tuple[int, ...] = ()
    min_positives: int = MIN_POSITIVES
    eligible: tuple[str, ...] = ()
    mean_before_eligible: float | None = None
    mean_after_eligible: float | None = None
    mean_delta_eligible: float | None = None
    mean_delta_eligible_ci: tuple[float, float] | None = None
    resampled: str = "images"
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "n_bootstrap": self.n_bootstrap,
            "resampled": self.resampled,
            "mean_before": self.mean_before,
            "mean_after": self.mean_after,
            "mean_delta": self.mean_delta,
            "mean_delta_ci": list(self.mean_delta_ci),
            "min_positives": self.min_positives,
            "eligible": list(self.eligible),
            "mean_before_eligible": self.mean_before_eligible,
            "mean_after_eligible": self.mean_after_eligible,
            "mean_delta_eligible": self.mean_delta_eligible,
            "mean_delta_eligible_ci": list(ci) if (ci := self.mean_delta_eligible_ci) else None,
            "findings": [
                {
                    "label": label,
                    "positives": self.positives[c] if self.positives else None,
                    "before": self.before[c],
                    "after": self.after[c],
                    "delta": self.delta[c],
                    "delta_ci": list(ci) if (ci := self.delta_ci[c]) else None,
                }
                for c, label in enumerate(self.labels)
            ],
        }


def _aurocs(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-column AUROC (Mann-Whitney, ties counted half) [classes]; NaN where a column has one outcome only."""
    ranks = rankdata(scores, axis=0)
    pos = targets.sum(0)
    neg = len(targets) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * targets).sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def paired_auroc_delta(
    scores_before: np.ndarray,
    scores_after: np.ndarray,
    targets: np.ndarray,
    labels: tuple[str, ...] | list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    patients: Sequence[str | None] | None = None,
    min_positives: int = MIN_POSITIVES,
) -> AurocDelta:
    """Paired bootstrap of the AUROC difference between two models' scores [N, classes] on the same images with
    targets {0, 1} [N, classes]. With ``patients`` [N] the bootstrap resamples patients (an image without an id is
    its own patient), else images. Raises ValueError for mismatched shapes, ``patients`` of another length, or
    when no label has both outcomes."""
    from model.metrics import bootstrap_counts

    before = np.asarray(scores_before, dtype=np.float64)
    after = np.asarray(scores_after, dtype=np.float64)
    y = np.asarray(targets).astype(np.float64)
    if before.shape != after.shape or before.shape != y.shape or y.ndim != 2 or y.shape[1] != len(labels):
        raise ValueError(
            f"Invalid shapes: before {before.shape}, after {after.shape}, targets {y.shape} - all must be "
            f"[N, {len(labels)}]"
        )
    if n_bootstrap < 10:
        raise ValueError(f"Invalid n_bootstrap {n_bootstrap} - at least 10 resamples are needed for an interval")
    a0, a1 = _aurocs(before, y), _aurocs(after, y)
    valid = np.isfinite(a0)
    if not valid.any():
        raise ValueError("no label has both positive and negative images - AUROC is undefined")
    n = len(y)
    positives = y.sum(0).astype(np.int64)
    eligible = valid & (positives >= min_positives)
    if patients is None:  # images, drawn exactly as before patients existed (results stay reproducible)
        rng = np.random.default_rng(seed)
        draws = (rng.integers(0, n, n) for _ in range(n_bootstrap))
        resampled = "images"
    else:
        counts, resampled = bootstrap_counts(n, n_bootstrap, seed, patients)
        draws = (np.repeat(np.arange(n), row) for row in counts)
    deltas = np.full((n_bootstrap, y.shape[1]), np.nan)
    for k, idx in enumerate(draws):
        deltas[k] = _aurocs(after[idx], y[idx]) - _aurocs(before[idx], y[idx])

    def mean_interval(columns: np.ndarray) -> tuple[float, float] | None:
        kept = deltas[:, columns]
        rows = np.isfinite(kept).any(axis=1)
        return interval(np.nanmean(kept[rows], axis=1)) if columns.any() and rows.any() else None

    def opt(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    return AurocDelta(
        labels=tuple(labels),
        before=tuple(opt(v) for v in a0),
        after=tuple(opt(v) for v in a1),
        delta=tuple(opt(v) for v in a1 - a0),
        delta_ci=tuple(interval(deltas[:, c]) if valid[c] else None for c in range(y.shape[1])),
        mean_before=float(a0[valid].mean()),
        mean_after=float(a1[valid].mean()),
        mean_delta=float((a1 - a0)[valid].mean()),
        mean_delta_ci=mean_interval(valid) or (float("nan"), float("nan")),
        n_bootstrap=n_bootstrap,
        images=n,
        positives=tuple(int(p) for p in positives),
        min_positives=min_positives,
        eligible=tuple(label for label, e in zip(labels, eligible, strict=True) if e),
        mean_before_eligible=float(a0[eligible].mean()) if eligible.any() else None,
        mean_after_eligible=float(a1[eligible].mean()) if eligible.any() else None,
        mean_delta_eligible=float((a1 - a0)[eligible].mean()) if eligible.any() else None,
        mean_delta_eligible_ci=mean_interval(eligible),
        resampled=resampled,
        samples=deltas,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionVerdict:
    """Does a compressed model keep its parent's ranking? The rule (issue 13): over the findings with at least
    ``min_positives`` positive images (``judged``), the 95% CI of the mean ΔAUROC (after - before) reaches 0 or
    lies above it, and no judged finding has its own CI entirely below ``floor``.

    ``excluded``: findings reported but not judged, with their positives (too few, or one outcome only); ``failing``:
    judged findings whose CI lies entirely below ``floor``; ``below_zero``: judged findings whose CI lies entirely
    below 0 (reported, not failing unless also below ``floor``). ``verdict``: 'met' or 'not met'; ``reason`` says why.
    """

    verdict: str
    reason: str
    min_positives: int
    floor: float
    judged: tuple[str, ...]
    excluded: tuple[tuple[str, int], ...]
    failing: tuple[str, ...]
    below_zero: tuple[str, ...]
    mean_delta: float | None
    mean_delta_ci: tuple[float, float] | None
    mean_delta_all: float
    mean_delta_all_ci: tuple[float, float]
    resampled: str
    images: int

    @property
    def met(self) -> bool:
        return self.verdict == "met"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "rule": f"mean ΔAUROC over findings with >= {self.min_positives} positives: 95% CI reaches 0 or above; "
            f"no such finding with its CI entirely below {self.floor:g}",
            "min_positives": self.min_positives,
            "floor": self.floor,
            "judged": list(self.judged),
            "excluded": [{"label": label, "positives": n} for label, n in self.excluded],
            "failing": list(self.failing),
            "below_zero": list(self.below_zero),
            "mean_delta": self.mean_delta,
            "mean_delta_ci": list(self.mean_delta_ci) if self.mean_delta_ci else None,
            "mean_delta_all": self.mean_delta_all,
            "mean_delta_all_ci": list(self.mean_delta_all_ci),
            "resampled": self.resampled,
            "images": self.images,
        }


def compression_verdict(
    delta: AurocDelta, *, min_positives: int = MIN_POSITIVES, floor: float = -0.005
) -> CompressionVerdict:
    """The honest compression verdict on ``delta`` (see :class:`CompressionVerdict`). Findings are judged when they
    have both outcomes and >= ``min_positives`` positives. Raises ValueError when ``delta`` carries no positive counts
    or bootstrap samples (made by an older version) or ``floor`` is positive."""
    if not delta.positives or delta.samples is None:
        raise ValueError("Invalid delta: no positives or bootstrap samples - recompute it with paired_auroc_delta")
    if floor > 0:
        raise ValueError(f"Invalid floor {floor} - must be <= 0 (a tolerated loss of AUROC)")
    judged = [c for c, label in enumerate(delta.labels)
              if delta.delta[c] is not None and delta.positives[c] >= min_positives]
    excluded = tuple((label, delta.positives[c]) for c, label in enumerate(delta.labels) if c not in judged)
    failing = tuple(delta.labels[c] for c in judged if (ci := delta.delta_ci[c]) is not None and ci[1] < floor)
    below_zero = tuple(delta.labels[c] for c in judged if (ci := delta.delta_ci[c]) is not None and ci[1] < 0)
    mean = float(np.mean([delta.delta[c] for c in judged])) if judged else None
    mean_ci = None
    if judged:
        kept = delta.samples[:, judged]
        rows = np.isfinite(kept).any(axis=1)
        mean_ci = interval(np.nanmean(kept[rows], axis=1)) if rows.any() else None
    few = f"{len(excluded)} finding(s) with fewer than {min_positives} positives are reported but not judged"
    if mean is None or mean_ci is None:
        verdict = "not met"
        reason = (f"no finding has {min_positives} or more positive images among the {delta.images} evaluated - "
                  "nothing can be judged; evaluate on more images")
    elif mean_ci[1] < 0:
        verdict = "not met"
        reason = (f"mean ΔAUROC over {len(judged)} findings is {mean:+.5f} with 95% CI [{mean_ci[0]:+.5f}, "
                  f"{mean_ci[1]:+.5f}], entirely below 0" + (f"; {', '.join(failing)} below {floor:g}" if failing
                                                            else "") + f"; {few}")
    elif failing:
        verdict = "not met"
        reason = (f"{', '.join(failing)} lose(s) AUROC: CI entirely below {floor:g} (mean ΔAUROC {mean:+.5f}, 95% CI "
                  f"[{mean_ci[0]:+.5f}, {mean_ci[1]:+.5f}]); {few}")
    else:
        verdict = "met"
        reason = (f"mean ΔAUROC over {len(judged)} findings is {mean:+.5f} with 95% CI [{mean_ci[0]:+.5f}, "
                  f"{mean_ci[1]:+.5f}] and no finding's CI lies entirely below {floor:g}; {few}")
    return CompressionVerdict(
        verdict=verdict,
        reason=reason,
        min_positives=min_positives,
        floor=floor,
        judged=tuple(delta.labels[c] for c in judged),
        excluded=excluded,
        failing=failing,
        below_zero=below_zero,
        mean_delta=mean,
        mean_delta_ci=mean_ci,
        mean_delta_all=delta.mean_delta,
        mean_delta_all_ci=delta.mean_delta_ci,
        resampled=delta.resampled,
        images=delta.images,
    )
