"""The maintenance layer: what every model-maintenance job (calibrate, correct, finetune, compress, decide) shares.

A job loads its parent version (:func:`load_parent`), gets labelled validation data (:func:`labelled_source`,
:func:`validation_features`, cached pooled features), runs inside an admin-job record (:func:`run_job`) and derives a
child artifact (:func:`write_candidate`): a new version (:func:`child_version`, one rule for every job), the parent's
provenance plus one entry per step, the job's report (including the check of the *saved* weights) inside the
manifest's metrics, registered as a *candidate*. Nothing here activates a model (``chexd model activate`` does).

A library: no Typer, no printing. Progress goes through a ``(stage, done, total)`` callback; expected failures are
raised as :class:`MaintenanceError`, whose message a person can act on (the CLI prints it and exits 1, or 2 when
``usage`` is set: the options themselves are wrong).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.errors import ERROR_EXIT, SETTINGS_EXIT, DaemonError

if TYPE_CHECKING:
    from torch import nn

    from daemon.settings import Settings
    from daemon.store.registry import AdminJobHandle
    from model.artifact import Manifest
    from model.datasets import LabelledSource
    from model.features import FeatureSet

__all__ = [
    "MAJOR_OPERATIONS",
    "Candidate",
    "MaintenanceError",
    "Parent",
    "Progress",
    "SourceOptions",
    "backbone_check",
    "child_version",
    "feature_cache_dir",
    "labelled_source",
    "load_parent",
    "run_job",
    "validation_features",
    "write_candidate",
]

Progress = Callable[[str, int, int], None]
T = TypeVar("T")

# operations that change the network's architecture (not only its head or thresholds): a new MINOR version
MAJOR_OPERATIONS = frozenset({"compress"})
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:[-+][0-9A-Za-z.+-]+)?$")


class MaintenanceError(DaemonError):
    """A maintenance job cannot run or cannot finish; the message names the value and what to do.

    ``usage`` is True when the options themselves are wrong (the CLI exits 2), False otherwise (exit 1)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage
        self.exit_code = SETTINGS_EXIT if usage else ERROR_EXIT


def _quiet(stage: str, done: int, total: int) -> None:
    return None


# --- the version rule ------------------------------------------------------------------------------------------------


def child_version(parent_version: str, operation: str) -> str:
    """The manifest version of an artifact derived from ``parent_version`` by ``operation``; always a new one.

    An operation in :data:`MAJOR_OPERATIONS` (one that changes the architecture, e.g. ``compress``) bumps MINOR and
    resets PATCH ('1.2.3' -> '1.3.0'); every other (thresholds, head weights, composed head/threshold steps) bumps
    PATCH ('1.2.3' -> '1.2.4'). A pre-release or build suffix of the parent is dropped ('1.2.3-rc1' -> '1.2.4').
    The registry tells two children of one parent apart by their ``version_id`` (a content hash), not by this string.
    Raises ValueError for a version that is not MAJOR.MINOR.PATCH or an empty operation."""
    match = _SEMVER.match(parent_version) if isinstance(parent_version, str) else None
    if match is None:
        raise ValueError(f"Invalid parent_version {parent_version!r} - expected MAJOR.MINOR.PATCH, e.g. '1.0.0'")
    if not isinstance(operation, str) or not operation:
        raise ValueError(f"Invalid operation {operation!r} - expected a non-empty name such as 'calibrate'")
    major, minor, patch = (int(part) for part in match.groups())
    if operation in MAJOR_OPERATIONS:
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


# --- the parent ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Parent:
    """The version a job starts from: ``network`` (eval mode, float32, CPU), its ``manifest``, and ``path`` (the
    artifact it was loaded from)."""

    network: nn.Module
    manifest: Manifest
    path: Path

    def info(self) -> dict[str, Any]:
        """``{name, version (version_id), synthetic}`` as the commands print it."""
        m = self.manifest
        return {"name": m.name, "version": m.version_id, "synthetic": m.synthetic}


def load_parent(settings: Settings, model: Path | None) -> Parent:
    """The artifact ``model`` (a folder, .json or .safetensors), else the active model (registry, ``model_path`` or
    the bundled demo). Raises MaintenanceError when there is none or it fails verification on load."""
    from daemon.store.registry import active_model_path
    from model.artifact import load_artifact
    from model.errors import ModelError

    try:
        path = model if model is not None else active_model_path(settings)
        if path is None:
            raise MaintenanceError("no model: pass --model PATH, import one ('chexd model import') or set model_path")
        network, manifest = load_artifact(path)
    except ModelError as exc:
        raise MaintenanceError(str(exc)) from exc
    return Parent(network=network, manifest=manifest, path=Path(path))


