"""Head fine-tuning: retrain only the linear classifier (14 × C weights + 14 biases) on cached pooled features.

The backbone is frozen, so its pooled output ``ā`` [C] per image (``model.features``) is computed once; every epoch is
then a few small matrix products over an [N, C] matrix instead of N forward passes through the DenseNet. Training is
warm-started from the current head, uses AdamW on large mini-batches, binary cross-entropy with a per-class
``pos_weight`` from the training prevalence, and stops early when the validation loss has not improved for
``patience`` epochs; the best epoch's head is returned (or the original head when no epoch beat it).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError
from model.features import FeatureSet
from model.types import LABELS

__all__ = [
    "ClassWeighting",
    "FinetuneError",
    "FinetuneResult",
    "finetune_head",
    "head_aurocs",
    "pos_weights",
    "with_head",
]

ClassWeighting = Literal["sqrt", "balanced", "none"]
Progress = Callable[[str, int, int], None]
_WEIGHTINGS = ("sqrt", "balanced", "none")


class FinetuneError(ModelError, ValueError):
    """Fine-tuning inputs are unusable: shapes that do not match, empty sets, invalid hyper-parameters."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FinetuneResult:
    """A refitted head and how it got there.

    - ``weight`` float32 [n, C], ``bias`` float32 [n]: the new head in ``labels`` order (the best epoch's).
    - ``epochs``: epochs run; ``best_epoch``: the one returned (0 = the original head was best); ``stopped_early``.
    - ``seconds``: wall time of the training loop (features already cached).
    - ``val_loss_before/after``: class-weighted BCE on the validation features, the early-stopping criterion.
    - ``auroc_before/after``: per-class validation AUROC in ``labels`` order (None where one outcome only).
    - ``pos_weight``: the per-class positive weights used; ``history``: per epoch (epoch, train loss, val loss).
    """

    labels: tuple[str, ...]
    weight: np.ndarray
    bias: np.ndarray
    epochs: int
    best_epoch: int
    stopped_early: bool
    seconds: float
    train_images: int
    val_images: int
    val_loss_before: float
    val_loss_after: float
    auroc_before: tuple[float | None, ...]
    auroc_after: tuple[float | None, ...]
    pos_weight: tuple[float, ...]
    history: tuple[tuple[int, float, float], ...]
    settings: dict[str, Any]

    @staticmethod
    def _mean(values: Sequence[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.mean(known)) if known else None

    @property
    def mean_auroc_before(self) -> float | None:
        return self._mean(self.auroc_before)

    @property
    def mean_auroc_after(self) -> float | None:
        return self._mean(self.auroc_after)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the weights)."""
        per_class = [
            {"label": label, "auroc_before": b, "auroc_after": a,
             "auroc_change": None if a is None or b is None else a - b, "pos_weight": w}
            for label, b, a, w in zip(self.labels, self.auroc_before, self.auroc_after, self.pos_weight, strict=True)
        ]
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 3),
            "train_images": self.train_images,
            "val_images": self.val_images,
            "val_loss_before": self.val_loss_before,
            "val_loss_after": self.val_loss_after,
            "mean_auroc_before": self.mean_auroc_before,
            "mean_auroc_after": self.mean_auroc_after,
            "per_class": per_class,
            "settings": dict(self.settings),
        }


def pos_weights(labels: np.ndarray, weighting: ClassWeighting = "sqrt", *, clip: float = 1e-3) -> np.ndarray:
    """Per-class positive weights float32 [n] from 0/1 ``labels`` [N, n]: with prevalence p (clipped to
    [clip, 0.5]) "balanced" gives (1 - p) / p, "sqrt" its square root (the phantom training recipe: it softens the
    imbalance without over-weighting rare classes), "none" ones."""
    if weighting not in _WEIGHTINGS:
        raise FinetuneError(f"Invalid class_weighting {weighting!r} - expected one of {', '.join(_WEIGHTINGS)}")
    p = np.clip(labels.astype(np.float64).mean(axis=0), clip, 0.5)
    ratio = (1 - p) / p
    out = {"balanced": ratio, "sqrt": np.sqrt(ratio), "none": np.ones_like(ratio)}[weighting]
    return out.astype(np.float32)


def _targets(features: FeatureSet, labels: Sequence[str]) -> np.ndarray:
    try:
        columns = [LABELS.index(label) for label in labels]
    except ValueError:
        unknown = [label for label in labels if label not in LABELS]
        raise FinetuneError(f"the head's labels {unknown} are not ChestX-ray14 findings - cannot map the features' "
                            "labels onto them") from None
    return features.labels[:, columns].astype(np.float32)


def _aurocs(y: np.ndarray, scores: np.ndarray) -> tuple[float | None, ...]:
    from sklearn.metrics import roc_auc_score

    return tuple(
        float(roc_auc_score(y[:, c], scores[:, c])) if 0 < y[:, c].sum() < len(y) else None for c in range(y.shape[1])
    )


def head_aurocs(
    features: FeatureSet, weight: np.ndarray, bias: np.ndarray, *, labels: Sequence[str] = LABELS
) -> tuple[float | None, ...]:
    """Per-class AUROC (``labels`` order; None with one outcome only) of the head ``weight`` [n, C], ``bias`` [n] on
    ``features``."""
    logits = features.pooled @ np.asarray(weight, dtype=np.float32).T + np.asarray(bias, dtype=np.float32)
    return _aurocs(_targets(features, labels), logits)


def finetune_head(
    features: FeatureSet,
    val: FeatureSet,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    labels: Sequence[str] = LABELS,
    class_weighting: ClassWeighting = "sqrt",
    max_epochs: int = 200,
    patience: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 4096,
    seed: int = 0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Refit the head ``weight`` [n, C], ``bias`` [n] (in ``labels`` order) on training ``features`` and stop on the
    validation loss of ``val`` (both FeatureSets with labels in LABELS order, patient-disjoint by the caller).

    The training rows are shuffled once; an epoch is one pass over contiguous mini-batches of ``batch_size`` rows
    (the whole set when it is smaller) in a random order, with AdamW (``lr``, ``weight_decay``). ``threads``: torch
    threads while training (restored afterwards; None keeps the current setting). The head's matrix products have
    only n = 14 outputs and are memory-bound: on a busy 2-core machine one thread measured 25 ms per epoch of
    10,000 x 1024 features where two took 200-400 ms. Deterministic for a ``seed`` on one machine. Raises
    FinetuneError for mismatched shapes, empty sets or invalid hyper-parameters.
    """
    labels = tuple(labels)
    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    n, channels = weight.shape if weight.ndim == 2 else (0, 0)
    if n != len(labels) or bias.shape != (n,):
        raise FinetuneError(f"Invalid head: weight {weight.shape}, bias {bias.shape} - expected [{len(labels)}, C] "
                            f"and [{len(labels)}]")
    for name, fs in (("training", features), ("validation", val)):
        if len(fs) == 0 or fs.channels != channels:
            raise FinetuneError(f"Invalid {name} features [{len(fs)}, {fs.channels}] - expected at least one image "
                                f"with {channels} channels")
    for name, value, low in (("max_epochs", max_epochs, 1), ("patience", patience, 1), ("batch_size", batch_size, 1),
                             ("threads", 1 if threads is None else threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FinetuneError(f"Invalid {name} {value!r} - must be an integer >= {low}")
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise FinetuneError(f"Invalid lr {lr} or weight_decay {weight_decay} - lr must be > 0, weight_decay >= 0")

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(features, val, weight, bias, labels=labels, class_weighting=class_weighting,
                      max_epochs=max_epochs, patience=patience, lr=lr, weight_decay=weight_decay,
                      batch_size=batch_size, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    features: FeatureSet,
    val: FeatureSet,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    labels: tuple[str, ...],
    class_weighting: ClassWeighting,
    max_epochs: int,
    patience: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    progress: Progress | None,
) -> FinetuneResult:
    """AdamW on the head's weight and bias over shuffled mini-batches of cached pooled features, early-stopped on the
    validation loss (``patience`` epochs without a relative improvement of 1e-6); returns the best epoch's head.

    (One training loop, a little over 80 lines with its signature: the generator, the best head and the stopping
    counters are shared by every step, so it is kept whole.)"""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    y_all = _targets(features, labels)
    pw = torch.from_numpy(pos_weights(y_all, class_weighting))
    shuffle = torch.randperm(len(features), generator=generator)  # once: batches are then contiguous views
    x_train = torch.from_numpy(np.ascontiguousarray(features.pooled))[shuffle].contiguous()
    y_train = torch.from_numpy(y_all)[shuffle].contiguous()
    y_val = torch.from_numpy(_targets(val, labels))
    x_val = torch.from_numpy(np.ascontiguousarray(val.pooled))
    w = torch.nn.Parameter(torch.from_numpy(weight.copy()))
    b = torch.nn.Parameter(torch.from_numpy(bias.copy()))
    optimizer = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)

    def val_loss() -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            logits = torch.addmm(b, x_val, w.T)
            return float(F.binary_cross_entropy_with_logits(logits, y_val, pos_weight=pw)), logits

    best_loss, logits_before = val_loss()
    loss_before = best_loss
    best = (w.detach().clone(), b.detach().clone())
    best_epoch, epochs, since_best = 0, 0, 0
    history: list[tuple[int, float, float]] = []
    size = min(batch_size, len(x_train))
    starts = torch.arange(0, len(x_train), size)
    for epoch in range(1, max_epochs + 1):
        total = 0.0
        for start in starts[torch.randperm(len(starts), generator=generator)].tolist():
            xb, yb = x_train[start : start + size], y_train[start : start + size]
            loss = F.binary_cross_entropy_with_logits(torch.addmm(b, xb, w.T), yb, pos_weight=pw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(xb)
        current, _ = val_loss()
        epochs = epoch
        history.append((epoch, total / len(x_train), current))
        if current < best_loss - 1e-6 * abs(best_loss):
            best_loss, best_epoch, since_best = current, epoch, 0
            best = (w.detach().clone(), b.detach().clone())
        else:
            since_best += 1
        if progress:
            progress("fine-tune head", epoch, max_epochs)
        if since_best >= patience:
            break
    seconds = time.perf_counter() - started
    with torch.no_grad():
        logits_after = torch.addmm(best[1], x_val, best[0].T)
    y_np = y_val.numpy()
    return FinetuneResult(
        labels=labels,
        weight=best[0].numpy().astype(np.float32),
        bias=best[1].numpy().astype(np.float32),
        epochs=epochs,
        best_epoch=best_epoch,
        stopped_early=epochs < max_epochs,
        seconds=seconds,
        train_images=len(features),
        val_images=len(val),
        val_loss_before=loss_before,
        val_loss_after=best_loss,
        auroc_before=_aurocs(y_np, logits_before.numpy()),
        auroc_after=_aurocs(y_np, logits_after.numpy()),
        pos_weight=tuple(float(v) for v in pw),
        history=tuple(history),
        settings={"class_weighting": class_weighting, "max_epochs": max_epochs, "patience": patience, "lr": lr,
                  "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed, "optimizer": "AdamW",
                  "threads": torch.get_num_threads()},
    )


def with_head(model: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """A copy of ``model`` whose ``classifier`` holds ``weight`` [n, C] and ``bias`` [n]; the backbone is untouched.
    Raises FinetuneError when the shapes differ from the model's head."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise FinetuneError("expected a model with a linear 'classifier' head")
    shape = (tuple(np.shape(weight)), tuple(np.shape(bias)))
    if head.bias is None or shape != (tuple(head.weight.shape), (head.out_features,)):
        raise FinetuneError(f"Invalid head: weight {shape[0]} bias {shape[1]} - the model's head is "
                            f"{tuple(head.weight.shape)} with a bias")
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.classifier.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=np.float32)))
        edited.classifier.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
    return edited
