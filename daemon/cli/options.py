"""The options several ``chexd`` commands share, written once: the global ``--config``, ``--json``, and the
validation-source group of the model-maintenance commands (calibrate, correct, finetune, decide, evaluate, compress,
channels). A command whose option means something of its own (a seed that also seeds a split, a phantom split with
another default) keeps that option in its own module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "ArtifactOpt",
    "BatchOpt",
    "ConfigOption",
    "CountOpt",
    "Cxr14Opt",
    "DeviceOpt",
    "DicomDirOpt",
    "DryRunOpt",
    "JsonOpt",
    "JsonOption",
    "LabelsOpt",
    "ModelOpt",
    "PhantomOpt",
    "RenderOpt",
    "SeedOpt",
    "SplitOpt",
]

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (default: $CHEXD_CONFIG or <data_dir>/chexd.toml)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]

# --- the validation source: at most one of --phantom, --chestxray14, --dicom-dir (daemon.maintenance.SourceOptions)
PhantomOpt = Annotated[str | None, typer.Option(help="Phantom split for validation: train, val or test (default val).")]
CountOpt = Annotated[int, typer.Option(min=10, help="Phantom validation images.")]
SeedOpt = Annotated[int, typer.Option(help="Phantom series (and split) seed.")]
RenderOpt = Annotated[int, typer.Option(min=64, max=1024, help="Side in pixels at which phantom images are rendered.")]
Cxr14Opt = Annotated[Path | None, typer.Option(help="ChestX-ray14 folder (images/, Data_Entry_2017*.csv, *_list.txt).")]
SplitOpt = Annotated[
    str, typer.Option(help="ChestX-ray14 split: test (unseen by CheXNet-style models) or train_val.")
]
DicomDirOpt = Annotated[Path | None, typer.Option(help="Folder of DICOM images labelled by --labels.")]
LabelsOpt = Annotated[Path | None, typer.Option(help="Labels CSV for --dicom-dir (NIH style or 0/1 columns).")]

# --- the model and how it runs
ModelOpt = Annotated[Path | None, typer.Option(help="Artifact to start from (default: the active model).")]
ArtifactOpt = Annotated[Path | None, typer.Option(help="Artifact (default: the active model).")]
DeviceOpt = Annotated[str, typer.Option(help="Device for the network's forward passes: auto, cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Do the job and report; write and register nothing.")]
