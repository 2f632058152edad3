"""The labelled validation data a job's options name, and its pooled features (computed once, cached)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.errors import MaintenanceError, Progress, quiet

if TYPE_CHECKING:
    from daemon.maintenance.parent import Parent
    from daemon.settings import Settings
    from model.datasets import LabelledSource
    from model.features import FeatureSet

__all__ = ["SourceOptions", "feature_cache_dir", "labelled_source", "validation_features"]


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

    report = progress or quiet
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
