"""``chexd train``: train the phantom demo model (torch loads lazily)."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from daemon.cli.console import err, fail
from daemon.cli.console import out as stdout

SYNTHETIC_USE = "synthetic demo model, not for diagnosis: trained only on chexd's chest phantom"


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    )


def _reporter(progress: Progress):  # type: ignore[no-untyped-def]
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    return report


def train(
    out: Annotated[Path, typer.Option(help="Artifact folder to write.")] = Path("chexd-demo"),
    size: Annotated[int, typer.Option(help="Network input size in pixels.")] = 128,
    arch: Annotated[str, typer.Option(help="densenet121 or tiny (for smoke tests).")] = "densenet121",
    train_images: Annotated[int, typer.Option(help="Phantom training images.")] = 6000,
    val_images: Annotated[int, typer.Option(help="Phantom validation images.")] = 1000,
    test_images: Annotated[int, typer.Option(help="Phantom test images for the reported metrics.")] = 1000,
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weights in the artifact: float16 or float32.")] = "float16",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a DenseNet on the chest phantom (resumable) and write an artifact with test-split metrics.

    The result is a SYNTHETIC DEMO MODEL, NOT FOR DIAGNOSIS: it has only ever seen phantom images."""
    import torch

    from model.applicability import ApplicabilityModel
    from model.artifact import provenance_entry, save_artifact
    from model.network import Architecture, DenseNet
    from model.train import TrainConfig, evaluate_on_phantom
    from model.train import train as run_training
    from model.types import PreprocessRecipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if arch not in ("densenet121", "tiny"):
        fail(f"unknown --arch {arch!r} - expected densenet121 or tiny", 2)
    if not 64 <= size <= 512:
        fail(f"--size {size} must be in 64..512", 2)
    recipe = PreprocessRecipe(input_size=size, resize=None)
    config = TrainConfig(
        seed=seed,
        train_images=train_images,
        val_images=val_images,
        test_images=test_images,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        extra={"arch": arch, "input_size": size},
    )
    architecture = Architecture.densenet121() if arch == "densenet121" else Architecture.tiny()
    torch.manual_seed(seed)
    model = DenseNet(architecture)
    with _progress(quiet) as progress:
        report = _reporter(progress)
        model, metrics = run_training(
            model, config, recipe=recipe, state_path=out.with_name(out.name + ".train-state.pt"), progress=report
        )
        evaluation = evaluate_on_phantom(
            model, recipe=recipe, split="test", seed=seed, count=test_images, device=device, progress=report
        )
    applicability = ApplicabilityModel.from_dict(metrics.pop("applicability"))
    metrics["test"] = evaluation.to_dict()
    metrics["hardware"] = {
        "device": metrics["device"],
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    manifest = save_artifact(
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
    stdout.print(
        f"wrote {manifest}: test mean AUROC {evaluation.mean_auroc:.4f} "
        f"(95% CI {evaluation.mean_auroc_ci[0]:.4f}-{evaluation.mean_auroc_ci[1]:.4f})"
        if evaluation.mean_auroc_ci
        else f"wrote {manifest}",
        highlight=False,
    )