# --- validation data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceOptions:
    """The labelled data a job's validation options name: at most one of ``phantom`` (a split: train, val, test),
    ``chestxray14`` (a folder, with ``split``: test or train_val) or ``dicom_dir`` (with ``labels``, a CSV); none:
    the phantom split ``default_phantom``. ``count`` phantom images of series ``seed``, rendered at ``render_size``
    px. Raises MaintenanceError(usage=True) for conflicting options."""

    phantom: str | None = None
    count: int = 300
    seed: int = 0
    render_size: int = 256
    chestxray14: Path | None = None
    split: str = "test"
    dicom_dir: Path | None = None
    labels: Path | None = None
    default_phantom: str = "val"

    def __post_init__(self) -> None:
        chosen = [
            name
            for name, value in (
                ("--phantom", self.phantom),
                ("--chestxray14", self.chestxray14),
                ("--dicom-dir", self.dicom_dir),
            )
            if value is not None
        ]
        if len(chosen) > 1:
            raise MaintenanceError(f"choose one validation source: {' and '.join(chosen)} were both given", usage=True)
        if self.labels is not None and self.dicom_dir is None:
            raise MaintenanceError(
                "--labels goes with --dicom-dir (or with --predictions for 'chexd calibrate')", usage=True
            )
        if self.dicom_dir is not None and self.labels is None:
            raise MaintenanceError(
                "--dicom-dir needs --labels CSV (an id column matching SOPInstanceUID or file "
                "name, and 'Finding Labels' or one 0/1 column per finding)",
                usage=True,
            )
        if self.count < 1:
            raise MaintenanceError(f"Invalid --count {self.count} - must be >= 1", usage=True)

    @property
    def is_phantom(self) -> bool:
        return self.chestxray14 is None and self.dicom_dir is None

    @property
    def phantom_split(self) -> str:
        return self.phantom or self.default_phantom

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters (paths as strings), for job records and provenance."""
        if self.is_phantom:
            return {
                "phantom": self.phantom_split,
                "count": self.count,
                "seed": self.seed,
                "render_size": self.render_size,
            }
        if self.chestxray14 is not None:
            return {"chestxray14": str(self.chestxray14), "split": self.split}
        return {"dicom_dir": str(self.dicom_dir), "labels": str(self.labels)}


def labelled_source(options: SourceOptions) -> LabelledSource:
    """The ``model.datasets`` source the options name (phantom images rendered at 256 px, as before). Raises
    MaintenanceError for an unusable folder or labels file, or (usage) an unknown phantom split."""
    from model.datasets import ChestXray14Folder, DatasetError, DicomFolder, PhantomSource

    try:
        if options.chestxray14 is not None:
            return ChestXray14Folder(options.chestxray14, split=options.split)
        if options.dicom_dir is not None:
            return DicomFolder(options.dicom_dir, options.labels)  # type: ignore[arg-type]
        return PhantomSource(options.phantom_split, seed=options.seed, count=options.count)
    except DatasetError as exc:
        raise MaintenanceError(str(exc), usage=options.is_phantom) from exc


def feature_cache_dir(settings: Settings) -> Path:
    """Where pooled features are cached: ``<data_dir>/cache/features``."""
    return settings.data_dir / "cache" / "features"


def validation_features(
    settings: Settings,
    parent: Parent,
    source: SourceOptions,
    *,
    device: str = "auto",
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[FeatureSet, bool]:
    """``(features, from_cache)``: pooled final features [N, C] of the source the options name, computed with the
    parent's network once and cached under :func:`feature_cache_dir` by weights hash + data source +
    preprocessing. Raises MaintenanceError for an unknown phantom split (usage), an unusable source, or an image
    that fails to decode."""
    from model.errors import ModelError
    from model.features import cached_features, phantom_features, phantom_source_key, source_features, source_key
    from model.train import SPLITS

    report = progress or _quiet
    manifest, network = parent.manifest, parent.network
    recipe = manifest.preprocessing
    try:
        if source.is_phantom:
            split_name = source.phantom_split
            if split_name not in SPLITS:
                raise MaintenanceError(
                    f"Invalid --phantom {split_name!r} - expected one of {', '.join(SPLITS)}", usage=True
                )
            return cached_features(
                feature_cache_dir(settings),
                weights_sha256=manifest.weights_sha256,
                data_key=phantom_source_key(
                    split_name, seed=source.seed, count=source.count, render_size=source.render_size
                ),
                recipe=recipe,
                compute=lambda: phantom_features(
                    network,
                    recipe=recipe,
                    split=split_name,
                    seed=source.seed,
                    count=source.count,
                    render_size=source.render_size,
                    batch_size=batch_size,
                    device=device,
                    progress=report,
                ),
            )
        labelled = labelled_source(source)
        return cached_features(
            feature_cache_dir(settings),
            weights_sha256=manifest.weights_sha256,
            data_key=source_key(labelled),
            recipe=recipe,
            compute=lambda: source_features(
                network, labelled, recipe=recipe, batch_size=batch_size, device=device, progress=report
            ),
        )
    except ModelError as exc:
        raise MaintenanceError(str(exc)) from exc


# --- the admin-job record --------------------------------------------------------------------------------------------


def run_job(settings: Settings, kind: str, params: Mapping[str, Any], work: Callable[[AdminJobHandle], T]) -> T:
    """``work(job)`` inside an admin-job record of ``kind`` (``running`` now; ``done``, ``refused`` (set
    ``job.state``) or ``failed`` when it ends). Expected failures (model, data, registry, database, file errors and
    ValueError) are re-raised as MaintenanceError with an actionable message; the job row says ``failed``."""
    from sqlalchemy.exc import SQLAlchemyError

    from daemon.store.registry import RegistryError, admin_job
    from model.errors import ModelError

    try:
        with admin_job(settings, kind, dict(params)) as job:
            return work(job)
    except MaintenanceError:
        raise
    except (ModelError, ValueError, RegistryError) as exc:
        raise MaintenanceError(str(exc)) from exc
    except SQLAlchemyError as exc:
        raise MaintenanceError(f"database error: {exc.__class__.__name__}: {exc.args[0] if exc.args else exc}") from exc
    except OSError as exc:
        raise MaintenanceError(f"cannot {kind}: {exc}") from exc


# --- the child artifact ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """A registered candidate version: registry ``id``, ``version`` (the manifest's ``version_id``, what ``chexd
    model activate`` takes), ``manifest_version`` (the semantic version from :func:`child_version`), ``path`` (the
    registered manifest), ``state`` ('candidate') and ``report`` (the job's report as written into the manifest,
    including ``saved_artifact``: what the check found on the reloaded weights)."""

    id: int
    version: str
    manifest_version: str
    path: Path
    state: str
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{id, version, manifest_version, path, state}`` (the report is returned beside it by the commands)."""
        return {
            "id": self.id,
            "version": self.version,
            "manifest_version": self.manifest_version,
            "path": str(self.path),
            "state": self.state,
        }


