"""Optional distillation of a compressed network to the original's class activation maps and logits, and the logits
of a network on prepared images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.compress.report import CompressionError, Progress, log
from model.compress.tensors import _CHUNK, _class_scale
from model.network import DenseNet


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
