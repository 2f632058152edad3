"""``chexd model ...``: model artifact commands (registered on the main app by :mod:`daemon.cli`).

Torch is imported only when a command runs, so ``chexd --help`` stays fast.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.console import fail
from daemon.console import out as stdout

__all__ = ["model_app"]

model_app = typer.Typer(
    help="Model artifacts: import foreign checkpoints (CheXNet, torchxrayvision, torchvision) as chexd artifacts.",
    no_args_is_help=True,
)

_FORMATS = ("auto", "chexnet", "xrv", "torchvision", "artifact")


def _data_dir() -> Path:
    # Late import: daemon.cli registers this app, so importing it at module level would be circular. Going through
    # daemon.cli.settings() honours the global --config option exactly like every other command.
    from daemon.cli import settings

    return settings().data_dir


def _summary(manifest_file: Path) -> dict[str, Any]:
    from model.artifact import read_manifest

    manifest = read_manifest(manifest_file)
    last = manifest.provenance[-1] if manifest.provenance else {}
    return {
        "path": str(manifest_file),
        "name": manifest.name,
        "version": manifest.version,
        "content_hash": manifest.short_hash,
        "weights_sha256": manifest.weights_sha256,
        "source_format": last.get("parameters", {}).get("source_format"),
        "parameters": manifest.parameters,
        "dtype": manifest.dtype,
        "labels": list(manifest.labels),
        "input": manifest.preprocessing.to_dict(),
    }


@model_app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="Checkpoint file (.pth.tar, .pt, .pth, .safetensors) or artifact.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder or .json path (default: <data_dir>/models/<name>-<hash12>/)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Artifact name (default: the file's stem).")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="auto, chexnet, xrv, torchvision or artifact (default: detect).")
    ] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Stored weight precision: float32 or float16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Import a CheXNet, torchxrayvision or torchvision DenseNet checkpoint (or a chexd artifact) as an artifact."""
    if fmt not in _FORMATS:
        fail(f"Invalid --format {fmt!r} - expected one of {', '.join(_FORMATS)}", 2)
    if dtype not in ("float32", "float16"):
        fail(f"Invalid --dtype {dtype!r} - expected float32 or float16", 2)
    from model.checkpoints import import_checkpoint
    from model.errors import ModelError

    try:
        if out is not None:
            manifest_file = import_checkpoint(path, out, name=name, format=fmt, dtype=dtype)  # type: ignore[arg-type]
        else:
            manifest_file = _import_to_registry(path, _data_dir() / "models", name=name, fmt=fmt, dtype=dtype)
        summary = _summary(manifest_file)
    except ModelError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot import {path}: {exc}")
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    stdout.print(
        f"imported {summary['source_format']} {path.name} as {summary['name']} {summary['version']} "
        f"({summary['content_hash']}, {summary['parameters']:,} parameters, {summary['dtype']}) -> {manifest_file}",
        highlight=False,
        markup=False,
    )


def _import_to_registry(path: Path, models_dir: Path, *, name: str | None, fmt: str, dtype: str) -> Path:
    """Import into ``models_dir/<name>-<hash12>/``; an identical import already there is kept as it is."""
    from model.artifact import read_manifest
    from model.checkpoints import import_checkpoint

    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=models_dir))
    try:
        staged = import_checkpoint(path, staging, name=name, format=fmt, dtype=dtype)  # type: ignore[arg-type]
        manifest = read_manifest(staged)
        final = models_dir / f"{manifest.name}-{manifest.short_hash}"
        if not final.exists():
            staging.rename(final)
        return final / staged.name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
