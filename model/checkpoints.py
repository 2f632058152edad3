"""Import foreign DenseNet checkpoints as chexd artifacts.

Formats understood (``detect_format`` tells them apart from the file's contents, not its name):

- ``"chexnet"``: arnoweng/CheXNet training checkpoints, ``torch.save({"state_dict": ..., "epoch", "best_loss",
  "optimizer"})`` from a ``DataParallel`` model: keys ``module.densenet121.features...`` with pre-0.4 layer names
  (``denselayer1.norm.1.weight``, ``conv.2``) and a ``classifier.0`` head of 14 outputs in CheXNet label order.
- ``"xrv"``: torchxrayvision ``DenseNet`` state dicts: 1 input channel, an 18-output head in xrv's pathology order
  (rows mapped to our 14 labels by name) and optional ``op_threshs`` (taken as the thresholds).
- ``"torchvision"``: a plain torchvision ``densenet121`` state dict (``features.*``, ``classifier.*``) with a 14-output
  head in CheXNet label order, as a ``.pt``/``.pth`` pickle or a ``.safetensors`` file.
- ``"artifact"``: a chexd artifact (verified, then re-written with an import record).

Foreign pickles are read only with ``torch.load(..., weights_only=True)``. The architecture (block sizes, channel
counts) is inferred from tensor shapes, so other DenseNet depths and uniformly thinned nets import too.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.artifact import (
    ArtifactError,
    Dtype,
    load_artifact,
    manifest_path,
    provenance_entry,
    save_artifact,
    sha256_file,
)
from model.errors import ModelError
from model.network import Architecture, DenseNet, LayerSpec, TransitionSpec
from model.types import CHEXNET_RECIPE, LABELS, XRV_RECIPE

__all__ = ["CheckpointError", "Format", "XRV_PATHOLOGIES", "detect_format", "import_checkpoint"]

Format = Literal["chexnet", "xrv", "torchvision", "artifact"]
FORMATS: tuple[str, ...] = ("chexnet", "xrv", "torchvision", "artifact")

#: torchxrayvision's ``default_pathologies``: the output order of its 18-output DenseNet heads.
XRV_PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)

_EXPECTED = "a CheXNet (.pth.tar), torchxrayvision or torchvision DenseNet121 checkpoint, or a chexd artifact"
_DENSENET_KEY = re.compile(
    r"^(?:features\.(?:conv0|norm0|norm5|denseblock\d+\.denselayer\d+\.(?:norm1|conv1|norm2|conv2)"
    r"|transition\d+\.(?:norm|conv))\.(?:weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|classifier\.(?:weight|bias)|op_threshs)$"
)
_OLD_LAYER_NAME = re.compile(r"(denselayer\d+\.)(norm|relu|conv)\.([12])\.")


class CheckpointError(ModelError, ValueError):
    """A file is not a checkpoint chexd can import; the message names the path, what was found and what was expected."""


@dataclass
class _Source:
    format: str
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)  # torchvision names, for foreign formats
    artifact: Path | None = None  # manifest path, for "artifact"


# ------------------------------------------------------------------------------------------------------- reading
def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


# Why a refused pickle stays refused, and what to do instead (torch's own message suggests weights_only=False).
UNPICKLE_POLICY = (
    "chexd never unpickles arbitrary objects from a checkpoint, because a pickle can run any code on this machine; "
    "convert the checkpoint on a trusted machine to a plain state dict - torch.save(model.state_dict(), "
    "'model.pth') - or to safetensors - safetensors.torch.save_file(model.state_dict(), 'model.safetensors') - and "
    "import that file"
)
_PICKLE_OPCODES = frozenset(ord(op.code) for op in pickletools.opcodes)
_TORCH_HINT = re.compile(r"weights_only|re-running|trusted source|check the documentation|add_safe_globals", re.I)


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only. Raises CheckpointError; a file whose
    pickle needs anything else is refused with :data:`UNPICKLE_POLICY`, never retried another way."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        text = str(exc)
        refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.I)
        if refused:
            raise CheckpointError(
                f"{path}: refused to unpickle - it holds {refused.group(1)}, not only tensors and plain containers; "
                f"{UNPICKLE_POLICY}"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip() and not _TORCH_HINT.search(line)]
        reason = detail.group(1).strip() if detail else (lines or [type(exc).__name__])[0][:200]
        operand = re.search(r"Unsupported operand (\d+)", text)
        if isinstance(exc, pickle.UnpicklingError) and operand and int(operand.group(1)) in _PICKLE_OPCODES:
            # a real pickle instruction the weights-only reader does not take (a damaged file names no opcode)
            raise CheckpointError(
                f"{path}: refused to unpickle ({reason}) - only tensors and plain containers are read; "
                f"{UNPICKLE_POLICY}"
            ) from None
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {reason}); expected {_EXPECTED}"
        ) from None


def _read(path: Path) -> _Source:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        try:
            return _Source("artifact", artifact=manifest_path(path))
        except ArtifactError as exc:
            raise CheckpointError(f"{path}: a folder but not a chexd artifact: {exc}") from None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        raise CheckpointError(f"{path}: empty file; expected {_EXPECTED}")
    if head.lstrip()[:1] in (b"{", b"[") or path.suffix == ".json":
        return _read_json(path)
    if _is_safetensors(head, size):
        if path.with_suffix(".json").is_file():
            return _Source("artifact", artifact=path.with_suffix(".json"))
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: looks like safetensors but cannot be read: {exc}") from None
        return _classify(path, tensors)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive, or a legacy (pre-1.6) pickle
        return _classify(path, _torch_load(path))
    raise CheckpointError(
        f"{path}: not a checkpoint - starts with bytes {head[:8].hex(' ')} (neither a PyTorch zip/pickle, "
        f"safetensors nor JSON); expected {_EXPECTED}"
    )


def _read_json(path: Path) -> _Source:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: starts like JSON but is not valid JSON ({exc}); expected {_EXPECTED}") from None
    if not (isinstance(data, dict) and "weights_sha256" in data and "architecture" in data):
        found = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else f"a top-level {type(data).__name__}"
        raise CheckpointError(
            f"{path}: a JSON file with {found} but not a chexd artifact manifest (no 'weights_sha256' and "
            f"'architecture'); expected {_EXPECTED}"
        )
    return _Source("artifact", artifact=path)


def _classify(path: Path, obj: Any) -> _Source:
    wrapped = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
    state = obj["state_dict"] if wrapped else obj
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: holds a {type(state).__name__}, not a state dict (a mapping of names to tensors); "
            f"expected {_EXPECTED}"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or not_tensors:
        found = "an empty mapping" if not state else f"non-tensor values, e.g. {not_tensors[0]!r}"
        hint = f" (top-level keys {sorted(map(str, obj))[:6]})" if isinstance(obj, dict) and not wrapped else ""
        raise CheckpointError(f"{path}: holds {found}{hint}, not a state dict; expected {_EXPECTED}")
    keys = [str(k) for k in state]
    chexnet = any(k.startswith(("module.densenet121.", "densenet121.")) for k in keys)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = str(key)
        for prefix in ("module.", "densenet121."):
            if new.startswith(prefix):
                new = new[len(prefix) :]
        new = _OLD_LAYER_NAME.sub(r"\1\2\3.", new)
        new = new.replace("classifier.0.", "classifier.")
        renamed[new] = value
    foreign = [k for k in renamed if not _DENSENET_KEY.match(k)]
    if foreign:
        raise CheckpointError(
            f"{path}: has {len(foreign)} of {len(renamed)} keys that are not DenseNet121 keys, e.g. {foreign[0]!r}; "
            f"expected {_EXPECTED}"
        )
    for key in ("features.conv0.weight", "classifier.weight", "features.norm5.weight"):
        if key not in renamed:
            raise CheckpointError(f"{path}: a DenseNet state dict without {key!r}; expected {_EXPECTED}")
    conv0 = renamed["features.conv0.weight"]
    if conv0.ndim != 4:
        raise CheckpointError(f"{path}: 'features.conv0.weight' has shape {list(conv0.shape)} - expected 4 dims")
    if chexnet:
        fmt = "chexnet"
    elif conv0.shape[1] == 1 or "op_threshs" in renamed:
        fmt = "xrv"
    else:
        fmt = "torchvision"
    return _Source(fmt, state_dict=renamed)


def detect_format(path: str | os.PathLike[str]) -> Format:
    """Which format ``path`` holds, judged from its contents. Raises CheckpointError for anything else."""
    return _read(Path(path)).format  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------- converting
def _shape(state: dict[str, torch.Tensor], key: str, ndim: int, path: Path) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{path}: {key!r} is missing")
    shape = state[key].shape
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key!r} has shape {list(shape)} - expected {ndim} dims")
    return shape


def _infer_architecture(state: dict[str, torch.Tensor], path: Path, num_classes: int) -> Architecture:
    conv0 = _shape(state, "features.conv0.weight", 4, path)
    blocks: list[tuple[LayerSpec, ...]] = []
    transitions: list[TransitionSpec] = []
    b = 1
    while f"features.denseblock{b}.denselayer1.conv1.weight" in state:
        layers = []
        i = 1
        while f"features.denseblock{b}.denselayer{i}.conv1.weight" in state:
            prefix = f"features.denseblock{b}.denselayer{i}"
            conv1 = _shape(state, f"{prefix}.conv1.weight", 4, path)
            conv2 = _shape(state, f"{prefix}.conv2.weight", 4, path)
            layers.append(LayerSpec(bottleneck=conv1[0], growth=conv2[0]))
            i += 1
        blocks.append(tuple(layers))
        key = f"features.transition{b}.conv.weight"
        if key in state:
            transitions.append(TransitionSpec(out_channels=_shape(state, key, 4, path)[0]))
        b += 1
    if not blocks:
        raise CheckpointError(f"{path}: no dense blocks ('features.denseblock1.denselayer1.conv1.weight' missing)")
    try:
        return Architecture(
            in_channels=conv0[1],
            stem_channels=conv0[0],
            blocks=tuple(blocks),
            transitions=tuple(transitions),
            num_classes=num_classes,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: tensor shapes do not describe a DenseNet: {exc}") from None


def _build(state: dict[str, torch.Tensor], path: Path, num_classes: int) -> DenseNet:
    """A DenseNet whose architecture is inferred from ``state``, loaded with it (strict, shapes checked)."""
    model = DenseNet(_infer_architecture(state, path, num_classes))
    expected = model.state_dict()
    state = dict(state)
    for key in expected:  # pre-0.4 checkpoints (CheXNet) have no BatchNorm batch counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = [f"{len(missing)} missing, e.g. {missing[:3]}"] if missing else []
        parts += [f"{len(extra)} unexpected, e.g. {extra[:3]}"] if extra else []
        raise CheckpointError(f"{path}: keys do not form a complete DenseNet - {'; '.join(parts)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            hint = (
                " - channel-subset pruned nets need a chexd manifest (kept_inputs) and cannot be inferred from shapes"
                if key.endswith(("norm1.weight", "conv1.weight", "norm.weight", "conv.weight", "norm5.weight"))
                else ""
            )
            raise CheckpointError(
                f"{path}: {key!r} has shape {list(state[key].shape)}, a DenseNet with these channel counts expects "
                f"{list(tensor.shape)}{hint}"
            )
    converted = {k: v.float() if v.is_floating_point() else v.long() for k, v in state.items()}
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _default_name(path: Path) -> str:
    stem = path.name
    for suffix in (".tar", ".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".json"):
        stem = stem.removesuffix(suffix)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return name[:100] or "imported"


def _convert_foreign(src: _Source, path: Path) -> tuple[DenseNet, dict[str, Any]]:
    """(model, manifest fields) for a chexnet / torchvision / xrv state dict."""
    state = dict(src.state_dict)
    op_threshs = state.pop("op_threshs", None)
    head = state["classifier.weight"]
    rows = head.shape[0]
    in_channels = state["features.conv0.weight"].shape[1]
    thresholds = dict.fromkeys(LABELS, 0.5)
    if src.format == "xrv":
        if in_channels != 1 or rows != len(XRV_PATHOLOGIES):
            raise CheckpointError(
                f"{path}: a torchxrayvision DenseNet has 1 input channel and {len(XRV_PATHOLOGIES)} outputs, "
                f"this one has {in_channels} and {rows}"
            )
        order = [XRV_PATHOLOGIES.index(label) for label in LABELS]
        state["classifier.weight"] = head[order]
        state["classifier.bias"] = state["classifier.bias"][order]
        if op_threshs is not None and op_threshs.shape == (rows,):
            for label, row in zip(LABELS, order, strict=True):
                value = float(op_threshs[row])
                if 0 < value < 1:  # NaN (pathology not trained) keeps 0.5
                    thresholds[label] = value
        recipe = XRV_RECIPE
        note = f"torchxrayvision DenseNet: {len(LABELS)} of its {rows} outputs kept, mapped by name; op_threshs used"
    else:
        if rows == 1000:
            raise CheckpointError(
                f"{path}: ImageNet head with 1000 outputs: not a chest model - expected a head with "
                f"{len(LABELS)} outputs in CheXNet label order ({', '.join(LABELS[:3])}, ...)"
            )
        if rows != len(LABELS):
            raise CheckpointError(
                f"{path}: the classifier has {rows} outputs - expected {len(LABELS)} in CheXNet label order"
            )
        if in_channels != 3:
            raise CheckpointError(
                f"{path}: {src.format} checkpoint with {in_channels} input channel(s) - expected 3 (RGB-repeated grey)"
            )
        recipe = CHEXNET_RECIPE
        note = f"{src.format} checkpoint; outputs taken in CheXNet label order"
    model = _build(state, path, len(LABELS))
    fields = {
        "preprocessing": recipe,
        "thresholds": thresholds,
        "labels": LABELS,
        "intended_use": (
            f"Imported {note}. Research use; thresholds are not calibrated for local data - calibrate and validate "
            "locally before any clinical use."
        ),
    }
    return model, fields


def import_checkpoint(
    path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    name: str | None = None,
    format: Format | Literal["auto"] = "auto",
    dtype: Dtype = "float32",
) -> Path:
    """Convert the checkpoint at ``path`` into a chexd artifact at ``out_path``; return the manifest's path.

    ``out_path``: a folder or a ``.json``/``.safetensors`` path, as for :func:`model.artifact.save_artifact`.
    ``name`` defaults to the source file's stem (an artifact keeps its own name); ``format`` "auto" detects it,
    another value must match what is detected. The manifest records ``{operation: "import", parameters:
    {source_format, source_file_name, source_sha256}}`` in its provenance. An artifact source is verified with
    :func:`model.artifact.load_artifact` and re-written with its fields and provenance kept.
    Raises CheckpointError (or ArtifactError for a broken artifact) with the path and the problem.
    """
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise CheckpointError(f"Invalid format {format!r} - expected auto, {', '.join(FORMATS)}")
    src = _read(path)
    if format != "auto" and src.format != format:
        raise CheckpointError(f"{path}: expected a {format} checkpoint but found {src.format}")
    if src.format == "artifact":
        artifact_file = src.artifact or manifest_path(path)
        model, manifest = load_artifact(artifact_file)
        record = provenance_entry(
            "import",
            {
                "source_format": "artifact",
                "source_file_name": artifact_file.name,
                "source_sha256": manifest.weights_sha256,
            },
            parent_sha256=manifest.weights_sha256,
        )
        return save_artifact(
            model,
            out_path,
            name=name or manifest.name,
            version=manifest.version,
            labels=manifest.labels,
            thresholds=manifest.thresholds,
            preprocessing=manifest.preprocessing,
            provenance=(*manifest.provenance, record),
            metrics=manifest.metrics,
            intended_use=manifest.intended_use,
            synthetic=manifest.synthetic,
            dtype=manifest.dtype,
            applicability=manifest.applicability,
        )
    model, fields = _convert_foreign(src, path)
    record = provenance_entry(
        "import",
        {"source_format": src.format, "source_file_name": path.name, "source_sha256": sha256_file(path)},
    )
    return save_artifact(model, out_path, name=name or _default_name(path), provenance=(record,), dtype=dtype, **fields)
