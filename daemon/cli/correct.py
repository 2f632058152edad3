"""``chexd correct``: zero a few weights of one finding's class row on cached features, checked on held-out data.

It loads the active model (or ``--model``), reads the false-positive images, and hands the job to
``daemon.maintenance.correct`` (pooled features of a validation source computed once and cached under
``<data_dir>/cache/features``, a patient-disjoint selection/verification split, the search, the held-out check, a
NEW artifact registered as a *candidate* inside an admin-job record). The active model never changes here:
``chexd model activate VERSION`` does that. This module parses the options, shows progress and prints.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout
from daemon.cli.context import settings
from daemon.cli.jobs import guarded, parent, source_options
from daemon.cli.options import (
    BatchOpt,
    CountOpt,
    Cxr14Opt,
    DeviceOpt,
    DicomDirOpt,
    DryRunOpt,
    JsonOpt,
    LabelsOpt,
    ModelOpt,
    PhantomOpt,
    RenderOpt,
    SplitOpt,
)
from daemon.cli.progress import progress_reporter

REFUSED = 3  # exit status when the correction is refused (no set of channels within the limit works)


def _ci(ci: list[float] | tuple[float, float] | None, fmt: str = "{:+.4f}") -> str:
    return "no CI" if not ci else f"95% CI [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _split_line(split: dict[str, Any], name: str) -> str:
    from model.types import LABELS

    c = LABELS.index(name)
    return (f"selection part (chose the channels): {split['selection_images']} images, "
            f"{split['positives_selection'][c]} {name} positives; verification part (judges the edit, never seen by "
            f"the search): {split['verification_images']} images, {split['positives_verification'][c]} {name} "
            f"positives; split by {split['kind']} (seed {split['seed']}; {split['note']}); at least "
            f"{split['min_positives']} positives per part are needed for a verdict")


def _held_out_lines(h: dict[str, Any]) -> list[str]:
    name = h["finding"]

    def value(v: float | None, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    few = h["true_positives"] < h["min_positives"]
    return [
        *([f"note: only {h['true_positives']} held-out {name} true positive(s) at the threshold (fewer than "
           f"{h['min_positives']}): the loss rate and its CI rest on very few images"] if few else []),
        f"held out: {h['true_positives_lost']} of {h['true_positives']} {name} true positives lost (rate "
        f"{value(h['tp_loss_rate'], '{:.1%}')}, {_ci(h['tp_loss_ci'], '{:.1%}')}; tolerance {h['tolerance']:.1%}) "
        f"on {h['images']} verification images with {h['positives']} positives",
        f"held-out false positives of {name}: {h['pattern_examples']}, {h['pattern_corrected']} corrected; "
        f"mean change of p {value(h['pattern_delta_p'], '{:+.4f}')} ({_ci(h['pattern_delta_p_ci'])})",
        f"{name} AUROC on the verification part {value(h['auroc_before'])} -> {value(h['auroc_after'])} "
        f"(change {value(h['auroc_delta'], '{:+.4f}')}, {_ci(h['auroc_delta_ci'])})",
        f"held-out verdict: {h['verdict']} - {h['reason']}",
    ]


def _print_correction(data: dict[str, Any]) -> None:
    v = data["verification"]
    table = Table("image", "p before", "p after", "change", title=f"{v['finding']} (threshold {v['threshold']:.4g})")
    for t in v["targets"]:
        table.add_row(t["id"], f"{t['probability_before']:.4f}", f"{t['probability_after']:.4f}",
                      f"{t['delta_probability']:+.4f}")
    stdout.print(table)
    zeroed = ", ".join(f"{c} (w={w:.4g})" for c, w in zip(data["channels"], data["original_weights"], strict=True))

    def auroc(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        f"zeroed {len(data['channels'])} weight(s) of the {v['finding']} row: channel {zeroed}",
        _split_line(data["split"], v["finding"]),
        f"selection part: true positives {v['true_positives']}, lost {v['true_positives_lost']} (zero by "
        f"construction: the search keeps them); false positives {v['false_positives_before']} -> "
        f"{v['false_positives_after']}; AUROC {auroc(v['auroc_before'])} -> {auroc(v['auroc_after'])}",
        *_held_out_lines(data["held_out"]),
        f"other findings bit-identical: {'yes' if v['other_findings_bit_identical'] else 'NO'} "
        f"({len(v['other_findings_checked'])} findings on {v['validation_images'] + len(v['targets'])} images, "
        "checked again on the saved artifact; true by construction of a one-row edit, a guard against bugs)",
        data["message"],
    ]
    for line in lines:
        stdout.print(line, highlight=False, markup=False)


def correct(
    finding: Annotated[str, typer.Option("--finding", "-f", help="Finding whose false positive to remove.")],
    false_positive: Annotated[
        list[str] | None,
        typer.Option("--false-positive", help="A false-positive image: SOP Instance UID of a stored image, or a "
                     "DICOM/PNG/JPEG file (repeat for several)."),
    ] = None,
    from_feedback: Annotated[
        bool,
        typer.Option("--from-feedback", help="Also take every stored image that radiologists marked absent for the "
                     "finding ('chexd feedback UID --finding F --absent') and that the model still calls present."),
    ] = False,
    max_channels: Annotated[int, typer.Option(min=1, max=64, help="Most weights to zero.")] = 5,
    tolerance: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Largest acceptable share of the verification part's true positives "
                     "that the edit may lose (0.02: 2%)."),
    ] = 0.02,
    n_bootstrap: Annotated[int, typer.Option(min=0, help="Patient bootstrap resamples for the held-out CIs.")] = 1000,
    min_positives: Annotated[
        int,
        typer.Option(min=1, help="Fewest positives of the finding each part needs, and fewest held-out true positives "
                     "the verdict needs (default: MIN_POSITIVES, 10). Lower it only knowing that the held-out loss "
                     "rate then rests on fewer cases."),
    ] = 10,
    phantom: PhantomOpt = None,
    count: CountOpt = 300,
    seed: Annotated[int, typer.Option(help="Phantom series seed, and seed of the selection/verification split and "
                                           "the bootstrap.")] = 0,
    render_size: RenderOpt = 256,
    chestxray14: Cxr14Opt = None,
    split: SplitOpt = "test",
    dicom_dir: DicomDirOpt = None,
    labels: LabelsOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove a false-positive pattern by zeroing at most --max-channels weights of one finding's class row.

    The validation data is split patient-disjointly: on the selection part it chooses the smallest set of channels
    whose zeroing brings every given image under the finding's threshold while no selection true positive drops
    under it; on the verification part, which the search never saw, it reports the true positives lost (count,
    rate, patient-bootstrap CI), the change of p on held-out false positives of the pattern and the AUROC change.
    It registers a candidate version (the active model is unchanged) only when the held-out check passes.
    Exit 3 (refused) when no such set exists within the limit, when the held-out loss exceeds --tolerance, or when
    either part has fewer than 10 positives of the finding: the message states the rule, the numbers and the
    cheapest alternative."""
    from daemon.maintenance.correct import CorrectionOptions
    from daemon.maintenance.correct import correct as run_correction
    from daemon.maintenance.images import correction_targets
    from model.datasets import finding_index
    from model.types import LABELS

    index = finding_index(finding)
    if index is None:
        fail(f"Invalid --finding {finding!r} - expected one of {', '.join(LABELS)}", 2)
    if not false_positive and not from_feedback:
        fail("give at least one --false-positive image (or --from-feedback)", 2)
    name = LABELS[index]
    source = source_options(phantom=phantom, count=count, seed=seed, render_size=render_size,
                            chestxray14=chestxray14, split=split, dicom_dir=dicom_dir, labels=labels)
    cfg = settings()
    loaded = parent(cfg, model)
    targets, feedback = guarded(correction_targets, cfg, list(false_positive or []), name, from_feedback=from_feedback)
    options = CorrectionOptions(finding=name, max_channels=max_channels, tolerance=tolerance, n_bootstrap=n_bootstrap,
                                min_positives=min_positives, seed=seed, device=device, batch_size=batch_size,
                                dry_run=dry_run, from_feedback=from_feedback)
    with progress_reporter() as report:
        outcome = guarded(run_correction, cfg, loaded, source, targets, feedback, options, progress=report)
    if outcome.refused:
        _refuse(outcome.data, name, json_out)
    if json_out:
        sys.stdout.write(json.dumps(outcome.data, indent=2) + "\n")
        return
    _print_correction(outcome.data)
    if loaded.manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")


def _refuse(refusal: dict[str, Any], name: str, as_json: bool) -> NoReturn:
    """Print what the refusal found and end with exit status :data:`REFUSED`, naming the rule and the cheapest
    alternative."""
    if as_json:
        sys.stdout.write(json.dumps(refusal, indent=2) + "\n")
    else:
        if refusal.get("held_out"):
            for line in _held_out_lines(refusal["held_out"]):
                stdout.print(line, highlight=False, markup=False)
        if refusal.get("split"):
            stdout.print(_split_line(refusal["split"], name), highlight=False, markup=False)
    cheapest = refusal.get("alternatives") or []
    listed = "Alternatives, cheapest first" in refusal["reason"]  # the search's own refusal lists them already
    hint = f"; cheapest alternative: {cheapest[0]['description']}" if cheapest and not listed else ""
    fail(f"correction refused: {refusal['reason']} (rule: {refusal['rule']}){hint}", REFUSED)
