"""``chexd train``: train the phantom demo model (``daemon.maintenance.train``; torch loads lazily)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from daemon.cli.console import out as stdout
from daemon.cli.jobs import guarded
from daemon.cli.progress import stage_bar


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
    from daemon.maintenance.train import train_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with stage_bar(quiet) as report:
        manifest, evaluation = guarded(
            train_demo, out, size=size, arch=arch, train_images=train_images, val_images=val_images,
            test_images=test_images, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
            dtype=dtype, progress=report,
        )  # fmt: skip
    stdout.print(
        f"wrote {manifest}: test mean AUROC {evaluation.mean_auroc:.4f} "
        f"(95% CI {evaluation.mean_auroc_ci[0]:.4f}-{evaluation.mean_auroc_ci[1]:.4f})"
        if evaluation.mean_auroc_ci
        else f"wrote {manifest}",
        highlight=False,
    )
