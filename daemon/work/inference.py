"""The model step of the worker: decode the stored image, run the active model, return statistics + prediction.

The active model is ``settings.model_path`` (an artifact's JSON manifest or its folder) or, when that is empty, the
demo model bundled with chexd (synthetic, not for diagnosis). With neither, images are decoded and stored but not
analysed, and the daemon says so at start-up.

The applicability gate (setting ``applicability``: withhold | flag | off) is decided here, once per image, and
travels with the result (stored with the prediction, archived for the report): the artifact's applicability score
(Prediction.applicability, from the same forward pass) plus the input-quality checks on the decoded pixels
(:func:`input_quality`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.edge.intake import pixel_limits
from daemon.settings import Settings
from daemon.store.registry import resolve_model_path
from daemon.work.worker import JobResult, PermanentJobError, read_stored_image
from model.errors import ModelError
from model.preprocess import DEFAULT_LIMITS, PixelLimits, stats_of
from model.types import QualityIssue

log = logging.getLogger(__name__)

def input_checks(image: Any, photometric: str, *, min_side: int = 224) -> tuple[tuple[QualityIssue, ...], Any]:
    """Input-quality issues of a decoded image (float [rows, columns] in [0, 1], bright = dense): the pixel checks of
    ``model.quality.check_pixels`` (inverted for its photometric interpretation, nearly constant, saturated, too few
    pixels) and "lungs_not_found" when reporting's lung-field estimate finds no plausible pair of lung fields (the
    estimate the report's zones come from; it then falls back to a fixed grid). ``min_side``: the model's input side
    in pixels; a shorter image side is "too few pixels". Returns (issues, the lung fields: a
    reporting.regions.LungFields, or None when the pixel checks already ruled the image out) - the report reuses the
    fields instead of estimating them again."""
    from model.quality import check_pixels
    from reporting.regions import estimate_lung_fields

    issues: list[QualityIssue] = []
    try:
        issues += check_pixels(image, photometric=photometric if photometric.startswith("MONOCHROME") else "",
                               min_side=min_side)
    except ValueError as exc:  # the checks could not judge the image: say so rather than pass it
        issues.append(QualityIssue(code="unchecked_pixels", reason=f"the pixel checks could not run: {exc}"))
    fields = None
    if not any(issue.code in ("lungs_not_found", "constant", "too_few_pixels") for issue in issues):
        fields = estimate_lung_fields(image)
        if fields.method == "grid":
            issues.append(QualityIssue(code="lungs_not_found",
                                       reason=f"no lung fields found in the image: {fields.note}"))
    return tuple(issues), fields


def input_quality(image: Any, photometric: str, *, min_side: int = 224) -> tuple[QualityIssue, ...]:
    """The issues of :func:`input_checks` alone."""
    return input_checks(image, photometric, min_side=min_side)[0]


class ModelProcessor:
    """Callable worker step: path of a stored DICOM file -> JobResult with the prediction and the applicability
    gate's verdict under ``policy`` (withhold | flag | off; see reporting.report.domain_check). Thread-safe;
    concurrent calls from several worker threads are batched together (DynamicBatcher)."""

    def __init__(
        self,
        artifact_path: Path,
        *,
        device: str = "auto",
        batch_size: int = 16,
        threads: int = 0,
        limits: PixelLimits = DEFAULT_LIMITS,
        policy: str = "withhold",
    ) -> None:
        import torch

        from reporting.report import domain_check

        domain_check(None, (), policy)  # validates the policy before the model is loaded
        self.policy = policy

        from model.artifact import load_artifact
        from model.batcher import DynamicBatcher
        from model.engine import Engine

        if threads:
            torch.set_num_threads(threads)  # process-wide: the daemon's only torch work is this model

        network, manifest = load_artifact(artifact_path)
        self.manifest = manifest
        self.limits = limits
        self.engine = Engine(
            network,
            recipe=manifest.preprocessing,
            labels=manifest.labels,
            model_version=manifest.version_id,
            device=device,
            batch_size=batch_size,
            applicability=manifest.applicability,
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
        ds, image = read_stored_image(path, self.limits)
        try:
            prediction = self.batcher.submit(image).result()
        except ModelError as exc:
            raise PermanentJobError(f"the model cannot use this image: {exc}") from exc
        domain = fields = None
        if self.policy != "off":
            from reporting.report import domain_check

            quality = prediction.quality
            if not quality:
                quality, fields = input_checks(image, str(ds.get("PhotometricInterpretation", "")),
                                               min_side=self.manifest.preprocessing.input_size)
            domain = domain_check(prediction.applicability, quality, self.policy)
            if domain.status in ("withheld", "flagged"):
                log.info("image %s by the applicability gate sop_instance_uid=%s: %s", domain.status,
                         ds.get("SOPInstanceUID", ""), "; ".join(domain.reasons()))
        return JobResult(
            image_stats=stats_of(ds, image).to_dict(),
            prediction=prediction,
            model_name=self.manifest.name,
            synthetic_model=self.manifest.synthetic,
            manifest=self.manifest,
            domain=domain,
            lung_fields=fields,
        )

    def close(self) -> None:
        self.batcher.close()


class ActiveModelProcessor:
    """The worker step that follows the registry: between jobs it notices a newly activated version (checked at
    most every ``check_seconds``), loads it, and sends new jobs to it. Jobs already running finish on the model they
    started with; the old model is released once its last job is done. A version that fails to load is logged and
    the current one kept."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *, check_seconds: float = 1.0) -> None:
        self.settings = settings
        self.sessions = sessions
        self.check_seconds = check_seconds
        self._lock = threading.Lock()
        self._current: ModelProcessor | None = None
        self._version: str | None = None
        self._in_flight: dict[int, int] = {}
        self._retiring: list[ModelProcessor] = []
        self._checked = 0.0

    @property
    def current(self) -> ModelProcessor | None:
        return self._current

    def load(self) -> None:
        """Load the active model now (registry's active version, else model_path, else the bundled demo)."""
        from daemon.store.registry import active_version

        active = active_version(self.sessions)
        path = active[1] if active else resolve_model_path(self.settings)
        if path is None:
            raise ModelError("no model configured and none bundled")
        self._swap(self._open(path))
        self._version = active[0] if active else None
        self._checked = time.monotonic()

    def _open(self, path: Path) -> ModelProcessor:
        return ModelProcessor(
            path,
            device=self.settings.model_device,
            batch_size=self.settings.model_batch_size,
            threads=self.settings.effective_model_threads,
            limits=pixel_limits(self.settings),
            policy=self.settings.applicability,
        )

    def _swap(self, processor: ModelProcessor) -> None:
        with self._lock:
            old, self._current = self._current, processor
            if old is not None:
                self._retiring.append(old)
        self._release_idle()

    def _release_idle(self) -> None:
        with self._lock:
            idle = [p for p in self._retiring if not self._in_flight.get(id(p))]
            self._retiring = [p for p in self._retiring if p not in idle]
        for processor in idle:
            processor.close()

    def _maybe_reload(self) -> None:
        from daemon.store.registry import active_version

        now = time.monotonic()
        if now - self._checked < self.check_seconds:
            return
        self._checked = now
        try:
            active = active_version(self.sessions)
        except SQLAlchemyError as exc:
            log.warning("cannot check the model registry: %s", exc)
            return
        if active is None or active[0] == self._version:
            return
        version, path = active
        try:
            processor = self._open(path)
        except (ModelError, OSError, ValueError) as exc:
            log.error("cannot load newly activated model version %s (keeping the current one): %s", version, exc)
            self._version = version  # do not retry on every job; a new activation changes the version again
            return
        self._swap(processor)
        self._version = version
        log.info("switched to model version %s (activated in the registry)", version)

    def __call__(self, path: Path) -> JobResult:
        if self._current is None:
            self.load()
        else:
            self._maybe_reload()
        with self._lock:
            processor = self._current
            assert processor is not None
            self._in_flight[id(processor)] = self._in_flight.get(id(processor), 0) + 1
        try:
            return processor(path)
        finally:
            with self._lock:
                self._in_flight[id(processor)] -= 1
            self._release_idle()

    def close(self) -> None:
        with self._lock:
            processors = [*self._retiring, *([self._current] if self._current else [])]
            self._retiring, self._current = [], None
        for processor in processors:
            processor.close()
