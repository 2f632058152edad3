"""``chexd model ...``: model artifact commands (registered on the main app by :mod:`daemon.cli`).

Torch is imported only when a command runs, so ``chexd --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.context import settings as _settings
from daemon.cli.jobs import guarded
from daemon.cli.options import JsonOption

__all__ = ["model_app"]

model_app = typer.Typer(
    help="Model versions: import checkpoints, list the registry, activate, roll back, compare.",
    no_args_is_help=True,
)


@model_app.command("import")
def import_cmd(
    path: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint file (.pth.tar, .pt, .pth, .safetensors) or artifact; 'bundled:full' or "
            "'bundled:compressed' for the demo models shipped with chexd (the compressed one is the default).",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder or .json path (default: <data_dir>/models/<name>-<hash12>/)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Artifact name (default: the file's stem).")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="auto, chexnet, xrv, torchvision or artifact (default: detect).")
    ] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Stored weight precision: float32 or float16.")] = "float32",
    validation_dicom: Annotated[
        Path | None,
        typer.Option("--validation-dicom", help="Folder of DICOM validation images (with --validation-labels): the "
                     "applicability model is fitted on them."),
    ] = None,
    validation_labels: Annotated[
        Path | None, typer.Option("--validation-labels", help="Label CSV of the --validation-dicom images.")
    ] = None,
    validation_chestxray14: Annotated[
        Path | None,
        typer.Option("--validation-chestxray14", help="ChestX-ray14 folder whose images fit the applicability model."),
    ] = None,
    validation_split: Annotated[
        str, typer.Option("--validation-split", help="ChestX-ray14 split for --validation-chestxray14.")
    ] = "test",
    validation_limit: Annotated[
        int, typer.Option("--validation-limit", help="At most this many ChestX-ray14 validation images.")
    ] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Import a CheXNet, torchxrayvision or torchvision DenseNet checkpoint (or a chexd artifact) as an artifact.

    With validation images (--validation-dicom + --validation-labels, or --validation-chestxray14) the artifact gets
    an applicability model fitted on them: images unlike them are then withheld or flagged as outside the model's
    validated domain. Without, a checkpoint gets none (an artifact keeps its own) and the command says so."""
    from daemon.maintenance import imports

    if fmt not in imports.FORMATS:
        fail(f"Invalid --format {fmt!r} - expected one of {', '.join(imports.FORMATS)}", 2)
    if dtype not in ("float32", "float16"):
        fail(f"Invalid --dtype {dtype!r} - expected float32 or float16", 2)
    if validation_dicom is not None and validation_chestxray14 is not None:
        fail("--validation-dicom and --validation-chestxray14 are exclusive - give one validation source", 2)
    if (validation_dicom is None) != (validation_labels is None):
        fail("--validation-dicom and --validation-labels go together (the folder and its label CSV)", 2)
    if validation_limit < 10:
        fail(f"Invalid --validation-limit {validation_limit} - at least 10 validation images are needed", 2)
    validation = guarded(imports.validation_source, validation_dicom, validation_labels, validation_chestxray14,
                         validation_split, validation_limit)
    path = guarded(imports.bundled_path, path)
    summary = guarded(imports.import_model, path, out=out, settings=None if out is not None else _settings(),
                      name=name, fmt=fmt, dtype=dtype, validation=validation)
    _print_import(summary, path, as_json)


def _print_import(summary: dict[str, Any], path: Path, as_json: bool) -> None:
    applicability = summary["applicability"]
    if applicability is None:
        summary["applicability_note"] = NO_VALIDATION
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    stdout.print(
        f"imported {summary['source_format']} {path.name} as {summary['name']} {summary['version']} "
        f"({summary['content_hash']}, {summary['parameters']:,} parameters, {summary['dtype']}) -> {summary['path']}",
        highlight=False,
        markup=False,
    )
    if applicability is None:
        stdout.print(f"[bold yellow]warning:[/] {NO_VALIDATION}", highlight=False)
    else:
        stdout.print(f"applicability: {_applicability_line(applicability)}", highlight=False, markup=False)


NO_VALIDATION = (
    "no validation images were given (--validation-dicom DIR --validation-labels CSV, or --validation-chestxray14 "
    "DIR), so this model has NO applicability model: chexd cannot tell which images lie outside its validated domain"
)


def _applicability_line(summary: dict[str, Any]) -> str:
    return (
        f"{summary['method']}, threshold {summary['threshold']:.4g}, fitted on {summary['n_images']} validation "
        f"images ({summary['source']}); in domain on validation: {summary['validation_in_domain_share']:.1%} "
        f"(target {summary['in_domain_share']:.0%}, "
        + (f"{summary['folds']}-fold cross-fitted)" if summary.get("folds", 1) > 1 else "in-sample: few images)")
    )


# --- registry ------------------------------------------------------------------------------------------------------

def _registry_call(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    from sqlalchemy.exc import SQLAlchemyError

    from daemon.store.registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except RegistryError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"database error: {exc.__class__.__name__}: {exc.args[0] if exc.args else exc}")


