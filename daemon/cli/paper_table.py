"""``chexd paper-table``: every figure of the source paper's abstract that can be measured here, beside the paper's.

It runs the bundled SYNTHETIC demo pair (``chexd-demo``, a DenseNet121, and ``chexd-demo-compressed``) on the chest
phantom, and the real CheXNet predictions when ``--chexnet-preds`` (a folder holding ``preds.csv``) and
``--nih-labels`` (NIH's ``Data_Entry_2017*.csv(.gz)``) are given. One row per claim: value, 95% CI, the paper's
value, the data, a verdict (``model.paper``). Nothing is written, registered or activated; no database is used.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import err, fail
from daemon.cli.console import out as stdout

SYNTHETIC_LINE = (
    "The demo model is SYNTHETIC (trained only on chexd's chest phantom, not for diagnosis): rows marked 'demo model "
    "on the phantom' describe the method on phantom data, not on patients."
)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Plan:
    """How much each measurement does (``--quick`` or the full run)."""

    images: int  # phantom images per split (test: compression; val: correction, decide, fine-tune)
    n_bootstrap: int
    latency_rounds: int
    latency_repeats: int
    corrections: int
    splits: int  # calibration: patient-disjoint splits
    draws: int  # polarized channels: row permutations
    finetune_epochs: int


QUICK = _Plan(
    images=60,
    n_bootstrap=50,
    latency_rounds=3,
    latency_repeats=3,
    corrections=3,
    splits=2,
    draws=200,
    finetune_epochs=30,
)
FULL = _Plan(
    images=1500,
    n_bootstrap=1000,
    latency_rounds=10,
    latency_repeats=10,
    corrections=15,
    splits=5,
    draws=10_000,
    finetune_epochs=200,
)


def _say(message: str) -> None:
    err.print(f"paper-table: {message}", highlight=False, markup=False)


def _preds_file(chexnet_preds: Path | None, nih_labels: Path | None) -> Path | None:
    if chexnet_preds is None:
        return None
    if nih_labels is None:
        fail("--chexnet-preds needs --nih-labels (the Data_Entry_2017 csv holds the labels and patient ids)", 2)
    path = chexnet_preds / "preds.csv" if chexnet_preds.is_dir() else chexnet_preds
    if not path.is_file():
        fail(f"--chexnet-preds {chexnet_preds}: no preds.csv there - expected a folder holding preds.csv (or the file)")
    if not nih_labels.is_file():
        fail(f"--nih-labels {nih_labels}: no such file - expected NIH's Data_Entry_2017 csv(.gz)")
    return path


def _rows(plan: _Plan, *, preds: Path | None, nih_labels: Path | None, seed: int) -> tuple[list[Any], dict[str, Any]]:
    import torch

    from daemon.cli.calibrate import progress_reporter
    from daemon.store.registry import bundled_demo_model
    from model import paper
    from model.artifact import load_artifact
    from model.complexity import time_forward

    meta: dict[str, Any] = {"timings_s": {}}
    started = time.perf_counter()

    def lap(name: str) -> None:
        meta["timings_s"][name] = round(time.perf_counter() - started - sum(meta["timings_s"].values()), 2)

    full_path, compressed_path = bundled_demo_model("full"), bundled_demo_model("compressed")
    if full_path is None or compressed_path is None:
        fail("this build ships no bundled demo models (model/demo) - paper-table measures them")
    full, full_manifest = load_artifact(full_path)
    compressed, compressed_manifest = load_artifact(compressed_path)
    recipe = full_manifest.preprocessing
    labels = tuple(full_manifest.labels)
    meta["models"] = {
        m.name: {"version": m.version_id, "synthetic": m.synthetic} for m in (full_manifest, compressed_manifest)
    }
    lap("load models")
    rows: list[Any] = []

    # 1. compression: exact counts, ΔAUROC on the phantom test split, CPU latency
    _say(f"compression: {plan.images} phantom test images through both models")
    with progress_reporter() as report:
        test_full, test_compressed = paper.phantom_feature_sets(
            [full, compressed], recipe=recipe, split="test", seed=seed, count=plan.images, progress=report
        )
    rows.append(
        paper.compression_params_row(
            sum(p.numel() for p in full.parameters()), sum(p.numel() for p in compressed.parameters())
        )
    )
    delta, verdict = paper.measure_compression(
        test_full,
        test_compressed,
        paper.head_of(full),
        paper.head_of(compressed),
        labels=labels,
        n_bootstrap=max(plan.n_bootstrap, 10),
        seed=seed,
    )
    rows.append(paper.compression_auroc_row(delta, verdict, source=test_full.source))
    lap("compression: auroc")
    _say(f"latency: {plan.latency_rounds} rounds of {plan.latency_repeats} batch-1 forwards per model (CPU)")
    rounds = [
        time_forward(
            [full, compressed], input_size=recipe.input_size, batch_size=1, repeats=plan.latency_repeats, warmup=2
        )
        for _ in range(plan.latency_rounds)
    ]
    rows.append(
        paper.latency_row(
            [r[0] * 1e3 for r in rounds],
            [r[1] * 1e3 for r in rounds],
            device="cpu",
            threads=torch.get_num_threads(),
            input_size=recipe.input_size,
        )
    )
    lap("compression: latency")

    # 2.-5. on the full DenseNet121's features of the phantom validation split
    _say(f"correction, routing, fine-tuning: {plan.images} phantom validation images (chexd-demo)")
    with progress_reporter() as report:
        (val,) = paper.phantom_feature_sets(
            [full], recipe=recipe, split="val", seed=seed, count=plan.images, progress=report
        )
    weight, bias = paper.head_of(full)
    thresholds = dict(full_manifest.thresholds)
    lap("validation features")
    study = paper.measure_correction(
        weight,
        bias,
        thresholds,
        val,
        labels=labels,
        max_attempts=plan.corrections,
        n_bootstrap=plan.n_bootstrap,
        seed=seed,
    )
    rows.extend(paper.correction_rows(study))
    meta["correction"] = study.to_dict()
    lap("correction")
    rows.append(_routing(weight, bias, thresholds, val, labels, plan, seed))
    lap("routing")
    rows.extend(_calibration(preds, nih_labels, plan, seed))
    lap("calibration")
    rows.append(paper.head_parameters_row(*weight.shape))
    finetune = paper.measure_finetune(
        weight, bias, val, labels=labels, n_bootstrap=plan.n_bootstrap, seed=seed, max_epochs=plan.finetune_epochs
    )
    rows.extend(paper.finetune_rows(finetune))
    lap("fine-tune")
    rows.append(_polarized(weight, val, nih_labels, labels, plan, seed))
    lap("polarized")
    return rows, meta


def _routing(
    weight: Any, bias: Any, thresholds: dict[str, float], val: Any, labels: tuple[str, ...], plan: _Plan, seed: int
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


def _calibration(preds: Path | None, nih_labels: Path | None, plan: _Plan, seed: int) -> list[Any]:
    from model import paper
    from model.calibrate import calibrate
    from model.scores import read_scored_csv

    if preds is None or nih_labels is None:
        return paper.calibration_rows(
            None, reason="give --chexnet-preds (and --nih-labels): the real CheXNet predictions are not bundled"
        )
    _say(f"calibration: {preds} joined with {nih_labels.name}, {plan.splits} splits")
    scored = read_scored_csv(preds, nih_labels)
    result = calibrate(
        scored.scores, scored.labels, scored.patients, seed=seed, n_bootstrap=plan.n_bootstrap, n_splits=plan.splits
    )
    return paper.calibration_rows(result.to_dict(), source=f"{scored.source}: {len(scored.ids):,} images")


def _polarized(weight: Any, val: Any, nih_labels: Path | None, labels: tuple[str, ...], plan: _Plan, seed: int) -> Any:
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


# ------------------------------------------------------------------------------------------------------ output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ci(ci: list[float] | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"


_COLOURS = {
    "reproduced": "green",
    "not reproduced": "red",
    "true by construction": "yellow",
    "not measurable here": "dim",
}


def _print_table(data: dict[str, Any]) -> None:
    console = stdout if stdout.is_terminal else Console(file=sys.stdout, width=200)
    table = Table(title="chexd paper-table: the paper's abstract, claim by claim", show_lines=True)
    table.add_column("claim (paper)", max_width=26)
    table.add_column("measured here", max_width=24)
    table.add_column("95% CI", max_width=20)
    table.add_column("paper", max_width=16)
    table.add_column("data", max_width=14)
    table.add_column("verdict", max_width=14)
    table.add_column("why", min_width=60, ratio=1)
    for r in data["rows"]:
        unit = f" ({r['unit']})" if r["unit"] and r["value"] is not None else ""
        table.add_row(
            r["claim"],
            _fmt(r["value"]) + unit,
            _ci(r["ci"]),
            _fmt(r["paper_value"]),
            r["data"],
            f"[{_COLOURS[r['verdict']]}]{r['verdict']}[/]",
            r["reason"],
        )
    console.print(table)
    console.print(data["note"], highlight=False)


def _markdown(data: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| claim (paper) | measured here | 95% CI | paper | data | verdict | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        unit = f" ({r['unit']})" if r["unit"] and r["value"] is not None else ""
        lines.append(
            "| "
            + " | ".join(
                cell(x)
                for x in (
                    r["claim"],
                    _fmt(r["value"]) + unit,
                    _ci(r["ci"]),
                    _fmt(r["paper_value"]),
                    r["data"],
                    f"**{r['verdict']}**",
                    r["reason"],
                )
            )
            + " |"
        )
    return "\n".join(lines) + f"\n\n{data['note']}\n"


def paper_table(
    chexnet_preds: Annotated[
        Path | None,
        typer.Option(
            "--chexnet-preds", help="Folder holding preds.csv: real CheXNet probabilities (prob_<Label> columns)."
        ),
    ] = None,
    nih_labels: Annotated[
        Path | None,
        typer.Option(
            "--nih-labels",
            help="NIH Data_Entry_2017 csv(.gz): labels and patients for --chexnet-preds, and the label "
            "co-occurrence for the polarized-channel row.",
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help=f"Small counts for CI ({QUICK.images} phantom images per split, {QUICK.n_bootstrap} "
            "bootstrap draws): well under a minute, wide intervals.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: rows + settings.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a markdown table.")] = False,
    images: Annotated[
        int | None,
        typer.Option(min=40, help=f"Phantom images per split (default {FULL.images}; --quick {QUICK.images})."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Phantom series, split and bootstrap seed.")] = 0,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help="CPU threads for torch. On a busy 2-core machine one thread "
            "was 4x faster than two (threads waiting for each other).",
        ),
    ] = 1,
) -> None:
    """Regenerate each figure of the paper's abstract that can be measured here, beside the paper's value, with a
    95% CI and a verdict: reproduced / not reproduced / true by construction / not measurable here. Uses the bundled
    SYNTHETIC demo models on the phantom, and real CheXNet predictions with --chexnet-preds/--nih-labels."""
    if as_json and markdown:
        fail("choose one of --json and --markdown", 2)
    preds = _preds_file(chexnet_preds, nih_labels)
    plan = QUICK if quick else FULL
    if images is not None:
        from dataclasses import replace

        plan = replace(plan, images=images)
    import torch

    started = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, meta = _rows(plan, preds=preds, nih_labels=nih_labels, seed=seed)
    finally:
        torch.set_num_threads(previous)
    data = {
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
        "verdicts": {
            v: sum(r.verdict == v for r in rows)
            for v in ("reproduced", "not reproduced", "true by construction", "not measurable here")
        },
        "seconds": round(time.perf_counter() - started, 1),
    } | meta
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif markdown:
        sys.stdout.write(_markdown(data))
    else:
        _print_table(data)
