"""Phase C, block by block: choose each consumer's inputs by greedy elimination and refit its weights by least
squares, fed by the compressed network's own activations, to reproduce the original network's outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.compress.algebra import _select, _Stats
from model.compress.compressor import _Compressor
from model.compress.report import UnitReport
from model.compress.tensors import _bn, _bn_relu, _class_scale, _LayerPlan, _positions, _ReaderPlan, _Sample


def _unit(
    job: _Compressor,
    name: str,
    kept: int,
    total: int,
    stats: _Stats,
    group: int,
    keep: np.ndarray,
    weights: np.ndarray,
    original: np.ndarray,
) -> None:
    job.units.append(
        UnitReport(
            name=name,
            kept=kept,
            total=total,
            error=stats.error(keep, group, weights),
            error_without_refit=stats.error(keep, group, original),
        )
    )


def _fit_reader(
    job: _Compressor,
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
    fit = stats.solve(keep, 1) if job.refit_weights else original
    _unit(job, name, len(keep), len(pos), stats, 1, keep, fit, original)
    return keep, fit / col


def _refit_layer(
    job: _Compressor,
    keep: dict[tuple[Any, ...], int],
    b: int,
    i: int,
    layer: nn.Module,
    blocks: tuple[Tensor, Tensor],
    sample: _Sample,
    out_scale: Tensor,
) -> _LayerPlan:
    """Select and refit dense layer ``i`` of block ``b``: conv1 reads the kept inputs of the compressed block tensor and
    is refit to the original bottleneck outputs; conv2 is refit on the compressed bottleneck to the original new
    channels. Writes the layer's new channels into both block tensors ``blocks`` = (original, compressed) [N, C, H, W]
    in place and returns the plan. ``out_scale``: the block reader's per-channel weights (see ``_reader_scale``)."""
    orig, comp = blocks
    arch = job.arch
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
    bottleneck = sorted(set(range(w1.shape[0])) - set(job.bottleneck_order[(b, i)][:n_drop].tolist()))
    # conv1: choose inputs and refit from the compressed network's activations to the original outputs
    a_c = _bn_relu(comp[:, pos], scale1, shift1)
    scale1 = job._norm_scale(layer.norm2, bottleneck)
    stats1 = _Stats.of(sample.rows(a_c), sample.rows(y1_o)[:, bottleneck], scale1)
    del y1_o
    kept_in, fit1 = _fit_reader(
        job,
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
    fit2 = stats2.solve(all_b, 9) if job.refit_weights else original2
    _unit(job, f"{name}.conv2", len(bottleneck), w1.shape[0], stats2, 9, all_b, fit2, original2)
    fit2 = fit2 / col2
    growth = y2_o.shape[1]
    w2_new = torch.from_numpy(fit2[:-1].T.copy()).float().reshape(growth, len(bottleneck), 3, 3)
    b2_new = torch.from_numpy(fit2[-1].copy()).float()
    comp[:, avail : avail + growth] = F.conv2d(z_c, w2_new, padding=1) + b2_new[None, :, None, None]
    orig[:, avail : avail + growth] = y2_o
    del z_c, y2_o
    return _LayerPlan(
        inputs=[pos[k] for k in kept_in],
        input_pos=kept_in.tolist(),
        bottleneck=bottleneck,
        w1=w1_new,
        b1=b1_new,
        w2=w2_new,
        b2=b2_new,
    )


def _refit(
    job: _Compressor, keep: dict[tuple[Any, ...], int]
) -> tuple[list[list[_LayerPlan]], list[_ReaderPlan], list[Tensor]]:
    """Sequential selection and refit; returns per-block layer plans, the readers (transitions then the head) and
    per-block biases of the block-input channels (zeros for the stem)."""
    total = sum(len(block) for block in job.layers) + len(job.layers)
    done = 0
    stem = job._stem_maps()
    block_in = (stem, stem)  # the original's and the compressed network's input to the next block
    input_bias = [torch.zeros(stem.shape[1])]
    del stem
    plans: list[list[_LayerPlan]] = []
    readers: list[_ReaderPlan] = []
    for b, layers in enumerate(job.layers):
        orig = job._block_tensor(b, block_in[0])
        comp = job._block_tensor(b, block_in[1])
        _, _, h, w = orig.shape
        sample = _Sample.draw(job.n, h, w, job.rows, job._rng(2, b))
        out_scale = job._reader_scale(b)
        block_plans = []
        for i, layer in enumerate(layers):
            block_plans.append(_refit_layer(job, keep, b, i, layer, (orig, comp), sample, out_scale))
            done += 1
            job._report("compress: refit", done, total)
        plans.append(block_plans)
        transition = job.transitions[b]
        if transition is not None:
            pos = _positions(transition.kept_inputs, orig.shape[1])
            scale, shift = _bn(transition.norm)
            a_o = F.avg_pool2d(_bn_relu(orig[:, pos], scale, shift), 2)
            orig_x = transition.conv(a_o)
            del a_o, orig
            a_c = F.avg_pool2d(_bn_relu(comp[:, pos], scale, shift), 2)
            del comp
            tsample = _Sample.draw(job.n, a_c.shape[2], a_c.shape[3], job.rows, job._rng(3, b))
            scale_t = job._reader_scale(b + 1)[: orig_x.shape[1]]
            stats = _Stats.of(tsample.rows(a_c), tsample.rows(orig_x), scale_t)
            kept, fit = _fit_reader(
                job,
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
            pos = job._head_inputs()
            scale, shift = _bn(job.model.features.norm5)
            cls_w = job.model.classifier.weight.detach()
            cls_b = job.model.classifier.bias.detach()
            a_o = _bn_relu(orig[:, pos], scale, shift)
            y = sample.rows(a_o) @ cls_w.T + cls_b
            scale_h = _class_scale(a_o.mean((2, 3)) @ cls_w.T)
            del a_o, orig
            a_c = _bn_relu(comp[:, pos], scale, shift)
            stats = _Stats.of(sample.rows(a_c), y, scale_h)
            del a_c, comp
            kept, fit = _fit_reader(job, "classifier", stats, pos, keep[("head",)], cls_w, cls_b, scale_h)
            readers.append(
                _ReaderPlan(
                    inputs=[pos[k] for k in kept],
                    input_pos=kept.tolist(),
                    weight=torch.from_numpy(fit[:-1].T.copy()).float(),
                    bias=torch.from_numpy(fit[-1].copy()).float(),
                )
            )
        done += 1
        job._report("compress: refit", done, total)
    return plans, readers, input_bias