def _mean_auroc(metrics: dict[str, Any]) -> float | None:
    for key in ("mean_auroc",):
        if isinstance(metrics.get(key), int | float):
            return float(metrics[key])
    for nested in ("test", "evaluation", "after"):
        value = metrics.get(nested)
        if not isinstance(value, dict):
            continue
        for key in ("mean_auroc", "mean_after"):  # mean_after: a before/after comparison (compress, correct)
            if isinstance(value.get(key), int | float):
                return float(value[key])
    return None


@model_app.command("list")
def list_cmd(as_json: JsonOption = False) -> None:
    """Registered model versions, newest first, with their state (candidate, active, retired)."""
    from rich.table import Table

    from daemon.store.registry import list_versions

    versions = _registry_call(list_versions, _settings())
    if as_json:
        sys.stdout.write(json.dumps([v.to_dict() for v in versions], indent=2) + "\n")
        return
    table = Table("id", "version", "state", "name", "operation", "parent", "mean AUROC", "created", title="models")
    for v in versions:
        auroc = _mean_auroc(v.metrics)
        table.add_row(
            str(v.id),
            v.version,
            f"[bold green]{v.state}[/]" if v.state == "active" else v.state,
            v.name + (" (synthetic)" if v.synthetic else ""),
            v.operation,
            v.parent_version or "-",
            f"{auroc:.4f}" if auroc is not None else "-",
            v.created_at.isoformat(timespec="seconds"),
        )
    stdout.print(table)


@model_app.command("show")
def show_cmd(
    version: Annotated[str, typer.Argument(help="Version (hex prefix), id number, or 'active'.")] = "active",
    as_json: JsonOption = False,
) -> None:
    """One version: its registry row and its manifest (thresholds, architecture size, provenance)."""
    from daemon.store.registry import find_version
    from model.artifact import read_manifest

    info = _registry_call(find_version, _settings(), version)
    manifest = read_manifest(info.path)
    data = info.to_dict() | {
        "thresholds": manifest.thresholds,
        "parameter_count": manifest.parameters,
        "input": manifest.preprocessing.to_dict(),
        "intended_use": manifest.intended_use,
        "provenance": [dict(p) for p in manifest.provenance],
        "applicability": manifest.applicability.summary() if manifest.applicability is not None else None,
    }
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    stdout.print(f"[bold]{info.name}[/] {info.version} - {info.state}", highlight=False)
    if info.synthetic:
        stdout.print("[bold red]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")
    stdout.print(f"path: {info.path}", highlight=False, markup=False)
    stdout.print(f"parameters: {manifest.parameters:,}; input {manifest.preprocessing.input_size} px", highlight=False)
    stdout.print("provenance: " + " -> ".join(p["operation"] for p in manifest.provenance), highlight=False)
    stdout.print("thresholds: " + ", ".join(f"{k} {v:.3f}" for k, v in manifest.thresholds.items()), highlight=False)
    if manifest.applicability is None:
        stdout.print("applicability: [bold yellow]none[/] - images outside the validated domain cannot be told apart")
    else:
        stdout.print(f"applicability: {_applicability_line(data['applicability'])}", highlight=False, markup=False)


@model_app.command("activate")
def activate_cmd(
    version: Annotated[str, typer.Argument(help="Version (hex prefix) or id number from 'chexd model list'.")],
    as_json: JsonOption = False,
) -> None:
    """Make a version active. A running daemon switches to it between jobs, without a restart; audited."""
    from daemon.store.registry import activate

    info, previous = _registry_call(activate, _settings(), version)
    _report_activation(info, previous, as_json)


@model_app.command("rollback")
def rollback_cmd(as_json: JsonOption = False) -> None:
    """Re-activate the version that was active before the current one."""
    from daemon.store.registry import rollback

    info, previous = _registry_call(rollback, _settings())
    _report_activation(info, previous, as_json)


def _report_activation(info: Any, previous: str | None, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"active": info.version, "previous": previous}) + "\n")
        return
    stdout.print(f"active model: {info.name} {info.version} (was {previous or 'none'})", highlight=False)


@model_app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(help="First version (default: its parent when only one is given).")],
    b: Annotated[str | None, typer.Argument(help="Second version (default: the active one).")] = None,
    as_json: JsonOption = False,
) -> None:
    """What changed between two versions: thresholds, classifier weights per finding, architecture, metrics."""
    from daemon.store.registry import find_version
    from model.artifact import diff_artifacts

    settings = _settings()
    first = _registry_call(find_version, settings, a)
    second = _registry_call(find_version, settings, b or "active")
    data = {"a": first.version, "b": second.version} | diff_artifacts(first.path, second.path)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    stdout.print(f"{first.version} -> {second.version}", highlight=False)
    stdout.print(f"parameters: {data['parameters'][0]:,} -> {data['parameters'][1]:,}", highlight=False)
    for label, (t0, t1) in data["thresholds"].items():
        stdout.print(f"threshold {label}: {t0:.4f} -> {t1:.4f}", highlight=False)
    for label, n in data["classifier_changes"].items():
        stdout.print(f"classifier row {label}: {n} weight(s) changed", highlight=False)
    if data["backbone_changed"]:
        stdout.print("backbone weights differ", highlight=False)
    if not (data["thresholds"] or data["classifier_changes"] or data["backbone_changed"]):
        stdout.print("weights and thresholds are identical", highlight=False)
