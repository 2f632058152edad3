"""chexd model artifacts: safetensors weights plus a JSON manifest, verified on load.

An artifact is two files side by side, ``<name>.safetensors`` and ``<name>.json`` (usually alone in a folder named
``<name>-<hash12>``). The manifest says what the weights are and how to use them: labels in output order, per-label
decision thresholds, the preprocessing recipe, the architecture's channel counts, the provenance chain (every
operation that produced this version from its parent, with the parent's weight hash), metrics, intended use, and the
sha256 of the weights file. :func:`load_artifact` refuses an artifact whose weights do not match that hash, whose
state dict does not match the architecture, or whose dummy forward pass does not give one finite logit per label.

The manifest itself (:class:`Manifest`, :func:`read_manifest`, :func:`provenance_entry`, :class:`ArtifactError` ...)
lives in the torch-free :mod:`model.manifest`; this module re-exports those names, so either import path works.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.applicability import ApplicabilityModel
from model.manifest import (
    FORMAT,
    SYNTHETIC_NOTICE,
    ArtifactError,
    Dtype,
    Manifest,
    content_hash,
    manifest_path,
    provenance_entry,
    read_manifest,
    sha256_file,
)
from model.network import DenseNet
from model.types import LABELS, PreprocessRecipe

__all__ = [
    "ArtifactError",
    "Dtype",
    "FORMAT",
    "Manifest",
    "SYNTHETIC_NOTICE",
    "content_hash",
    "diff_artifacts",
    "load_artifact",
    "manifest_path",
    "provenance_entry",
    "read_manifest",
    "save_artifact",
    "set_applicability",
    "sha256_file",
]

_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


def _paths(path: Path, name: str | None) -> tuple[Path, Path]:
    """(manifest, weights) for a ``.json``/``.safetensors`` path or a folder holding ``<name>.json``."""
    path = Path(path)
    if path.suffix == ".json":
        return path, path.with_suffix(".safetensors")
    if path.suffix == ".safetensors":
        return path.with_suffix(".json"), path
    if name is None:
        return manifest_path(path), manifest_path(path).with_suffix(".safetensors")
    return path / f"{name}.json", path / f"{name}.safetensors"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_artifact(
    model: DenseNet,
    path: str | os.PathLike[str],
    *,
    name: str,
    preprocessing: PreprocessRecipe,
    intended_use: str,
    version: str = "1.0.0",
    labels: Sequence[str] = LABELS,
    thresholds: Mapping[str, float] | None = None,
    provenance: Sequence[Mapping[str, Any]] = (),
    metrics: Mapping[str, Any] | None = None,
    synthetic: bool = False,
    dtype: Dtype = "float16",
    applicability: ApplicabilityModel | None = None,
) -> Path:
    """Write ``model`` as an artifact and return the manifest's path.

    ``path``: a folder (created; files ``<name>.safetensors`` and ``<name>.json`` inside) or a ``.json`` /
    ``.safetensors`` path (the other file goes beside it). Floating-point tensors are stored as ``dtype``;
    ``thresholds`` defaults to 0.5 per label; ``applicability``: the artifact's out-of-domain model (see
    :mod:`model.applicability`). Files are written atomically, weights first.
    Raises ArtifactError for non-finite weights (also after a float16 cast) or an invalid manifest field.
    """
    if not isinstance(model, DenseNet):
        raise ArtifactError(f"cannot save {type(model).__name__} - expected a model.network.DenseNet")
    if dtype not in _DTYPES:
        raise ArtifactError(f"Invalid dtype {dtype!r} - expected 'float16' or 'float32'")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(_DTYPES[dtype])
            if not torch.isfinite(tensor).all():
                raise ArtifactError(f"cannot save {name}: {key!r} has non-finite values as {dtype}")
        tensors[key] = tensor.contiguous().clone()
    manifest_file, weights_file = _paths(Path(path), name)
    manifest_file.parent.mkdir(parents=True, exist_ok=True)
    labels = tuple(labels)
    draft = dict(
        name=name,
        version=version,
        labels=labels,
        thresholds=dict(thresholds) if thresholds is not None else dict.fromkeys(labels, 0.5),
        preprocessing=preprocessing,
        architecture=model.architecture,
        provenance=tuple(provenance),
        metrics=dict(metrics or {}),
        intended_use=intended_use,
        synthetic=synthetic,
        dtype=dtype,
        parameters=model.architecture.parameters(),
        applicability=applicability,
    )
    try:  # validate the manifest before writing anything
        Manifest(weights_sha256="0" * 64, **draft)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ArtifactError(f"cannot save {name}: {exc}") from None
    _atomic_write(weights_file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    manifest = Manifest(weights_sha256=sha256_file(weights_file), **draft)  # type: ignore[arg-type]
    text = json.dumps(manifest.to_dict(), sort_keys=True, indent=2) + "\n"
    _atomic_write(manifest_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return manifest_file


def set_applicability(path: str | os.PathLike[str], applicability: ApplicabilityModel | None) -> Path:
    """Rewrite an artifact's manifest with ``applicability`` (None removes it); the weights are not touched, the
    version id changes. Returns the manifest's path. Raises ArtifactError for an unreadable manifest or a model of
    another feature width."""
    manifest_file = manifest_path(Path(path))
    data = read_manifest(manifest_file).to_dict()
    data.pop("applicability", None)
    if applicability is not None:
        data["applicability"] = applicability.to_dict()
    try:
        manifest = Manifest.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{manifest_file}: {exc}") from None
    text = json.dumps(manifest.to_dict(), sort_keys=True, indent=2) + "\n"
    _atomic_write(manifest_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return manifest_file


def _names(keys: Sequence[str] | set[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_artifact(path: str | os.PathLike[str]) -> tuple[DenseNet, Manifest]:
    """Load and verify an artifact; return the model (eval mode, float32, CPU) and its manifest.

    ``path``: the artifact's folder, its ``.json`` manifest or its ``.safetensors`` weights.
    Raises ArtifactError naming the file when: the manifest is missing, unreadable or invalid (missing fields,
    label count != architecture outputs, a threshold outside (0, 1) ...); the weights' sha256 differs from the
    manifest's; tensor keys are missing or extra (listed by name), shapes or dtype differ from the manifest; or a
    dummy forward on zeros ``[1, channels, input_size, input_size]`` does not return ``[1, n_labels]`` finite logits.
    """
    manifest = read_manifest(path)
    manifest_file = manifest_path(Path(path))
    weights_file = manifest_file.with_suffix(".safetensors")
    if not weights_file.is_file():
        raise ArtifactError(f"{weights_file}: weights file not found (manifest {manifest_file.name})")
    actual = sha256_file(weights_file)
    if actual != manifest.weights_sha256:
        raise ArtifactError(
            f"{weights_file}: weights do not match manifest hash: expected {manifest.weights_sha256} got {actual}"
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{weights_file}: cannot read safetensors: {exc}") from None
    model = DenseNet(manifest.architecture)
    expected = model.state_dict()
    missing = set(expected) - set(tensors)
    extra = set(tensors) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected: {_names(extra)}")
        raise ArtifactError(f"{weights_file}: state dict does not match the architecture - {'; '.join(parts)}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ArtifactError(
                f"{weights_file}: {key!r} has shape {list(tensor.shape)}, the architecture expects "
                f"{list(expected[key].shape)}"
            )
        if tensor.is_floating_point() and tensor.dtype != _DTYPES[manifest.dtype]:
            raise ArtifactError(f"{weights_file}: {key!r} is {tensor.dtype}, the manifest says {manifest.dtype}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    model.eval()
    size = manifest.preprocessing.input_size
    with torch.inference_mode():
        out = model(torch.zeros(1, manifest.preprocessing.channels, size, size))
    if out.shape != (1, len(manifest.labels)) or not torch.isfinite(out).all():
        raise ArtifactError(
            f"{weights_file}: dummy forward gave {list(out.shape)} "
            f"{'finite' if torch.isfinite(out).all() else 'non-finite'} outputs - expected [1, {len(manifest.labels)}] "
            "finite logits"
        )
    return model, manifest


def diff_artifacts(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> dict[str, Any]:
    """What differs from artifact ``a`` to ``b`` (both verified on load).

    Returns ``parameters`` (a, b); ``thresholds``: label -> (a, b) for changed ones; ``classifier_changes``:
    label -> number of changed weights in that class row (bias included); ``backbone_changed``: whether any
    non-classifier tensor differs (always true when the architectures differ); ``metrics``: (a, b)."""
    model_a, man_a = load_artifact(a)
    model_b, man_b = load_artifact(b)
    thresholds = {
        label: (man_a.thresholds.get(label), man_b.thresholds.get(label))
        for label in man_b.labels
        if man_a.thresholds.get(label) != man_b.thresholds.get(label)
    }
    sa, sb = model_a.state_dict(), model_b.state_dict()
    changes: dict[str, int] = {}
    if man_a.architecture == man_b.architecture and man_a.labels == man_b.labels:
        diff_w = (sa["classifier.weight"] != sb["classifier.weight"]).sum(dim=1)
        diff_b = sa["classifier.bias"] != sb["classifier.bias"]
        for i, label in enumerate(man_b.labels):
            n = int(diff_w[i]) + int(diff_b[i])
            if n:
                changes[label] = n
        backbone = any(not torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("classifier."))
    else:
        backbone = True
    return {
        "parameters": (man_a.parameters, man_b.parameters),
        "thresholds": thresholds,
        "classifier_changes": changes,
        "backbone_changed": backbone,
        "metrics": (man_a.metrics, man_b.metrics),
    }