def write_candidate(
    settings: Settings,
    network: nn.Module,
    parent_manifest: Manifest,
    *,
    operation: str,
    params: Mapping[str, Any],
    report: Mapping[str, Any],
    check: Callable[[nn.Module], Mapping[str, Any]],
    thresholds: Mapping[str, float] | None = None,
    extra_provenance: Sequence[tuple[str, Mapping[str, Any]]] = (),
    metrics: Mapping[str, Any] | None = None,
    report_key: str | None = None,
    name: str | None = None,
    applicability_inputs: Any = None,
) -> Candidate:
    """Save ``network`` as a child of ``parent_manifest``, reload it, run ``check(reloaded)`` (raises on failure;
    returns what the saved weights showed, stored as ``report["saved_artifact"]``), write it again with that report
    inside the manifest and register it as a candidate. Never activates.

    - version: :func:`child_version` (parent's version, ``operation``); name, preprocessing, intended use, labels,
      dtype and synthetic flag: the parent's (``name`` overrides the name).
    - thresholds: the parent's, with ``thresholds`` (label -> value in (0, 1)) replacing those it names.
    - provenance: the parent's, then one entry per ``extra_provenance`` (operation, parameters) step (oldest first,
      for a job composing several steps), then ``(operation, params)``; each names the parent's weights hash.
    - metrics: ``metrics`` (default: the parent's) plus ``{report_key or operation: report}``; the registry row gets
      the same.
    - applicability model: fitted on ``applicability_inputs`` (prepared validation inputs [N, channels, S, S] the job
      already has, pooled by ``network``) when given; else the parent's, which stays exact for a job that leaves the
      feature extractor alone (thresholds, head edits). A job that changes the architecture must pass inputs.
    Raises ValueError when the check fails or the bytes written twice differ, ArtifactError for unsavable weights,
    RegistryError when registration fails (inside :func:`run_job` these become MaintenanceError)."""
    from daemon.store.registry import register_candidate
    from model.artifact import load_artifact, provenance_entry, read_manifest, save_artifact

    key = report_key or operation
    version = child_version(parent_manifest.version, operation)
    entries = [
        provenance_entry(step, dict(step_params), parent_sha256=parent_manifest.weights_sha256)
        for step, step_params in extra_provenance
    ]
    entries.append(provenance_entry(operation, dict(params), parent_sha256=parent_manifest.weights_sha256))
    child_thresholds = dict(parent_manifest.thresholds)
    if thresholds is not None:
        unknown = sorted(set(thresholds) - set(parent_manifest.labels))
        if unknown:
            raise ValueError(f"Invalid thresholds: unknown labels {unknown} - expected {list(parent_manifest.labels)}")
        child_thresholds.update({label: float(value) for label, value in thresholds.items()})
    base = dict(parent_manifest.metrics if metrics is None else metrics)
    artifact_name = name or parent_manifest.name
    applicability = _child_applicability(network, parent_manifest, applicability_inputs, operation)

    def save(model: nn.Module, folder: Path, content: Mapping[str, Any]) -> Path:
        return save_artifact(
            model,  # type: ignore[arg-type]
            folder,
            name=artifact_name,
            version=version,
            preprocessing=parent_manifest.preprocessing,
            intended_use=parent_manifest.intended_use,
            labels=parent_manifest.labels,
            thresholds=child_thresholds,
            provenance=(*parent_manifest.provenance, *entries),
            metrics=base | {key: dict(content)},
            synthetic=parent_manifest.synthetic,
            dtype=parent_manifest.dtype,
            applicability=applicability,
        )

    with tempfile.TemporaryDirectory(prefix=f"chexd-{operation}-") as tmp:
        first = save(network, Path(tmp) / "check", report)
        reloaded, _ = load_artifact(first)
        final = dict(report) | {"saved_artifact": dict(check(reloaded))}
        # the manifest carries the report including that check: the same weights written again (same bytes, same hash)
        written = save(reloaded, Path(tmp) / artifact_name, final)
        if read_manifest(written).weights_sha256 != read_manifest(first).weights_sha256:
            raise ValueError("writing the checked weights again gave different bytes - nothing was registered")
        info = register_candidate(
            settings,
            written,
            operation=operation,
            parameters=dict(params),
            metrics=base | {key: final} if metrics is not None else {key: final},
        )
    return Candidate(
        id=info.id, version=info.version, manifest_version=version, path=info.path, state=info.state, report=final
    )


