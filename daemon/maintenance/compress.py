"""Compression (``chexd compress``): a smaller model version by channel pruning with least-squares refit
(``model.compress``), evaluated against its parent on the phantom test split (paired image by image), timed on the
CPU and registered as a *candidate* (never activated). Torch loads when a function runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.maintenance.candidate import write_candidate
from daemon.maintenance.errors import MaintenanceError, Progress, quiet
from daemon.maintenance.jobs import run_job

if TYPE_CHECKING:
    from daemon.maintenance.parent import Parent
    from daemon.settings import Settings

__all__ = ["CompressOptions", "Compression", "compress"]

METHOD = "greedy channel selection + least-squares refit (model.compress)"


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressOptions:
    """Targets (shares of the parameters and MACs to keep), the phantom train images for selection and refit, the
    distillation (steps, scope), the phantom test images and bootstrap resamples of the before/after, the seed."""

    target_params: float = 0.45
    target_macs: float = 0.55
    calibration_images: int = 1000
    distill_steps: int = 0
    distill_scope: str = "all"
    test_images: int = 1000
    n_bootstrap: int = 1000
    seed: int = 0

    def params(self) -> dict[str, Any]:
        """The job's (and the provenance entry's) parameters."""
        return {
            "target_params": self.target_params,
            "target_macs": self.target_macs,
            "calibration_images": self.calibration_images,
            "calibration_data": "chexd chest phantom, train split",
            "distill_steps": self.distill_steps,
            "distill_scope": self.distill_scope,
            "seed": self.seed,
            "method": METHOD,
        }


@dataclass(frozen=True, slots=True)
class Compression:
    """What the job found: ``summary`` (the registered candidate, sizes, AUROCs, verdict, latency), the
    compressor's ``report``, the paired ``delta`` and its ``verdict``, and the child's ``metrics``."""

    summary: dict[str, Any]
    report: Any
    delta: Any
    verdict: Any
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Evaluated:
    """The child against its parent: paired ``delta``, ``verdict``, the child's ``metrics``, the summary's
    ``figures``, the child's test probabilities ``after`` [N, 14] and its ``parameters``."""

    delta: Any
    verdict: Any
    metrics: dict[str, Any]
    figures: dict[str, Any]
    after: Any
    parameters: int


def latency(parent: Any, child: Any, input_size: int, channels: int) -> dict[str, Any]:
    """CPU ms per image at batch 1 and images/s at batch 16, parent and child timed interleaved on the engine's CPU
    path (channels-last, frozen TorchScript)."""
    import torch

    from model.complexity import time_forward

    threads = torch.get_num_threads()
    models = [parent, child]
    b1 = time_forward(models, input_size=input_size, channels=channels, batch_size=1, repeats=30, frozen=True)
    b16 = time_forward(models, input_size=input_size, channels=channels, batch_size=16, repeats=8, frozen=True)
    return {
        "device": "cpu",
        "threads": threads,
        "batch1_ms_before": round(b1[0] * 1000, 2),
        "batch1_ms_after": round(b1[1] * 1000, 2),
        "batch1_speedup": round(b1[0] / b1[1], 3),
        "batch16_images_per_s_before": round(16 / b16[0], 1),
        "batch16_images_per_s_after": round(16 / b16[1], 1),
        "batch16_speedup": round(b16[0] / b16[1], 3),
    }


def compress(settings: Settings, parent: Parent, options: CompressOptions, progress: Progress = quiet) -> Compression:
    """Compress the parent, evaluate and time it against the parent, register the result as a candidate; all inside
    a ``compress`` job record. Raises MaintenanceError (also for a model without the 14 CheXNet labels in order: the
    phantom evaluation needs them)."""
    from model.types import LABELS

    manifest = parent.manifest
    if tuple(manifest.labels) != tuple(LABELS):
        raise MaintenanceError(f"{parent.path}: the phantom evaluation needs the 14 CheXNet labels in order, the model "
                               f"has {manifest.labels}")
    params = options.params()

    def work(job: Any) -> Compression:
        child, report, test = _compress(parent, options, progress)
        evaluation = _evaluate(parent, child, report, test, options)
        written = write_candidate(settings, child, manifest, operation="compress", params=params,
                                  report={"method": METHOD, "verdict": evaluation.verdict.to_dict()},
                                  check=_saved_check(manifest, test, evaluation),
                                  metrics=evaluation.metrics, name=_child_name(manifest.name),
                                  applicability_inputs=test.x)
        summary = _candidate_summary(written, manifest) | evaluation.figures
        summary["saved_artifact"] = written.report["saved_artifact"]
        job.result = summary
        return Compression(summary, report, evaluation.delta, evaluation.verdict, evaluation.metrics)

    return run_job(settings, "compress", params | {"parent": manifest.weights_sha256[:16]}, work)


