"""The model step of the worker: decode the stored image, run the active model, return statistics + prediction.

The active model is ``settings.model_path`` (an artifact's JSON manifest or its folder) or, when that is empty, the
demo model bundled with chexd (synthetic, not for diagnosis). With neither, images are decoded and stored but not
analysed, and the daemon says so at start-up.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from daemon.settings import Settings
from daemon.worker import JobResult, PermanentJobError, read_stored_image
from model.errors import ModelError
from model.preprocess import stats_of

log = logging.getLogger(__name__)

DEMO_MANIFEST = "chexd-demo.json"


def bundled_demo_model() -> Path | None:
    """The demo artifact's manifest inside the installed package, or None when this build ships none."""
    candidate = resources.files("model") / "demo" / DEMO_MANIFEST
    return Path(str(candidate)) if candidate.is_file() else None


def resolve_model_path(settings: Settings) -> Path | None:
    """The configured artifact, else the bundled demo. Raises ModelError for a configured path that is missing."""
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        if not path.exists():
            raise ModelError(f"model_path {path} does not exist - import a checkpoint with 'chexd model import'")
        return path
    return bundled_demo_model()


class ModelProcessor:
    """Callable worker step: path of a stored DICOM file -> JobResult with the prediction. Thread-safe; concurrent
    calls from several worker threads are batched together (DynamicBatcher)."""

    def __init__(self, artifact_path: Path, *, device: str = "auto", batch_size: int = 16) -> None:
        from model.artifact import load_artifact
        from model.batcher import DynamicBatcher
        from model.engine import Engine

        network, manifest = load_artifact(artifact_path)
        self.manifest = manifest
        self.engine = Engine(
            network,
            recipe=manifest.preprocessing,
            labels=manifest.labels,
            model_version=manifest.weights_sha256[:16],
            device=device,
            batch_size=batch_size,
        )
        self.batcher = DynamicBatcher(self.engine, max_batch=batch_size)
        log.info(
            "model %s version %s loaded on %s%s",
            manifest.name,
            self.engine.model_version,
            self.engine.device,
            " - SYNTHETIC DEMO MODEL, NOT FOR DIAGNOSIS" if manifest.synthetic else "",
        )

    def __call__(self, path: Path) -> JobResult:
        ds, image = read_stored_image(path)
        try:
            prediction = self.batcher.submit(image).result()
        except ModelError as exc:
            raise PermanentJobError(f"the model cannot use this image: {exc}") from exc
        return JobResult(
            image_stats=stats_of(ds, image).to_dict(),
            prediction=prediction,
            model_name=self.manifest.name,
            synthetic_model=self.manifest.synthetic,
        )

    def close(self) -> None:
        self.batcher.close()
