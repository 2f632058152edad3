"""Importing a model (``chexd model import``): a CheXNet, torchxrayvision or torchvision DenseNet checkpoint, a chexd
artifact or a bundled demo model written as an artifact - into a folder, or into ``<data_dir>/models`` and registered
as a candidate - with an applicability model fitted on validation images when they are given."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.errors import MaintenanceError

if TYPE_CHECKING:
    from daemon.settings import Settings
    from model.datasets import LabelledSource

__all__ = ["FORMATS", "bundled_path", "fit_validation", "import_model", "summary", "validation_source"]

FORMATS = ("auto", "chexnet", "xrv", "torchvision", "artifact")


def bundled_path(path: Path) -> Path:
    """``path``, or for ``bundled:full`` / ``bundled:compressed`` the demo model shipped with chexd. Raises
    MaintenanceError(usage) for an unknown name or one this build does not ship."""
    if not str(path).startswith("bundled:"):
        return path
    from daemon.store.registry import BUNDLED, bundled_demo_model

    which = str(path).removeprefix("bundled:")
    try:
        found = bundled_demo_model(which)
    except ValueError as exc:
        raise MaintenanceError(f"Invalid bundled model {which!r} - expected bundled:{' or bundled:'.join(BUNDLED)}",
                               usage=True) from exc
    if found is None:
        raise MaintenanceError(f"this build of chexd ships no {which} demo model", usage=True)
    return found


def validation_source(dicom: Path | None, labels: Path | None, chestxray14: Path | None, split: str, limit: int
                      ) -> LabelledSource | None:
    """The labelled source of the --validation-* options, or None. Raises MaintenanceError for an unusable folder."""
    from model.datasets import ChestXray14Folder, DatasetError, DicomFolder

    try:
        if dicom is not None and labels is not None:
            return DicomFolder(dicom, labels)
        if chestxray14 is not None:
            return ChestXray14Folder(chestxray14, split=split, limit=limit)
    except DatasetError as exc:
        raise MaintenanceError(f"validation images: {exc}") from exc
    return None


def fit_validation(manifest_file: Path, source: Any) -> Path:
    """Fit the artifact's applicability model on the pooled features of ``source`` (a ``model.datasets``
    LabelledSource) and rewrite its manifest (weights untouched). Raises ModelError (features) or ValueError (too
    few images)."""
    from model.applicability import fit_applicability
    from model.artifact import load_artifact, set_applicability
    from model.features import source_features

    if len(source) < 10:
        raise ValueError(f"validation images: {len(source)} found - at least 10 are needed for an applicability model")
    network, manifest = load_artifact(manifest_file)
    features = source_features(network, source, recipe=manifest.preprocessing)
    model = fit_applicability(features.pooled, source=source.description)
    return set_applicability(manifest_file, model)


def _import_to_registry(
    path: Path, models_dir: Path, *, name: str | None, fmt: str, dtype: str, validation: Any = None
) -> Path:
    """Import into ``models_dir/<name>-<hash12>/`` (fitting the applicability model on ``validation`` when given);
    an identical import already there is kept as it is."""
    from model.artifact import read_manifest
    from model.checkpoints import import_checkpoint

    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=models_dir))
    try:
        staged = import_checkpoint(path, staging, name=name, format=fmt, dtype=dtype)  # type: ignore[arg-type]
        if validation is not None:
            fit_validation(staged, validation)
        manifest = read_manifest(staged)
        final = models_dir / f"{manifest.name}-{manifest.short_hash}"
        if not final.exists():
            staging.rename(final)
        return final / staged.name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summary(manifest_file: Path) -> dict[str, Any]:
    """What ``chexd model import`` reports of an artifact: path, name, version, hashes, size, input, applicability."""
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
        "applicability": manifest.applicability.summary() if manifest.applicability is not None else None,
    }


def import_model(path: Path, *, out: Path | None, settings: Settings | None, name: str | None, fmt: str, dtype: str,
                 validation: LabelledSource | None) -> dict[str, Any]:
    """Import ``path`` into ``out`` (nothing registered), or - ``out`` None - into ``<data_dir>/models`` of
    ``settings`` and register it as a candidate (``summary['registry']``); the :func:`summary` of the written
    artifact. Raises MaintenanceError for a checkpoint that cannot be read or written, too few validation images or
    an applicability model that cannot be fitted; RegistryError when registration fails."""
    from model.checkpoints import import_checkpoint
    from model.errors import ModelError

    try:
        if out is not None:
            manifest_file = import_checkpoint(path, out, name=name, format=fmt, dtype=dtype)  # type: ignore[arg-type]
            if validation is not None:
                fit_validation(manifest_file, validation)
            return summary(manifest_file)
        assert settings is not None, "importing into the registry needs the settings"
        manifest_file = _import_to_registry(path, settings.data_dir / "models", name=name, fmt=fmt, dtype=dtype,
                                            validation=validation)
        found = summary(manifest_file)
        from daemon.store.registry import register_candidate

        info = register_candidate(settings, manifest_file, operation="import",
                                  parameters={"source": str(path), "format": fmt})
        return found | {"registry": {"version": info.version, "state": info.state}}
    except (ModelError, ValueError) as exc:  # ValueError: too few validation images, an unfittable applicability
        raise MaintenanceError(str(exc)) from exc
    except OSError as exc:
        raise MaintenanceError(f"cannot import {path}: {exc}") from exc
