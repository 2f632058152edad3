"""The paper's abstract, claim by claim (``chexd paper-table``; ``model.paper`` builds the rows): the bundled
SYNTHETIC demo pair (``chexd-demo``, a DenseNet121, and ``chexd-demo-compressed``) measured on the chest phantom,
and the real CheXNet predictions when a predictions file and NIH's labels are given. Nothing is written, registered
or activated; no database is used."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.maintenance.errors import MaintenanceError, Progress

__all__ = ["FULL", "QUICK", "SYNTHETIC_LINE", "VERDICTS", "Plan", "paper_table"]

SYNTHETIC_LINE = (
    "The demo model is SYNTHETIC (trained only on chexd's chest phantom, not for diagnosis): rows marked 'demo model "
    "on the phantom' describe the method on phantom data, not on patients."
)
VERDICTS = ("reproduced", "not reproduced", "true by construction", "not measurable here")
Say = Callable[[str], None]
Stages = Callable[[], AbstractContextManager[Progress]]  # a fresh progress callback per stage


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """How much each measurement does (``--quick`` or the full run)."""

    images: int  # phantom images per split (test: compression; val: correction, decide, fine-tune)
    n_bootstrap: int
    latency_rounds: int
    latency_repeats: int
    corrections: int
    splits: int  # calibration: patient-disjoint splits
    draws: int  # polarized channels: row permutations
    finetune_epochs: int


QUICK = Plan(
    images=60,
    n_bootstrap=50,
    latency_rounds=3,
    latency_repeats=3,
    corrections=3,
    splits=2,
    draws=200,
    finetune_epochs=30,
)
FULL = Plan(
    images=1500,
    n_bootstrap=1000,
    latency_rounds=10,
    latency_repeats=10,
    corrections=15,
    splits=5,
    draws=10_000,
    finetune_epochs=200,
)


def paper_table(plan: Plan, *, preds: Path | None, nih_labels: Path | None, seed: int, threads: int, quick: bool,
                say: Say, stages: Stages) -> dict[str, Any]:
    """Every row with the settings, the verdict counts, the seconds taken and the measurement's metadata (models,
    per-stage timings, the correction study), as ``--json`` prints it. Torch runs on ``threads`` CPU threads
    (restored after). ``say`` tells what is being measured; ``stages()`` gives the progress of each feature pass.
    Raises MaintenanceError when this build ships no demo models."""
    import torch

    started = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, meta = _rows(plan, preds=preds, nih_labels=nih_labels, seed=seed, say=say, stages=stages)
    finally:
        torch.set_num_threads(previous)
    return {
        "rows": [r.to_dict() for r in rows],
        "note": SYNTHETIC_LINE,
        "synthetic_demo": True,
        "quick": quick,
        "settings": {
            "images_per_split": plan.images,
            "threads": threads,
            "n_bootstrap": plan.n_bootstrap,
            "seed": seed,
            "latency_rounds": plan.latency_rounds,
            "latency_repeats": plan.latency_repeats,
            "correction_attempts": plan.corrections,
            "calibration_splits": plan.splits,
            "permutation_draws": plan.draws,
            "finetune_epochs": plan.finetune_epochs,
            "chexnet_preds": str(preds) if preds else None,
            "nih_labels": str(nih_labels) if nih_labels else None,
        },
        "verdicts": {v: sum(r.verdict == v for r in rows) for v in VERDICTS},
        "seconds": round(time.perf_counter() - started, 1),
    } | meta


class _Clock:
    """Per-stage wall seconds, each lap the time since the previous one."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.started - sum(self.timings.values()), 2)


def _rows(plan: Plan, *, preds: Path | None, nih_labels: Path | None, seed: int, say: Say, stages: Stages
          ) -> tuple[list[Any], dict[str, Any]]:
    """(rows in the abstract's order, metadata): compression on the test split, then correction, routing,
    calibration, fine-tuning and polarized channels on the full model's validation features."""
    from model import paper

    clock = _Clock()
    meta: dict[str, Any] = {"timings_s": clock.timings}
    (full, full_manifest), (compressed, compressed_manifest) = _demo_pair()
    meta["models"] = {
        m.name: {"version": m.version_id, "synthetic": m.synthetic} for m in (full_manifest, compressed_manifest)
    }
    clock.lap("load models")
    rows = _compression_rows(full, compressed, full_manifest, plan, seed, say, stages, clock)
    say(f"correction, routing, fine-tuning: {plan.images} phantom validation images (chexd-demo)")
    with stages() as report:
        (val,) = paper.phantom_feature_sets(
            [full], recipe=full_manifest.preprocessing, split="val", seed=seed, count=plan.images, progress=report
        )
    clock.lap("validation features")
    weight, bias = paper.head_of(full)
    labels, thresholds = tuple(full_manifest.labels), dict(full_manifest.thresholds)
    study = paper.measure_correction(weight, bias, thresholds, val, labels=labels, max_attempts=plan.corrections,
                                     n_bootstrap=plan.n_bootstrap, seed=seed)
    rows.extend(paper.correction_rows(study))
    meta["correction"] = study.to_dict()
    clock.lap("correction")
    rows.append(_routing(weight, bias, thresholds, val, labels, plan, seed))
    clock.lap("routing")
    rows.extend(_calibration(preds, nih_labels, plan, seed, say))
    clock.lap("calibration")
    rows.append(paper.head_parameters_row(*weight.shape))
    finetune = paper.measure_finetune(weight, bias, val, labels=labels, n_bootstrap=plan.n_bootstrap, seed=seed,
                                      max_epochs=plan.finetune_epochs)
    rows.extend(paper.finetune_rows(finetune))
    clock.lap("fine-tune")
    rows.append(_polarized(weight, val, nih_labels, labels, plan, seed))
    clock.lap("polarized")
    return rows, meta


