"""Training on the chest phantom: patient-disjoint splits, mixed precision on a GPU, resumable, with progress.

Splits are decided by a hash of the phantom patient id (train 70%, val 15%, test 15%; :mod:`model.splits`), so no
patient has images in two splits. Images are rendered once per run at ``render_size`` and kept in memory as float16
at the network's input size; the test split is what ``evaluate`` reports on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.applicability import ApplicabilityModel, fit_applicability
from model.metrics import Evaluation, evaluate
from model.splits import SPLITS as SPLITS  # the phantom splits, re-exported (features and datasets import them too)
from model.splits import PhantomSplit as PhantomSplit
from model.splits import render_split
from model.splits import split_of as split_of
from model.types import LABELS, PreprocessRecipe

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Hyper-parameters; sizes in images, ``lr`` for AdamW with cosine decay over all steps."""

    seed: int = 0
    train_images: int = 6000
    val_images: int = 1000
    test_images: int = 1000
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    render_size: int = 256
    device: str = "auto"
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"} | dict(self.extra)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Small random shifts and contrast changes (no flips: laterality matters on a chest radiograph)."""
    dy, dx = (int(v) for v in rng.integers(-6, 7, 2))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (x.shape[0], 1, 1, 1)).astype(np.float32)).to(x.device)
    return x * gain


@torch.inference_mode()
def predict_scores(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities [N, n_labels] for prepared inputs."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].to(device).float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(torch.sigmoid(model(batch).float()).cpu())
    return torch.cat(out).numpy()


@torch.inference_mode()
def pooled_of(model: torch.nn.Module, x: torch.Tensor, device: torch.device | str = "cpu",
              batch_size: int = 64) -> np.ndarray:
    """Pooled final features float32 [N, C] of prepared inputs ``x`` [N, channels, S, S] (what the engine's head and
    the applicability model see)."""
    from model.features import pooled_features

    device = torch.device(device)
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].to(device).float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(pooled_features(model, batch).float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


def fit_applicability_on(model: torch.nn.Module, x: torch.Tensor, *, source: str, device: torch.device | str = "cpu",
                         in_domain_share: float = 0.95) -> ApplicabilityModel:
    """The artifact's applicability model (:func:`model.applicability.fit_applicability`, default method) fitted on
    the pooled features of validation inputs ``x`` [N, channels, S, S] (N >= 10). Raises ApplicabilityError for too
    few images."""
    return fit_applicability(pooled_of(model, x, device), in_domain_share=in_domain_share, source=source)


def _train_epoch(
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pos_weight: torch.Tensor,
    rng: np.random.Generator,
    device: torch.device,
    *,
    epoch: int,
    config: TrainConfig,
    progress: Progress | None,
) -> list[float]:
    """One epoch over shuffled, augmented batches of the prepared training inputs ``x_train`` [N, C, S, S] (bf16
    autocast on a GPU); returns the batch losses."""
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    model.train()
    losses = []
    for step, idx in enumerate(_batches(len(x_train), config.batch_size, rng)):
        x = x_train[idx].to(device).float().contiguous(memory_format=torch.channels_last)
        x = _augment(x, rng)
        y = y_train[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log.info("epoch %d step %d/%d loss %.4f", epoch + 1, step + 1, steps_per_epoch, np.mean(losses[-50:]))
        if progress:
            progress(f"epoch {epoch + 1}/{config.epochs}", step + 1, steps_per_epoch)
    return losses


def _save_state(
    state_path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    config: TrainConfig,
) -> None:
    """The resumable training state after ``epoch`` epochs (read back by :func:`train` with ``weights_only=True``)."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "config": json.dumps(config.to_dict(), sort_keys=True),
        },
        state_path,
    )


def train(
    model: torch.nn.Module,
    config: TrainConfig,
    *,
    recipe: PreprocessRecipe,
    state_path: Path,
    progress: Progress | None = None,
) -> tuple[torch.nn.Module, dict[str, object]]:
    """Train ``model`` in place on phantom data; return it and metrics (val and test evaluation, timings, and under
    ``"applicability"`` the applicability model fitted on the val split's pooled features, as ``to_dict()``).

    Resumable: after every epoch the model, optimiser and epoch are saved to ``state_path`` (loaded back with
    ``weights_only=True``); a later call with the same config continues from there."""
    from model.engine import pick_device

    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    train_set = render_split("train", seed=config.seed, count=config.train_images, recipe=recipe,
                             render_size=config.render_size, progress=progress)
    val_set = render_split("val", seed=config.seed, count=config.val_images, recipe=recipe,
                           render_size=config.render_size, progress=progress)
    render_seconds = time.perf_counter() - started

    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set.x) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                    pct_start=0.15)
    prevalence = torch.from_numpy(train_set.y.mean(axis=0).clip(1e-3, 0.5)).float()
    pos_weight = ((1 - prevalence) / prevalence).sqrt().to(device)  # soften imbalance without over-weighting
    start_epoch = 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("config") != json.dumps(config.to_dict(), sort_keys=True):
            raise ValueError(f"{state_path} was written for another training configuration - remove it to restart")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        rng = np.random.default_rng(config.seed + start_epoch)
        log.info("resuming training at epoch %d from %s", start_epoch + 1, state_path)

    y_train = torch.from_numpy(train_set.y).float()
    train_started = time.perf_counter()
    history = []
    for epoch in range(start_epoch, config.epochs):
        losses = _train_epoch(model, train_set.x, y_train, optimizer, scheduler, pos_weight, rng, device,
                              epoch=epoch, config=config, progress=progress)
        val = evaluate(predict_scores(model, val_set.x, device), val_set.y, LABELS, n_bootstrap=0)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_mean_auroc": val.mean_auroc})
        log.info("epoch %d loss %.4f val mean AUROC %s", epoch + 1, np.mean(losses), val.mean_auroc)
        _save_state(state_path, model, optimizer, scheduler, epoch + 1, config)
    train_seconds = time.perf_counter() - train_started
    model.eval()
    applicability = fit_applicability_on(
        model, val_set.x, device=device,
        source=f"phantom val split (seed {config.seed}, {len(val_set.x)} images, {config.render_size} px)",
    )
    metrics: dict[str, object] = {
        "history": history,
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "train_images": len(train_set.x),
        "val_images": len(val_set.x),
        "applicability": applicability.to_dict(),  # the caller pops it into the artifact's manifest
    }
    return model.cpu(), metrics


def evaluate_on_phantom(
    model: torch.nn.Module,
    *,
    recipe: PreprocessRecipe,
    split: str = "test",
    seed: int = 0,
    count: int = 1000,
    render_size: int = 256,
    thresholds: dict[str, float] | None = None,
    device: str = "auto",
    n_bootstrap: int = 200,
    progress: Progress | None = None,
) -> Evaluation:
    """Per-class AUROC (patient bootstrap CI) and threshold metrics of ``model`` on a phantom split."""
    from model.engine import pick_device

    data = render_split(split, seed=seed, count=count, recipe=recipe, render_size=render_size, progress=progress)
    target = pick_device(device)
    model.to(target, memory_format=torch.channels_last)
    scores = predict_scores(model, data.x, target)
    return evaluate(scores, data.y, LABELS, thresholds, n_bootstrap=n_bootstrap, patients=data.patients)
