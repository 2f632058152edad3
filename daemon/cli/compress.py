"""``chexd compress``: a smaller model version by channel pruning with least-squares refit (torch loads lazily).

The active model is never changed: the compressed artifact is registered as a *candidate* (``chexd model activate``
makes it active) after it was evaluated against its parent on the phantom test split, paired image by image.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from daemon.cli.console import out as stdout
from daemon.cli.context import settings
from daemon.cli.jobs import guarded, parent
from daemon.cli.options import JsonOpt, ModelOpt
from daemon.cli.progress import stage_bar

if TYPE_CHECKING:
    from daemon.maintenance.compress import Compression

__all__ = ["compress"]


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
    model: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compress the active model: prune DenseNet channels (a removed channel leaves every consumer), refit the kept
    weights by least squares to reproduce the original's layer outputs, optionally distil; evaluate before/after on
    the phantom test split (paired bootstrap CI of the AUROC difference) and time both on the CPU; register the
    result as a candidate version."""
    from daemon.maintenance.compress import CompressOptions
    from daemon.maintenance.compress import compress as run_compression

    cfg = settings()
    loaded = parent(cfg, model)
    options = CompressOptions(target_params=target_params, target_macs=target_macs,
                              calibration_images=calibration_images, distill_steps=distill_steps,
                              distill_scope=distill_scope, test_images=test_images, n_bootstrap=n_bootstrap, seed=seed)
    with stage_bar(quiet=json_out) as report:
        result = guarded(run_compression, cfg, loaded, options, progress=report)
    if json_out:
        data = result.summary | {"compression": result.report.to_dict(), "test": result.metrics["test"]}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    _print_compression(result, test_images)
    if loaded.manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")


def _print_compression(result: Compression, test_images: int) -> None:
    """The before/after table per finding, the verdict, sizes, CPU latency and the candidate to activate."""
    delta, verdict, report = result.delta, result.verdict, result.report
    version, latency = result.summary, result.summary["latency"]
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


def _fmt(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