def _child_applicability(network: nn.Module, parent: Manifest, inputs: Any, operation: str) -> Any:
    """The child's applicability model (see :func:`write_candidate`). Raises ValueError when the architecture changed
    and no inputs were given while the parent had one (its feature space is not the child's)."""
    if inputs is not None:
        from model.train import fit_applicability_on

        return fit_applicability_on(network, inputs, source=f"{operation} job validation inputs ({len(inputs)} images)")
    architecture = getattr(network, "architecture", parent.architecture)
    if parent.applicability is not None and architecture != parent.architecture:
        raise ValueError(f"{operation} changed the architecture: its applicability model must be fitted again - pass "
                         "applicability_inputs")
    return parent.applicability


def backbone_check(parent: nn.Module, reloaded: nn.Module) -> tuple[bool, int]:
    """(every non-classifier tensor equal, number of classifier weights + biases that differ) between two networks
    of the same architecture: what a head-only job may change."""
    import torch

    a, b = parent.state_dict(), reloaded.state_dict()
    backbone = all(torch.equal(a[k], b[k]) for k in a if not k.startswith("classifier."))
    changed = int((a["classifier.weight"] != b["classifier.weight"]).sum())
    changed += int((a["classifier.bias"] != b["classifier.bias"]).sum())
    return backbone, changed
