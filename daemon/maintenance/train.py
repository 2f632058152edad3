"""Training the phantom demo model (``chexd train``): a DenseNet trained on the chest phantom, written as a
SYNTHETIC artifact with test-split metrics. Torch loads when a function runs."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.errors import MaintenanceError, Progress, quiet

if TYPE_CHECKING:
    from model.metrics import Evaluation

__all__ = ["ARCHITECTURES", "SYNTHETIC_USE", "train_demo"]

SYNTHETIC_USE = "synthetic demo model, not for diagnosis: trained only on chexd's chest phantom"
ARCHITECTURES = ("densenet121", "tiny")


def train_demo(
    out: Path,
    *,
    size: int,
    arch: str,
    train_images: int,
    val_images: int,
    test_images: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    dtype: str,
    progress: Progress = quiet,
) -> tuple[Path, Evaluation]:
    """(manifest path, test-split evaluation) of a model trained on the phantom (resumable: the training state is
    kept beside ``out``) and saved to ``out``. Raises MaintenanceError(usage) for an unknown ``arch`` or a ``size``
    outside 64..512 px."""
    import torch

    from model.network import Architecture, DenseNet
    from model.train import TrainConfig, evaluate_on_phantom
    from model.train import train as run_training
    from model.types import PreprocessRecipe

    if arch not in ARCHITECTURES:
        raise MaintenanceError(f"unknown --arch {arch!r} - expected densenet121 or tiny", usage=True)
    if not 64 <= size <= 512:
        raise MaintenanceError(f"--size {size} must be in 64..512", usage=True)
    recipe = PreprocessRecipe(input_size=size, resize=None)
    config = TrainConfig(seed=seed, train_images=train_images, val_images=val_images, test_images=test_images,
                         epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                         extra={"arch": arch, "input_size": size})
    torch.manual_seed(seed)
    model = DenseNet(Architecture.densenet121() if arch == "densenet121" else Architecture.tiny())
    model, metrics = run_training(
        model, config, recipe=recipe, state_path=out.with_name(out.name + ".train-state.pt"), progress=progress
    )
    evaluation = evaluate_on_phantom(
        model, recipe=recipe, split="test", seed=seed, count=test_images, device=device, progress=progress
    )
    manifest = _save(model, out, arch=arch, recipe=recipe, config=config, metrics=metrics, evaluation=evaluation,
                     dtype=dtype)
    return manifest, evaluation


def _save(model: Any, out: Path, *, arch: str, recipe: Any, config: Any, metrics: dict[str, Any],
          evaluation: Evaluation, dtype: str) -> Path:
    """Write the trained model with its test metrics, hardware and provenance; the manifest path."""
    import torch

    from model.applicability import ApplicabilityModel
    from model.artifact import provenance_entry, save_artifact

    applicability = ApplicabilityModel.from_dict(metrics.pop("applicability"))
    metrics["test"] = evaluation.to_dict()
    metrics["hardware"] = {
        "device": metrics["device"],
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return save_artifact(
        model,
        out,
        name="chexd-demo" if arch == "densenet121" else "chexd-demo-tiny",
        preprocessing=recipe,
        intended_use=SYNTHETIC_USE,
        synthetic=True,
        dtype=dtype,
        metrics=metrics,
        provenance=(provenance_entry("train", config.to_dict() | {"data": "chexd chest phantom (model.phantom)"}),),
        applicability=applicability,
    )
