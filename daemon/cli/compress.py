"""``chexd compress``: a smaller model version by channel pruning with least-squares refit (torch loads lazily).

The active model is never changed: the compressed artifact is registered as a *candidate* (``chexd model activate``
makes it active) after it was evaluated against its parent on the phantom test split, paired image by image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.train import _progress, _reporter

__all__ = ["compress"]


def _latency(parent: Any, child: Any, input_size: int, channels: int) -> dict[str, Any]:
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


def compress(
    target_params: Annotated[
        float, typer.Option(min=0.01, max=0.99, help="Fraction of the parameters to keep (0.45 removes 55%).")
    ] = 0.45,
    target_macs: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Fraction of the MACs (conv + linear) to keep at most.")
    ] = 0.55,
    calibration_images: Annotated[
        int,
        typer.Option(
            min=16,
            help="Phantom train-split images for channel selection and refit (more fit better: the bundled "
            "compressed demo used 4,000: 17 min on 2 CPU cores).",
        ),
    ] = 1000,
    distill_steps: Annotated[
        int, typer.Option(min=0, help="Distillation steps from the original on unlabeled images (0: none).")
    ] = 0,
    distill_scope: Annotated[
        str,
        typer.Option(
            help="What distillation trains: 'all' (every layer; slow on a CPU) or 'last_block' / 'last_<k>_blocks' "
            "(the last k dense blocks and the head, on cached inputs)."
        ),
    ] = "all",
    test_images: Annotated[
        int,
        typer.Option(
            min=20,
            help="Phantom test-split images for the before/after (rare findings need thousands: 1,000 hold about "
            "2 Hernia positives).",
        ),
    ] = 1000,
    n_bootstrap: Annotated[int, typer.Option(min=10, help="Paired bootstrap resamples of the AUROC delta.")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    model: Annotated[Path | None, typer.Option(help="Artifact to compress (default: the active model).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Compress the active model: prune DenseNet channels (a removed channel leaves every consumer), refit the kept
    weights by least squares to reproduce the original's layer outputs, optionally distil; evaluate before/after on
    the phantom test split (paired bootstrap CI of the AUROC difference) and time both on the CPU; register the
    result as a candidate version."""
    import torch

    from daemon.cli.calibrate import fail_with
    from daemon.cli.context import settings
    from daemon.maintenance import MaintenanceError, load_parent, run_job, write_candidate
    from model.complexity import complexity
    from model.compress import compress as run_compression
    from model.compress import compression_verdict, paired_auroc_delta
    from model.train import predict_scores, render_split
    from model.types import LABELS

    cfg = settings()
    try:
        loaded = load_parent(cfg, model)
    except MaintenanceError as exc:
        fail_with(exc)
    parent, manifest, path = loaded.network, loaded.manifest, loaded.path
    if tuple(manifest.labels) != tuple(LABELS):
        fail(f"{path}: the phantom evaluation needs the 14 CheXNet labels in order, the model has {manifest.labels}")
    recipe = manifest.preprocessing
    params: dict[str, Any] = {
        "target_params": target_params,
        "target_macs": target_macs,
        "calibration_images": calibration_images,
        "calibration_data": "chexd chest phantom, train split",
        "distill_steps": distill_steps,
        "distill_scope": distill_scope,
        "seed": seed,
        "method": "greedy channel selection + least-squares refit (model.compress)",
    }
    device = torch.device("cpu")

    def work(job: Any) -> tuple[dict[str, Any], Any, Any, dict[str, Any]]:
        with _progress(quiet=json_out) as progress:
            report_progress = _reporter(progress)
            calibration = render_split(
                "train", seed=seed, count=calibration_images, recipe=recipe, progress=report_progress
            )
            child, report = run_compression(
                parent,
                calibration.x,
                target_params=target_params,
                target_macs=target_macs,
                distill_steps=distill_steps,
                distill_scope=distill_scope,
                seed=seed,
                progress=report_progress,
            )
            test = render_split("test", seed=seed, count=test_images, recipe=recipe, progress=report_progress)
        before = predict_scores(parent, test.x, device)
        after = predict_scores(child, test.x, device)
        delta = paired_auroc_delta(before, after, test.y, LABELS, n_bootstrap=n_bootstrap, seed=seed,
                                   patients=test.patients)
        verdict = compression_verdict(delta)
        latency = _latency(parent, child, recipe.input_size, recipe.channels)
        counts = complexity(child.architecture, recipe.input_size)
        metrics = {
            "parameters": counts.parameters,
            "macs": counts.macs,
            "input_size": recipe.input_size,
            "compression": report.to_dict(units=False),
            "test": {"split": "test", "images": test_images, "seed": seed} | delta.to_dict(),
            "verdict": verdict.to_dict(),
            "latency": latency,
        }

        def check(reloaded: Any) -> dict[str, Any]:
            """The saved (``dtype``) weights against the compressed network on up to 64 test images."""
            import numpy as np

            n = min(64, len(test.x))
            saved = predict_scores(reloaded, test.x[:n], device)
            diff = np.abs(saved - after[:n])
            if not np.isfinite(saved).all():
                raise ValueError("the saved compressed artifact gives non-finite probabilities - nothing was "
                                 "registered")
            return {"dtype": manifest.dtype, "images": n, "max_abs_probability_change": round(float(diff.max()), 6),
                    "parameters": counts.parameters}

        name = manifest.name if manifest.name.endswith("-compressed") else f"{manifest.name}-compressed"
        written = write_candidate(cfg, child, manifest, operation="compress", params=params,
                                  report={"method": params["method"], "verdict": verdict.to_dict()}, check=check,
                                  metrics=metrics, name=name[:100], applicability_inputs=test.x)
        summary = {
            "version": written.version,
            "manifest_version": written.manifest_version,
            "state": written.state,
            "path": str(written.path),
            "parent": manifest.weights_sha256[:16],
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
            "latency": latency,
            "saved_artifact": written.report["saved_artifact"],
        }
        job.result = summary
        return summary, report, (delta, verdict), metrics

    try:
        job_params = params | {"parent": manifest.weights_sha256[:16]}
        summary, report, (delta, verdict), metrics = run_job(cfg, "compress", job_params, work)
    except MaintenanceError as exc:
        fail_with(exc)
    version, latency = summary, summary["latency"]
    if json_out:
        data = summary | {"compression": report.to_dict(), "test": metrics["test"]}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table("finding", "positives", "AUROC before", "after", "Δ", "Δ 95% CI", "judged",
                  title=f"phantom test ({test_images} images; CIs resample {delta.resampled})")
    judged = set(verdict.judged)
    for c, label in enumerate(delta.labels):
        ci = delta.delta_ci[c]
        table.add_row(
            label,
            str(delta.positives[c]),
            _fmt(delta.before[c]),
            _fmt(delta.after[c]),
            _fmt(delta.delta[c], signed=True),
            f"{ci[0]:+.4f} … {ci[1]:+.4f}" if ci else "-",
            "yes" if label in judged else f"no verdict (< {verdict.min_positives} positives)",
        )
    lo, hi = delta.mean_delta_ci
    table.add_row(
        "mean (all)", "", _fmt(delta.mean_before), _fmt(delta.mean_after), _fmt(delta.mean_delta, signed=True),
        f"{lo:+.4f} … {hi:+.4f}", "",
    )
    if verdict.mean_delta is not None:
        jl, jh = verdict.mean_delta_ci or (float("nan"), float("nan"))
        table.add_row("mean (judged)", "", "", "", _fmt(verdict.mean_delta, signed=True), f"{jl:+.4f} … {jh:+.4f}",
                      f"{len(verdict.judged)} findings")
    stdout.print(table)
    stdout.print(f"verdict: {verdict.verdict} - {verdict.reason}", highlight=False, markup=False)
    stdout.print(
        f"parameters {report.parameters_before:,} -> {report.parameters_after:,} "
        f"({report.parameters_removed:.1%} removed); MACs {report.macs_before / 1e9:.3f} G -> "
        f"{report.macs_after / 1e9:.3f} G ({report.macs_removed:.1%} removed; "
        f"{report.macs_removed_by_pruning:.1%} against the original with its transitions pooling first too)",
        highlight=False,
    )
    stdout.print(
        f"CPU ({latency['threads']} threads) batch 1: {latency['batch1_ms_before']} -> {latency['batch1_ms_after']} ms "
        f"({latency['batch1_speedup']}x); batch 16: {latency['batch16_images_per_s_before']} -> "
        f"{latency['batch16_images_per_s_after']} images/s ({latency['batch16_speedup']}x)",
        highlight=False,
    )
    stdout.print(
        f"registered candidate {version['version']} (version {version['manifest_version']}, {version['path']}); "
        f"activate with: chexd model activate {version['version']}",
        highlight=False,
        markup=False,
    )
    if manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")


def _fmt(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
