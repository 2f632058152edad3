"""An artifact's manifest without torch: :class:`Manifest`, reading and validating it, and the small helpers it needs.

The manifest (``<name>.json`` beside ``<name>.safetensors``) says what the weights are and how to use them; see
:mod:`model.artifact` for the whole artifact (writing, loading the weights, verification). This module imports no
torch, so the daemon, the reporting layer and command-line tools can type and read manifests without loading a model
(a test holds that). :mod:`model.artifact` re-exports every name here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from model.applicability import ApplicabilityError, ApplicabilityModel
from model.architecture import Architecture
from model.errors import ModelError
from model.types import PreprocessRecipe

__all__ = [
    "FORMAT",
    "SYNTHETIC_NOTICE",
    "ArtifactError",
    "Dtype",
    "Manifest",
    "content_hash",
    "manifest_path",
    "provenance_entry",
    "read_manifest",
    "sha256_file",
]

FORMAT = "chexd-artifact/1"
SYNTHETIC_NOTICE = "synthetic demo model, not for diagnosis"
Dtype = Literal["float16", "float32"]
_DTYPE_NAMES = ("float16", "float32")  # model.artifact maps them to torch dtypes
_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.+-]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = (
    "name",
    "version",
    "labels",
    "thresholds",
    "preprocessing",
    "architecture",
    "provenance",
    "metrics",
    "intended_use",
    "synthetic",
    "weights_sha256",
    "dtype",
    "parameters",
)


class ArtifactError(ModelError, ValueError):
    """An artifact cannot be written or is not what its manifest says; the message names the file and the problem."""


def _tool() -> str:
    try:
        return f"chexd {importlib.metadata.version('chexd')}"
    except importlib.metadata.PackageNotFoundError:
        return "chexd (unknown version)"


def provenance_entry(
    operation: str, parameters: Mapping[str, Any] | None = None, *, parent_sha256: str | None = None
) -> dict[str, Any]:
    """One provenance record: ``{operation, parameters, parent_sha256, created_at (ISO 8601 UTC), tool}``."""
    return {
        "operation": operation,
        "parameters": dict(parameters or {}),
        "parent_sha256": parent_sha256,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tool": _tool(),
    }


def _check_provenance(entries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    checked = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"Invalid provenance[{i}] {entry!r} - expected a mapping")
        for key in ("operation", "created_at"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ValueError(f"Invalid provenance[{i}]: {key!r} missing - must be a non-empty string")
        try:
            created = datetime.fromisoformat(entry["created_at"])
        except ValueError:
            raise ValueError(
                f"Invalid provenance[{i}] created_at {entry['created_at']!r} - expected ISO 8601"
            ) from None
        if created.tzinfo is None:
            raise ValueError(f"Invalid provenance[{i}] created_at {entry['created_at']!r} - must carry a UTC offset")
        parent = entry.get("parent_sha256")
        if parent is not None and not (isinstance(parent, str) and _SHA256.match(parent)):
            raise ValueError(f"Invalid provenance[{i}] parent_sha256 {parent!r} - expected 64 lowercase hex digits")
        checked.append(dict(entry))
    return tuple(checked)


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """What an artifact's weights are and how to use them.

    - ``labels``: output order of the logits; ``len(labels) == architecture.num_classes``.
    - ``thresholds``: label -> decision threshold on the probability, each in (0, 1), one per label.
    - ``preprocessing``: the recipe; its ``channels`` equals ``architecture.in_channels``.
    - ``provenance``: oldest first; each ``{operation, parameters, parent_sha256, created_at, tool}``.
    - ``metrics``: JSON-able evaluation results (e.g. ``{"mean_auroc": 0.87, ...}``).
    - ``synthetic``: True for models trained on the phantom; their ``intended_use`` must say
      "synthetic demo model, not for diagnosis".
    - ``weights_sha256``: sha256 (hex) of the safetensors file's bytes; ``dtype``: "float16" or "float32" as stored;
      ``parameters``: trainable parameter count, equal to ``architecture.parameters()``.
    - ``applicability``: the out-of-domain model fitted on the validation images' pooled features (None for an
      artifact without one; such manifests omit the field and keep their version ids).
    """

    name: str
    version: str
    labels: tuple[str, ...]
    thresholds: dict[str, float]
    preprocessing: PreprocessRecipe
    architecture: Architecture
    provenance: tuple[dict[str, Any], ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str
    synthetic: bool = False
    weights_sha256: str
    dtype: Dtype
    parameters: int
    applicability: ApplicabilityModel | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"Invalid name {self.name!r} - use 1-100 letters, digits, '.', '_' or '-'")
        if not isinstance(self.version, str) or not _VERSION.match(self.version):
            raise ValueError(f"Invalid version {self.version!r} - expected MAJOR.MINOR.PATCH, e.g. '1.0.0'")
        labels = tuple(self.labels)
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise ValueError(f"Invalid labels {labels!r} - expected non-empty strings")
        if len(set(labels)) != len(labels):
            raise ValueError(f"Invalid labels {labels!r} - duplicates")
        if not isinstance(self.architecture, Architecture):
            raise ValueError(f"Invalid architecture {self.architecture!r} - expected an Architecture")
        if len(labels) != self.architecture.num_classes:
            raise ValueError(
                f"Invalid labels: {len(labels)} labels but the architecture has "
                f"{self.architecture.num_classes} outputs (num_classes)"
            )
        thresholds = dict(self.thresholds)
        missing = [label for label in labels if label not in thresholds]
        extra = sorted(set(thresholds) - set(labels))
        if missing or extra:
            raise ValueError(f"Invalid thresholds: missing for {missing}, unknown labels {extra}")
        for label in labels:
            value = thresholds[label]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise ValueError(f"Invalid threshold for {label!r}: {value!r} - must be in (0, 1)")
        if not isinstance(self.preprocessing, PreprocessRecipe):
            raise ValueError(f"Invalid preprocessing {self.preprocessing!r} - expected a PreprocessRecipe")
        if self.preprocessing.channels != self.architecture.in_channels:
            raise ValueError(
                f"Invalid preprocessing channels {self.preprocessing.channels} - "
                f"the architecture takes {self.architecture.in_channels} input channel(s)"
            )
        provenance = _check_provenance(self.provenance)
        try:
            metrics = json.loads(json.dumps(dict(self.metrics)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Invalid metrics - must be JSON-serialisable: {exc}") from None
        if not isinstance(self.synthetic, bool):
            raise ValueError(f"Invalid synthetic {self.synthetic!r} - expected true or false")
        if not isinstance(self.intended_use, str) or not self.intended_use.strip():
            raise ValueError("Invalid intended_use - must be a non-empty statement")
        if self.synthetic and SYNTHETIC_NOTICE not in self.intended_use.lower():
            raise ValueError(f"Invalid intended_use for a synthetic model - must say {SYNTHETIC_NOTICE!r}")
        if not isinstance(self.weights_sha256, str) or not _SHA256.match(self.weights_sha256):
            raise ValueError(f"Invalid weights_sha256 {self.weights_sha256!r} - expected 64 lowercase hex digits")
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"Invalid dtype {self.dtype!r} - expected 'float16' or 'float32'")
        expected = self.architecture.parameters()
        if self.parameters != expected:
            raise ValueError(f"Invalid parameters {self.parameters!r} - the architecture has {expected}")
        if self.applicability is not None:
            if not isinstance(self.applicability, ApplicabilityModel):
                raise ValueError(f"Invalid applicability {self.applicability!r} - expected an ApplicabilityModel")
            width = self.architecture.feature_channels
            if self.applicability.channels != width:
                raise ValueError(
                    f"Invalid applicability: fitted on {self.applicability.channels} feature channels, "
                    f"the architecture has {width}"
                )
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "thresholds", {label: float(thresholds[label]) for label in labels})
        object.__setattr__(self, "provenance", provenance)
        object.__setattr__(self, "metrics", metrics)

    @property
    def short_hash(self) -> str:
        return content_hash(self)

    @property
    def version_id(self) -> str:
        """The model version as results record it: 16 hex digits of a sha256 over the weights' hash and everything
        that changes outputs or decisions (labels, thresholds, preprocessing, and the applicability model when there
        is one: a manifest without one keeps the id it had before the field existed). A threshold-only
        recalibration is a new version; renaming or new metrics are not."""
        content: dict[str, Any] = {
            "weights_sha256": self.weights_sha256,
            "labels": list(self.labels),
            "thresholds": {k: round(v, 9) for k, v in self.thresholds.items()},
            "preprocessing": self.preprocessing.to_dict(),
        }
        if self.applicability is not None:
            content["applicability"] = self.applicability.to_dict()
        key = json.dumps(content, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-able values (plus ``"format": "chexd-artifact/1"``; ``applicability`` only when
        present)."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "thresholds": dict(self.thresholds),
            "preprocessing": self.preprocessing.to_dict(),
            "architecture": self.architecture.to_dict(),
            "provenance": [dict(p) for p in self.provenance],
            "metrics": dict(self.metrics),
            "intended_use": self.intended_use,
            "synthetic": self.synthetic,
            "weights_sha256": self.weights_sha256,
            "dtype": self.dtype,
            "parameters": self.parameters,
        }
        if self.applicability is not None:
            data["applicability"] = self.applicability.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Inverse of :meth:`to_dict`. Raises ValueError naming missing fields or the first invalid value."""
        if not isinstance(data, Mapping):
            raise ValueError(f"Invalid manifest - expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"Invalid manifest format {data.get('format')!r} - expected {FORMAT!r}")
        missing = [name for name in _FIELDS if name not in data]
        if missing:
            raise ValueError(f"Invalid manifest - missing fields {missing}")
        unknown = sorted(set(data) - set(_FIELDS) - {"format", "applicability"})
        if unknown:
            raise ValueError(f"Invalid manifest - unknown fields {unknown}")
        pre = data["preprocessing"]
        if not isinstance(pre, Mapping):
            raise ValueError(f"Invalid preprocessing {pre!r} - expected an object")
        applicability = None
        if data.get("applicability") is not None:
            try:
                applicability = ApplicabilityModel.from_dict(data["applicability"])
            except ApplicabilityError as exc:
                raise ValueError(f"Invalid applicability: {exc}") from None
        return cls(
            name=data["name"],
            version=data["version"],
            labels=tuple(data["labels"]),
            thresholds=dict(data["thresholds"]),
            preprocessing=PreprocessRecipe(**pre),
            architecture=Architecture.from_dict(data["architecture"]),
            provenance=tuple(data["provenance"]),
            metrics=dict(data["metrics"]),
            intended_use=data["intended_use"],
            synthetic=data["synthetic"],
            weights_sha256=data["weights_sha256"],
            dtype=data["dtype"],
            parameters=data["parameters"],
            applicability=applicability,
        )


def content_hash(manifest: Manifest) -> str:
    """Short id for folder names and display: the first 12 hex digits of :attr:`Manifest.version_id`."""
    return manifest.version_id[:12]


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(path: Path) -> Path:
    """The manifest of an artifact given as its folder, its ``.json`` or its ``.safetensors`` file.

    Raises ArtifactError when a folder holds no manifest or more than one.
    """
    path = Path(path)
    if path.suffix in (".json", ".safetensors") and not path.is_dir():
        return path.with_suffix(".json")
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact - expected a folder, a .json manifest or a .safetensors file")
    found = sorted(p for p in path.glob("*.json") if p.with_suffix(".safetensors").exists())
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ArtifactError(
            f"{path}: expected exactly one <name>.json manifest beside its <name>.safetensors, found {listed}"
        )
    return found[0]


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate an artifact's manifest (no weights). ``path`` as for :func:`load_artifact`."""
    manifest_file = manifest_path(Path(path))
    try:
        data = json.loads(manifest_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_file}: manifest not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_file}: cannot read the manifest: {exc}") from None
    try:
        return Manifest.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{manifest_file}: {exc}") from None