def _demo_pair() -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """(network, manifest) of the bundled full and compressed demo models; MaintenanceError when not shipped."""
    from daemon.store.registry import bundled_demo_model
    from model.artifact import load_artifact

    full_path, compressed_path = bundled_demo_model("full"), bundled_demo_model("compressed")
    if full_path is None or compressed_path is None:
        raise MaintenanceError("this build ships no bundled demo models (model/demo) - paper-table measures them")
    return load_artifact(full_path), load_artifact(compressed_path)


def _compression_rows(full: Any, compressed: Any, manifest: Any, plan: Plan, seed: int, say: Say, stages: Stages,
                      clock: _Clock) -> list[Any]:
    """Exact parameter counts, the ΔAUROC on the phantom test split and the CPU latency of the demo pair."""
    import torch

    from model import paper
    from model.complexity import time_forward

    recipe, labels = manifest.preprocessing, tuple(manifest.labels)
    say(f"compression: {plan.images} phantom test images through both models")
    with stages() as report:
        test_full, test_compressed = paper.phantom_feature_sets(
            [full, compressed], recipe=recipe, split="test", seed=seed, count=plan.images, progress=report
        )
    rows = [paper.compression_params_row(sum(p.numel() for p in full.parameters()),
                                         sum(p.numel() for p in compressed.parameters()))]
    delta, verdict = paper.measure_compression(test_full, test_compressed, paper.head_of(full),
                                               paper.head_of(compressed), labels=labels,
                                               n_bootstrap=max(plan.n_bootstrap, 10), seed=seed)
    rows.append(paper.compression_auroc_row(delta, verdict, source=test_full.source))
    clock.lap("compression: auroc")
    say(f"latency: {plan.latency_rounds} rounds of {plan.latency_repeats} batch-1 forwards per model (CPU)")
    rounds = [
        time_forward([full, compressed], input_size=recipe.input_size, batch_size=1, repeats=plan.latency_repeats,
                     warmup=2)
        for _ in range(plan.latency_rounds)
    ]
    rows.append(paper.latency_row([r[0] * 1e3 for r in rounds], [r[1] * 1e3 for r in rounds], device="cpu",
                                  threads=torch.get_num_threads(), input_size=recipe.input_size))
    clock.lap("compression: latency")
    return rows


def _routing(
    weight: Any, bias: Any, thresholds: dict[str, float], val: Any, labels: tuple[str, ...], plan: Plan, seed: int
) -> Any:
    from model import paper
    from model.decide import decide
    from model.verification import split_features

    try:
        selection, verification, split = split_features(val, seed=seed)
        decision = decide(
            weight,
            bias,
            thresholds,
            selection,
            verification,
            split,
            labels=labels,
            n_bootstrap=plan.n_bootstrap,
            seed=seed,
            finetune_epochs=plan.finetune_epochs,
        )
    except ValueError as exc:
        return paper.routing_row(None, source=val.source, reason=f"chexd decide could not run: {exc}")
    data = decision.to_dict()
    return paper.routing_row(
        data["routed"],
        source=f"{val.source}: selection {len(selection)} / verification {len(verification)} images",
        reason="no radiologist feedback on the phantom, so no false-positive pattern can be diagnosed",
        details={"routes": [{k: r[k] for k in ("finding", "problem", "intervention")} for r in data["routes"]]},
    )


def _calibration(preds: Path | None, nih_labels: Path | None, plan: Plan, seed: int, say: Say) -> list[Any]:
    from model import paper
    from model.calibrate import calibrate
    from model.scores import read_scored_csv

    if preds is None or nih_labels is None:
        return paper.calibration_rows(
            None, reason="give --chexnet-preds (and --nih-labels): the real CheXNet predictions are not bundled"
        )
    say(f"calibration: {preds} joined with {nih_labels.name}, {plan.splits} splits")
    scored = read_scored_csv(preds, nih_labels)
    result = calibrate(
        scored.scores, scored.labels, scored.patients, seed=seed, n_bootstrap=plan.n_bootstrap, n_splits=plan.splits
    )
    return paper.calibration_rows(result.to_dict(), source=f"{scored.source}: {len(scored.ids):,} images")


def _polarized(weight: Any, val: Any, nih_labels: Path | None, labels: tuple[str, ...], plan: Plan, seed: int) -> Any:
    from model import paper
    from model.channels import analyse_channels, label_pairs
    from model.datasets import read_label_csv

    if nih_labels is not None:
        table = read_label_csv(nih_labels)
        pairs = label_pairs(
            table.labels, names=labels, source=f"NIH labels {nih_labels.name} ({len(table.ids):,} images)"
        )
        note = "real NIH label co-occurrence; the demo's weights were learnt from phantom labels"
    else:
        pairs = label_pairs(val.labels, names=labels, source=f"{val.source} labels")
        note = "phantom label co-occurrence (give --nih-labels for the real NIH labels)"
    analysis = analyse_channels(weight, pairs, top=100, draws=plan.draws, seed=seed)
    return paper.polarized_row(analysis.to_dict(), source=f"chexd-demo head; {pairs.source}", reason=note)
