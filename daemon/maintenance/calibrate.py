"""Calibration (``chexd calibrate``): per-class thresholds fitted on one patient-disjoint half, reported on the
other, over several splits. From a predictions CSV it changes no model; from a model it registers a candidate
version carrying the thresholds (weights unchanged)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.candidate import backbone_check, write_candidate
from daemon.maintenance.errors import Progress, quiet
from daemon.maintenance.jobs import run_job

if TYPE_CHECKING:
    from daemon.maintenance.parent import Parent
    from daemon.settings import Settings
    from model.calibrate import CalibrationResult
    from model.datasets import LabelledSource

__all__ = ["calibrate_model", "calibrate_predictions"]


def _summary(result: CalibrationResult) -> dict[str, Any]:
    return {k: result.to_dict()[k] for k in ("objective", "f1_ratio", "recall_ratio", "mean_f1", "mean_f1_default",
                                             "mean_recall", "mean_recall_default", "n_fit", "n_report", "split",
                                             "n_splits")}


def calibrate_predictions(settings: Settings, predictions: Path, labels: Path, *, objective: str, seed: int,
                          n_bootstrap: int, n_splits: int) -> dict[str, Any]:
    """The calibration of a predictions CSV joined with a labels CSV, inside a ``calibrate`` job record; no model
    changes. Raises MaintenanceError."""
    from model.calibrate import calibrate as fit
    from model.scores import read_scored_csv

    params = {"mode": "predictions", "predictions": str(predictions), "labels": str(labels), "objective": objective,
              "seed": seed, "n_bootstrap": n_bootstrap, "n_splits": n_splits}

    def work(job: Any) -> dict[str, Any]:
        scored = read_scored_csv(predictions, labels)
        result = fit(scored.scores, scored.labels, scored.patients, objective=objective,  # type: ignore[arg-type]
                     seed=seed, n_bootstrap=n_bootstrap, n_splits=n_splits)
        data = result.to_dict() | {
            "source": scored.source,
            "images": len(scored.ids),
            "dropped_rows": scored.dropped,
            "dropped_examples": list(scored.dropped_examples),
            "model": None,
            "candidate": None,
            "model_changed": False,
            "message": "no model was changed: a predictions CSV has no model to attach thresholds to - run "
            "'chexd calibrate' without --predictions to write a candidate version of a model",
        }
        job.result = _summary(result) | {"images": len(scored.ids), "dropped_rows": scored.dropped}
        return data

    return run_job(settings, "calibrate", params, work)


def calibrate_model(settings: Settings, parent: Parent, source: LabelledSource, *, objective: str, seed: int,
                    n_bootstrap: int, n_splits: int, device: str, batch_size: int, dry_run: bool,
                    progress: Progress = quiet) -> dict[str, Any]:
    """Score ``source`` with the parent, fit the thresholds and (unless ``dry_run``) register a candidate carrying
    them, inside a ``calibrate`` job record; the report with ``candidate`` and ``message``. Raises
    MaintenanceError."""
    from model.calibrate import calibrate as fit
    from model.scores import score_source

    network, manifest = parent.network, parent.manifest
    params = {"mode": "model", "objective": objective, "seed": seed, "n_bootstrap": n_bootstrap, "n_splits": n_splits,
              "source": source.description, "images": len(source), "parent_version": manifest.version_id,
              "dry_run": dry_run}

    def work(job: Any) -> dict[str, Any]:
        scored = score_source(network, source, recipe=manifest.preprocessing, output_labels=manifest.labels,
                              device=device, batch_size=batch_size, progress=progress)
        result = fit(scored.scores, scored.labels, scored.patients, objective=objective,  # type: ignore[arg-type]
                     seed=seed, n_bootstrap=n_bootstrap, fallback=manifest.thresholds, n_splits=n_splits)
        candidate, message = None, "dry run: no candidate was written; the active model is unchanged"
        if not dry_run:
            candidate, message = _register(settings, parent, result, source, params)
        job.result = _summary(result) | {"candidate": candidate["version"] if candidate else None}
        return result.to_dict() | {
            "source": source.description,
            "images": len(source),
            "model": parent.info(),
            "candidate": candidate,
            "model_changed": False,
            "message": message,
        }

    return run_job(settings, "calibrate", params, work)


def _register(settings: Settings, parent: Parent, result: CalibrationResult, source: LabelledSource,
              params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(candidate, message): the parent with the fitted thresholds as a candidate, its weights checked unchanged."""
    network, manifest = parent.network, parent.manifest
    calibration = result.to_dict() | {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source.description,
        "images": len(source),
        "parent_version": manifest.version_id,
    }

    def check(reloaded: Any) -> dict[str, Any]:
        backbone, changed = backbone_check(network, reloaded)
        if not backbone or changed:
            raise ValueError(f"the saved artifact's weights differ from the parent's ({changed} classifier "
                             "weights changed) - a calibration changes thresholds only; nothing was registered")
        return {"dtype": manifest.dtype, "weights_identical": True}

    thresholds = {label: result.thresholds.get(label, manifest.thresholds[label]) for label in manifest.labels}
    written = write_candidate(settings, network, manifest, operation="calibrate", params=params, report=calibration,
                              check=check, thresholds=thresholds, report_key="calibration")
    message = (f"registered candidate {written.version} (version {written.manifest_version}) with the fitted "
               f"thresholds; the active model is unchanged - 'chexd model activate {written.version}' makes it active")
    return written.to_dict(), message