def _child_name(name: str) -> str:
    return (name if name.endswith("-compressed") else f"{name}-compressed")[:100]


def _compress(parent: Parent, o: CompressOptions, progress: Progress) -> tuple[Any, Any, Any]:
    """(child network, compression report, rendered phantom test split)."""
    from model.compress import compress as run_compression
    from model.train import render_split

    recipe = parent.manifest.preprocessing
    calibration = render_split("train", seed=o.seed, count=o.calibration_images, recipe=recipe, progress=progress)
    child, report = run_compression(parent.network, calibration.x, target_params=o.target_params,
                                    target_macs=o.target_macs, distill_steps=o.distill_steps,
                                    distill_scope=o.distill_scope, seed=o.seed, progress=progress)
    test = render_split("test", seed=o.seed, count=o.test_images, recipe=recipe, progress=progress)
    return child, report, test


def _evaluate(parent: Parent, child: Any, report: Any, test: Any, o: CompressOptions) -> _Evaluated:
    """Paired AUROC delta, verdict, latency and the child's metrics."""
    import torch

    from model.complexity import complexity
    from model.compress import compression_verdict, paired_auroc_delta
    from model.train import predict_scores
    from model.types import LABELS

    recipe = parent.manifest.preprocessing
    device = torch.device("cpu")
    before = predict_scores(parent.network, test.x, device)
    after = predict_scores(child, test.x, device)
    delta = paired_auroc_delta(before, after, test.y, LABELS, n_bootstrap=o.n_bootstrap, seed=o.seed,
                               patients=test.patients)
    verdict = compression_verdict(delta)
    timing = latency(parent.network, child, recipe.input_size, recipe.channels)
    counts = complexity(child.architecture, recipe.input_size)
    metrics = {
        "parameters": counts.parameters,
        "macs": counts.macs,
        "input_size": recipe.input_size,
        "compression": report.to_dict(units=False),
        "test": {"split": "test", "images": o.test_images, "seed": o.seed} | delta.to_dict(),
        "verdict": verdict.to_dict(),
        "latency": timing,
    }
    return _Evaluated(delta, verdict, metrics, _figures(report, delta, verdict, timing), after, counts.parameters)


def _saved_check(manifest: Any, test: Any, evaluation: _Evaluated) -> Any:
    """The check of the saved (``dtype``) weights against the compressed network on up to 64 test images."""
    after, parameters = evaluation.after, evaluation.parameters

    def check(reloaded: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        from model.train import predict_scores

        n = min(64, len(test.x))
        saved = predict_scores(reloaded, test.x[:n], torch.device("cpu"))
        diff = np.abs(saved - after[:n])
        if not np.isfinite(saved).all():
            raise ValueError("the saved compressed artifact gives non-finite probabilities - nothing was registered")
        return {"dtype": manifest.dtype, "images": n, "max_abs_probability_change": round(float(diff.max()), 6),
                "parameters": parameters}

    return check


def _candidate_summary(written: Any, manifest: Any) -> dict[str, Any]:
    return {
        "version": written.version,
        "manifest_version": written.manifest_version,
        "state": written.state,
        "path": str(written.path),
        "parent": manifest.weights_sha256[:16],
    }


def _figures(report: Any, delta: Any, verdict: Any, timing: dict[str, Any]) -> dict[str, Any]:
    """Sizes before/after, the AUROC delta and the verdict, the latency: the summary's figures."""
    return {
        "parameters_before": report.parameters_before,
        "parameters_after": report.parameters_after,
        "parameters_removed": round(report.parameters_removed, 4),
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "macs_removed": round(report.macs_removed, 4),
        "macs_removed_by_pruning": round(report.macs_removed_by_pruning, 4),
        "mean_auroc_before": delta.mean_before,
        "mean_auroc_after": delta.mean_after,
        "mean_auroc_delta": delta.mean_delta,
        "mean_auroc_delta_ci": list(delta.mean_delta_ci),
        "verdict": verdict.verdict,
        "verdict_reason": verdict.reason,
        "mean_auroc_delta_judged": verdict.mean_delta,
        "mean_auroc_delta_judged_ci": list(verdict.mean_delta_ci) if verdict.mean_delta_ci else None,
        "not_judged": [{"label": label, "positives": n} for label, n in verdict.excluded],
        "latency": timing,
    }
