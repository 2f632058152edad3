"""Phase A, on the original network: every prunable conv's error curve (relative residual increase per removed
input channel, in greedy removal order) and gain (how strongly a relative error at its output reaches the logits).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.compress.algebra import _eliminate, _Stats
from model.compress.compressor import _Compressor
from model.compress.tensors import _class_scale, _positions, _Sample


def _gains(job: _Compressor, images: int = 16, draws: int = 2, rho: float = 1e-3) -> dict[tuple[Any, ...], float]:
    """How strongly a relative error at each unit's output reaches the logits, measured on the original model.

    For every unit, a perturbation shaped like that unit's own output (a random mixing of its centred channels,
    weighted as its fit weights them) with relative energy ``rho`` is added on ``images`` calibration images;
    the gain is the resulting relative error of the class-normalised logits divided by ``rho``, averaged over
    ``draws`` mixings and image sets. The allocation
    weighs each unit's reconstruction error by it, so an error early in the network, which every later layer
    sees, costs more than the same relative error just before the head."""
    model = job.model
    generator = torch.Generator().manual_seed(job.seed)
    sets = [job.images[k * images : (k + 1) * images].float() for k in range(draws)]
    sets = [x for x in sets if len(x) >= 2] or [job.images.float()]
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
    for b, layers in enumerate(job.layers):
        out_scale = job._reader_scale(b)
        for i, layer in enumerate(layers):
            avail = job.arch.layer_available(b, i)
            gains[("conv1", b, i)] = measure(layer.conv1, job._norm_scale(layer.norm2))
            growth = layer.conv2.out_channels
            gains[("conv2", b, i)] = measure(layer.conv2, out_scale[avail : avail + growth])
        transition = job.transitions[b]
        if transition is not None:
            out = transition.conv.out_channels
            gains[("transition", b)] = measure(transition.conv, job._reader_scale(b + 1)[:out])
    gains[("head",)] = measure(model.classifier, cls_scale)
    return gains


def _curves(job: _Compressor) -> dict[tuple[Any, ...], np.ndarray]:
    """Relative residual increase per removal, in removal order, for every prunable unit (original model)."""
    curves: dict[tuple[Any, ...], np.ndarray] = {}
    total = sum(len(block) for block in job.layers) + len(job.layers)
    done = 0
    x = job._stem_maps()
    for b, layers in enumerate(job.layers):
        feat = job._block_tensor(b, x)
        _, _, h, w = feat.shape
        sample = _Sample.draw(job.n, h, w, job.analysis_rows, job._rng(0, b))
        out_scale = job._reader_scale(b)
        for i, layer in enumerate(layers):
            avail = job.arch.layer_available(b, i)
            pos = _positions(layer.kept_inputs, avail)
            a = F.relu(layer.norm1(feat[:, pos]))  # [N, n_in, H, W] post BN-ReLU inputs of conv1
            rows_a = sample.rows(a)
            y1 = layer.conv1(a)
            del a
            stats = _Stats.of(rows_a, sample.rows(y1), job._norm_scale(layer.norm2))
            _, costs = _eliminate(stats, len(pos), 1, 1)
            curves[("conv1", b, i)] = costs / stats.variance
            z = F.relu(layer.norm2(y1))
            del y1
            y2 = layer.conv2(z)
            stats = _Stats.of(sample.patches(z), sample.rows(y2), out_scale[avail : avail + y2.shape[1]])
            removed, costs = _eliminate(stats, z.shape[1], 9, 1)
            curves[("conv2", b, i)] = costs / stats.variance
            job.bottleneck_order[(b, i)] = removed
            feat[:, avail : avail + y2.shape[1]] = y2
            del z, y2
            done += 1
            job._report("compress: analyse", done, total)
        transition = job.transitions[b]
        if transition is not None:
            pos = _positions(transition.kept_inputs, feat.shape[1])
            a = F.avg_pool2d(F.relu(transition.norm(feat[:, pos])), 2)
            y = transition.conv(a)
            tsample = _Sample.draw(job.n, a.shape[2], a.shape[3], job.analysis_rows, job._rng(1, b))
            stats = _Stats.of(tsample.rows(a), tsample.rows(y), job._reader_scale(b + 1)[: y.shape[1]])
            _, costs = _eliminate(stats, len(pos), 1, 1)
            curves[("transition", b)] = costs / stats.variance
            x = y
        else:
            pos = job._head_inputs()
            a = F.relu(job.model.features.norm5(feat[:, pos]))
            y = torch.einsum("nchw,kc->nkhw", a, job.model.classifier.weight)
            stats = _Stats.of(sample.rows(a), sample.rows(y), _class_scale(y.mean((2, 3))))
            _, costs = _eliminate(stats, len(pos), 1, 1)
            curves[("head",)] = costs / stats.variance
        del feat
        done += 1
        job._report("compress: analyse", done, total)
    return curves
