"""Pooled final features, computed once per (model, data) and cached: the input of correction and head fine-tuning.

For a DenseNet-family model the classifier sees ``ā = mean_hw(A)`` [C], the spatial mean of the post-ReLU final
feature maps, and ``logit = W ā + b``. Everything that only changes the head (zeroing weights of one class row,
refitting W and b) can therefore run on a cached ``pooled`` matrix [N, C] instead of re-running the backbone.

:class:`FeatureSet` holds ``ids``, ``patients``, ``pooled`` float32 [N, C] and ``labels`` uint8 [N, 14] (LABELS order).
:func:`compute_features` fills one from any iterable of ``(id, patient, image, labels)`` items (a decoded image in
[0, 1] or an already prepared tensor); :func:`source_features` and :func:`phantom_features` wrap the labelled sources of
``model.datasets`` and the phantom splits of ``model.train``. :func:`cached_features` keeps them on disk as ``.npz``
keyed by the model's weights sha256, a data-source key and the preprocessing recipe, so a second run is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError
from model.types import LABELS, PreprocessRecipe

if TYPE_CHECKING:
    from model.datasets import LabelledSource

__all__ = [
    "FeatureError",
    "FeatureSet",
    "Item",
    "cached_features",
    "compute_features",
    "phantom_features",
    "phantom_source_key",
    "pooled_features",
    "source_features",
    "source_key",
    "state_digest",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Item = tuple[str, "str | None", "np.ndarray | torch.Tensor", np.ndarray]  # (id, patient, image, labels [14])
_N = len(LABELS)
_CACHE_FORMAT = "chexd-features/1"


class FeatureError(ModelError, ValueError):
    """Features cannot be computed or combined: a bad item, mismatched channel counts, an unreadable cache file."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FeatureSet:
    """Pooled features of N images.

    - ``ids``: image ids (e.g. ``phantom:0:17``, a file name, a SOP Instance UID), ``patients``: None where unknown.
    - ``pooled``: float32 [N, C], the spatial mean of the post-ReLU final features (what the classifier sees).
    - ``labels``: uint8 [N, 14] in ``model.types.LABELS`` order (0/1).
    - ``source``: a human-readable description of where the images came from.
    """

    ids: tuple[str, ...]
    patients: tuple[str | None, ...]
    pooled: np.ndarray
    labels: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "patients", tuple(self.patients))
        n = len(self.ids)
        if not isinstance(self.pooled, np.ndarray) or self.pooled.ndim != 2 or self.pooled.shape[0] != n:
            shape = getattr(self.pooled, "shape", None)
            raise FeatureError(f"Invalid pooled features {shape} - expected float32 [{n}, C] for {n} ids")
        if self.pooled.dtype != np.float32:
            raise FeatureError(f"Invalid pooled features dtype {self.pooled.dtype} - expected float32")
        if not np.all(np.isfinite(self.pooled)):
            raise FeatureError("Invalid pooled features - contain NaN or infinity")
        if self.labels.shape != (n, _N) or self.labels.dtype != np.uint8:
            raise FeatureError(f"Invalid labels {self.labels.shape} {self.labels.dtype} - expected uint8 [{n}, {_N}]")
        if len(self.patients) != n:
            raise FeatureError(f"Invalid patients: {len(self.patients)} for {n} ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def channels(self) -> int:
        """C, the number of feature channels."""
        return int(self.pooled.shape[1])

    def subset(self, index: np.ndarray | Sequence[int]) -> FeatureSet:
        """The images selected by a boolean mask [N] or integer indices, in that order."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise FeatureError(f"Invalid mask shape {idx.shape} - expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        return FeatureSet(
            ids=tuple(self.ids[i] for i in idx),
            patients=tuple(self.patients[i] for i in idx),
            pooled=np.ascontiguousarray(self.pooled[idx]),
            labels=np.ascontiguousarray(self.labels[idx]),
            source=self.source,
        )


# --------------------------------------------------------------------------------------------------- computing


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ā`` [B, C] float32 for prepared inputs ``x`` [B, channels, S, S]: exactly the pooling of ``DenseNet.forward``
    (adaptive average pool over the post-ReLU final features), so ``model.classifier(ā) == model(x)``."""
    features = model.forward_features(x)  # type: ignore[operator]
    return torch.flatten(F.adaptive_avg_pool2d(features.float(), (1, 1)), 1)


def _as_input(image: np.ndarray | torch.Tensor, recipe: PreprocessRecipe, item_id: str) -> torch.Tensor:
    from model.engine import prepare

    if isinstance(image, torch.Tensor):
        tensor = image.float()
    elif isinstance(image, np.ndarray) and image.ndim == 3:
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    else:
        try:
            return prepare(image, recipe)
        except ModelError as exc:
            raise FeatureError(f"image {item_id!r}: {exc}") from exc
    expected = (recipe.channels, recipe.input_size, recipe.input_size)
    if tuple(tensor.shape) != expected:
        raise FeatureError(f"image {item_id!r}: prepared input has shape {tuple(tensor.shape)} - expected {expected}")
    return tensor


def _labels_of(labels: Any, item_id: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (_N,) or not np.isin(arr, (0, 1)).all():
        raise FeatureError(f"image {item_id!r}: labels {arr.shape} - expected {_N} values of 0 or 1 in LABELS order")
    return arr.astype(np.uint8)


@torch.inference_mode()
def compute_features(
    model: nn.Module,
    items: Iterable[Item],
    *,
    recipe: PreprocessRecipe,
    total: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    source: str = "",
    progress: Progress | None = None,
) -> FeatureSet:
    """Run the backbone of ``model`` (with ``forward_features``) over ``items`` in batches and pool.

    ``items``: ``(id, patient, image, labels)`` where ``image`` is a decoded float array [H, W] in [0, 1] (prepared with
    ``recipe``) or a prepared tensor/array [channels, S, S]; ``labels``: 14 values of 0/1 in LABELS order. Only one
    batch of inputs is in memory at a time. ``total`` (defaults to ``len(items)`` when it has one) sizes the progress
    callback ``(stage, done, total)``. Runs in float32 (also on CUDA); like ``model.engine.Engine`` it moves ``model``
    to the device in channels_last memory format (a model's outputs can differ in the last bit between memory
    formats, so compare networks in the same one). Raises FeatureError naming a bad item and for an empty iterable.
    """
    from model.engine import pick_device

    if batch_size < 1:
        raise FeatureError(f"Invalid batch_size {batch_size} - must be >= 1")
    if not hasattr(model, "forward_features"):
        raise FeatureError("the model has no forward_features() - expected a model.network.DenseNet")
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    target = pick_device(device)
    was_training = model.training
    model.eval().to(target, memory_format=torch.channels_last)
    ids: list[str] = []
    patients: list[str | None] = []
    labels: list[np.ndarray] = []
    pooled: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        x = torch.stack(batch).to(target).contiguous(memory_format=torch.channels_last)
        pooled.append(pooled_features(model, x).cpu())
        batch.clear()
        if progress:
            progress("features", len(ids), max(total or 0, len(ids)))

    try:
        for item_id, patient, image, item_labels in items:
            item_id = str(item_id)
            batch.append(_as_input(image, recipe, item_id))
            labels.append(_labels_of(item_labels, item_id))
            ids.append(item_id)
            patients.append(None if patient is None else str(patient))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    if not ids:
        raise FeatureError("no images to compute features for")
    return FeatureSet(
        ids=tuple(ids),
        patients=tuple(patients),
        pooled=torch.cat(pooled).numpy().astype(np.float32, copy=False),
        labels=np.stack(labels),
        source=source,
    )


def source_features(
    model: nn.Module,
    source: LabelledSource,
    *,
    recipe: PreprocessRecipe,
    batch_size: int = 32,
    device: str = "auto",
    progress: Progress | None = None,
) -> FeatureSet:
    """Features of every image of a ``model.datasets`` labelled source (phantom split, ChestX-ray14, DICOM folder);
    images are decoded one batch at a time. Raises FeatureError (chained) for an image that fails to decode."""

    def items() -> Iterator[Item]:
        for i in range(len(source)):
            try:
                image = source.load(i)
            except ModelError as exc:
                raise FeatureError(f"image {source.ids[i]!r}: {exc}") from exc
            yield source.ids[i], source.patients[i], image, source.labels[i]

    return compute_features(model, items(), recipe=recipe, total=len(source), batch_size=batch_size, device=device,
                            source=source.description, progress=progress)


def phantom_features(
    model: nn.Module,
    *,
    recipe: PreprocessRecipe,
    split: str = "val",
    seed: int = 0,
    count: int = 300,
    render_size: int = 256,
    batch_size: int = 32,
    device: str = "auto",
    progress: Progress | None = None,
) -> FeatureSet:
    """Features of the first ``count`` phantom images of ``split`` (rendered by ``model.train.render_split``, the same
    pixels training and evaluation use). Ids are ``phantom:<seed>:<index>`` as in ``model.datasets.PhantomSource``."""
    from model.splits import render_split

    data = render_split(split, seed=seed, count=count, recipe=recipe, render_size=render_size, progress=progress)
    items = zip((f"phantom:{seed}:{i}" for i in data.indices), data.patients, data.x, data.y, strict=True)
    return compute_features(model, items, recipe=recipe, total=len(data.patients), batch_size=batch_size,
                            device=device, progress=progress,
                            source=f"phantom {split} split (seed {seed}, {count} images, {render_size} px)")


# ------------------------------------------------------------------------------------------------------ caching


def state_digest(model: nn.Module) -> str:
    """sha256 (hex) over a model's state dict (names, dtypes, shapes, bytes): a cache key for a model that was not
    loaded from an artifact (an artifact's ``weights_sha256`` serves otherwise)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():  # reshape first: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def phantom_source_key(split: str, *, seed: int, count: int, render_size: int = 256) -> str:
    """Data-source key of a phantom split (see :func:`phantom_features`)."""
    return f"phantom:{split}:seed={seed}:count={count}:render={render_size}"


def source_key(source: LabelledSource) -> str:
    """Data-source key of a labelled source: its description, ids and labels, and for file-backed sources every
    file's size and modification time (a replaced file gives a new key)."""
    digest = hashlib.sha256(source.description.encode())
    digest.update("\n".join(source.ids).encode())
    digest.update(np.ascontiguousarray(source.labels).tobytes())
    for path in getattr(source, "paths", ()):
        try:
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        except OSError:
            digest.update(f"{path}:missing;".encode())
    return f"{type(source).__name__}:{digest.hexdigest()[:32]}"


def _cache_file(cache_dir: Path, weights_sha256: str, data_key: str, recipe: PreprocessRecipe) -> Path:
    key = json.dumps({"format": _CACHE_FORMAT, "weights": weights_sha256, "data": data_key,
                      "recipe": recipe.to_dict()}, sort_keys=True)
    return Path(cache_dir) / f"features-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _save(path: Path, features: FeatureSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(
            tmp,
            format=np.array(_CACHE_FORMAT),
            ids=np.array(features.ids, dtype=str),
            patients=np.array([p or "" for p in features.patients], dtype=str),
            patient_known=np.array([p is not None for p in features.patients], dtype=bool),
            pooled=features.pooled,
            labels=features.labels,
            source=np.array(features.source),
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path) -> FeatureSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != _CACHE_FORMAT:
                raise FeatureError(f"{path}: cache format {str(data['format'])!r} - expected {_CACHE_FORMAT!r}")
            known = data["patient_known"]
            return FeatureSet(
                ids=tuple(str(i) for i in data["ids"]),
                patients=tuple(str(p) if k else None for p, k in zip(data["patients"], known, strict=True)),
                pooled=data["pooled"].astype(np.float32, copy=False),
                labels=data["labels"].astype(np.uint8, copy=False),
                source=str(data["source"]),
            )
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, FeatureError):
            raise
        raise FeatureError(f"{path}: unreadable feature cache ({exc})") from None


def cached_features(
    cache_dir: Path | None,
    *,
    weights_sha256: str,
    data_key: str,
    recipe: PreprocessRecipe,
    compute: Callable[[], FeatureSet],
) -> tuple[FeatureSet, bool]:
    """``(features, from_cache)``: the ``.npz`` under ``cache_dir`` for (weights, data, recipe) when there is one,
    else ``compute()`` written there atomically. ``cache_dir`` None disables caching. A corrupt cache file is
    logged, replaced and never trusted."""
    if cache_dir is None:
        return compute(), False
    path = _cache_file(Path(cache_dir), weights_sha256, data_key, recipe)
    if path.is_file():
        try:
            features = _load(path)
            log.info("features from cache %s (%d images)", path.name, len(features))
            return features, True
        except FeatureError as exc:
            log.warning("ignoring feature cache: %s", exc)
    features = compute()
    try:
        _save(path, features)
    except OSError as exc:  # a read-only or full cache folder must not fail the job that computed the features
        log.warning("cannot write feature cache %s: %s", path, exc)
    return features, False
