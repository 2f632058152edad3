"""The version a maintenance job starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.errors import MaintenanceError

if TYPE_CHECKING:
    from torch import nn

    from daemon.settings import Settings
    from model.artifact import Manifest

__all__ = ["Parent", "load_parent"]


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
