""":func:`compress`: checks its inputs, runs analysis, allocation, refit, assembly and optional distillation."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from model.complexity import complexity
from model.compress.allocation import _allocate
from model.compress.analysis import _curves, _gains
from model.compress.assembly import _assemble
from model.compress.compressor import _Compressor
from model.compress.distill import _distill, _fidelity, _scope_cut, predict_logits
from model.compress.refit import _refit
from model.compress.report import CompressionError, CompressionReport, Progress, log
from model.network import DenseNet


# ------------------------------------------------------------------------------------------------------ the job
def _check_inputs(
    model: DenseNet,
    x: Tensor,
    target_params: float,
    target_macs: float | None,
    distill_steps: int,
    distill_scope: str,
    distill_images: Tensor | None,
    held_out: float,
) -> None:
    """Raise CompressionError for a model that is not a DenseNet, a setting out of range, distillation images not
    shaped like the calibration images ``x``, or calibration images that are not >= 16 finite prepared inputs
    [N, C, S, S] for ``model`` (see :func:`compress`)."""
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
        or tuple(distill_images.shape[1:]) != tuple(getattr(x, "shape", ())[1:])
    ):
        shape = tuple(distill_images.shape) if isinstance(distill_images, Tensor) else type(distill_images).__name__
        raise CompressionError(
            f"Invalid distill_images {shape} - expected prepared images shaped like the calibration images"
        )
    if not 0 <= held_out < 0.5:
        raise CompressionError(f"Invalid held_out {held_out} - must be in [0, 0.5)")
    arch = model.architecture
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != arch.in_channels or x.shape[2] != x.shape[3]:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise CompressionError(
            f"Invalid calibration images {shape} - expected a tensor [N, {arch.in_channels}, S, S] of prepared inputs"
        )
    if len(x) < 16:
        raise CompressionError(f"Invalid calibration images: {len(x)} - at least 16 are needed for the fits")
    if not torch.isfinite(x).all():
        raise CompressionError("Invalid calibration images - contain NaN or infinity")


def _keep_distilled(
    compressed: DenseNet,
    teacher: DenseNet,
    images: Tensor,
    reference: Tensor,
    held_x: Tensor,
    rmse_refit: float,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    scope: str,
    seed: int,
    progress: Progress | None,
) -> tuple[float, float] | None:
    """Distil ``compressed`` in place towards ``teacher`` on ``images``. Keep the result and return its held-out logit
    (RMSE, max abs error) when it follows the teacher's ``reference`` logits on ``held_x`` more closely than the refit
    alone did (``rmse_refit``), or when no images are held out; otherwise restore the refit weights, return None."""
    state = {k: v.clone() for k, v in compressed.state_dict().items()}
    _distill(
        compressed,
        teacher,
        images,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        scope=scope,
        seed=seed,
        progress=progress,
    )
    rmse_d, max_d = _fidelity(compressed, reference, held_x)
    log.info("distill: held-out logit RMSE %.4f (max %.4f)", rmse_d, max_d)
    if len(held_x) == 0 or rmse_d < rmse_refit:
        return rmse_d, max_d
    compressed.load_state_dict(state)
    return None


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

    (Longer than most functions here because it is one straight sequence: checks, held-out split, the four stages,
    optional distillation, report; each step is a call.)
    """
    started = time.perf_counter()
    _check_inputs(
        model, calibration_images, target_params, target_macs, distill_steps, distill_scope, distill_images, held_out
    )
    arch = model.architecture
    x = calibration_images
    input_size = int(x.shape[2])
    before = complexity(arch, input_size)

    model = model.eval().cpu()
    n_held = int(round(len(x) * held_out)) if len(x) >= 40 else 0
    order = torch.from_numpy(np.random.default_rng([seed, 5]).permutation(len(x)))
    fit_x, held_x = x[order[n_held:]], x[order[:n_held]]
    reference = predict_logits(model, held_x) if n_held else torch.empty(0)

    with torch.inference_mode():
        worker = _Compressor(model, fit_x, rows=rows, seed=seed, refit=refit, round_to=round_to, progress=progress)
        curves = _curves(worker)
        gains = _gains(worker)
        keep = _allocate(
            worker, curves, target_params=target_params, target_macs=target_macs, input_size=input_size, gains=gains
        )
        plans, readers, input_bias = _refit(worker, keep)
    compressed = _assemble(worker, plans, readers, input_bias)
    rmse_refit, max_refit = _fidelity(compressed, reference, held_x)
    log.info("refit: held-out logit RMSE %.4f (max %.4f)", rmse_refit, max_refit)

    distilled = False
    rmse, max_abs = rmse_refit, max_refit
    if distill_steps:
        images = fit_x if distill_images is None else torch.cat([fit_x.float(), distill_images.float()])
        kept = _keep_distilled(
            compressed,
            model,
            images,
            reference,
            held_x,
            rmse_refit,
            steps=distill_steps,
            batch_size=distill_batch_size,
            lr=distill_lr,
            scope=distill_scope,
            seed=seed,
            progress=progress,
        )
        if kept is not None:
            distilled, (rmse, max_abs) = True, kept
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
