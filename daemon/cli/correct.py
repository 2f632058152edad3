"""``chexd correct``: zero a few weights of one finding's class row on cached features, checked on held-out data.

Both load the active model (or ``--model``), compute the pooled final features of a validation source once (cached
under ``<data_dir>/cache/features`` by weights hash + data source + preprocessing), do their work inside an admin-job
record, write a NEW artifact (the parent's manifest fields, provenance + one entry, metrics + a report) and register
it as a *candidate*. The active model never changes here: ``chexd model activate VERSION`` does that.

``correct`` zeroes a few weights of one finding's class row so the given false-positive images fall under its
threshold while no validation true positive does, and proves the other findings' logits bit-identical
(``model.correct``). ``finetune`` refits the whole 14 x C head with class weighting and early stopping
(``model.finetune``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from daemon.cli.calibrate import fail_with
from daemon.cli.console import fail
from daemon.cli.console import out as stdout

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from daemon.maintenance import Parent, SourceOptions
    from daemon.settings import Settings

REFUSED = 3  # exit status when the correction is refused (no set of channels within the limit works)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
Progress = Callable[[str, int, int], None]

# --- shared options ------------------------------------------------------------------------------------------------

PhantomOpt = Annotated[str | None, typer.Option(help="Phantom split for validation: train, val or test (default val).")]
CountOpt = Annotated[int, typer.Option(min=10, help="Phantom validation images.")]
SeedOpt = Annotated[int, typer.Option(help="Phantom series (and split) seed.")]
RenderOpt = Annotated[int, typer.Option(min=64, max=1024, help="Side in pixels at which phantom images are rendered.")]
Cxr14Opt = Annotated[Path | None, typer.Option(help="ChestX-ray14 folder (images/, Data_Entry_2017*.csv, lists).")]
SplitOpt = Annotated[str, typer.Option(help="ChestX-ray14 split: test or train_val.")]
DicomDirOpt = Annotated[Path | None, typer.Option(help="Folder of DICOM images labelled by --labels.")]
LabelsOpt = Annotated[Path | None, typer.Option(help="Labels CSV for --dicom-dir (NIH style or 0/1 columns).")]
ModelOpt = Annotated[Path | None, typer.Option(help="Artifact to start from (default: the active model).")]
DeviceOpt = Annotated[str, typer.Option(help="Device for the feature pass: auto, cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per forward pass when computing features.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Do the job and report; write and register nothing.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _settings() -> Settings:
    from daemon.cli.context import settings

    return settings()


def _reporter(quiet: bool):  # type: ignore[no-untyped-def]
    from daemon.cli.calibrate import progress_reporter

    return progress_reporter(quiet=quiet)


def _parent(settings: Settings, model: Path | None) -> Parent:
    from daemon.maintenance import MaintenanceError, load_parent

    try:
        return load_parent(settings, model)
    except MaintenanceError as exc:
        fail_with(exc)


def _source_options(**options: Any) -> SourceOptions:
    """The validation-source options as the layer's SourceOptions; conflicting options exit 2 before any work."""
    from daemon.maintenance import MaintenanceError, SourceOptions

    try:
        return SourceOptions(**options)
    except MaintenanceError as exc:
        fail_with(exc)


def _run_job(settings: Settings, kind: str, params: dict[str, Any], work: Callable[[Any], dict[str, Any]]
             ) -> dict[str, Any]:
    """``work(job)`` inside an admin-job record; expected failures become a CLI error (exit 1, or 2 for options)."""
    from daemon.maintenance import MaintenanceError, run_job

    try:
        return run_job(settings, kind, params, work)
    except MaintenanceError as exc:
        fail_with(exc)


# --- false-positive images -------------------------------------------------------------------------------------------


def _read_file(path: Path) -> np.ndarray:
    from model.errors import ModelError
    from model.preprocess import decode_file

    try:
        return decode_file(path)
    except ModelError as exc:
        fail(str(exc))


def _read_uid(settings: Settings, uid: str) -> np.ndarray:
    from sqlalchemy import select

    from daemon.store.registry import registry_sessions
    from daemon.store.tables import Instance
    from daemon.work.worker import PermanentJobError, read_stored_image

    with registry_sessions(settings)() as session:
        rel = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == uid))
    if rel is None:
        fail(f"no stored image with SOP Instance UID {uid} - give a UID the daemon received, or a DICOM/PNG file "
             "path", 2)
    root = settings.spool_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        fail(f"stored path of {uid} lies outside the spool ({rel!r})")
    try:
        return read_stored_image(path)[1]
    except PermanentJobError as exc:
        fail(f"SOP Instance UID {uid}: {exc}")


def _feedback_images(settings: Settings, finding: str) -> list[tuple[str, np.ndarray]]:
    """(SOP Instance UID, decoded image) of every stored image whose newest radiologist verdict on ``finding`` is
    "absent" (``chexd feedback UID --finding F --absent``)."""
    from daemon.store.feedback import feedback_items
    from daemon.store.registry import registry_sessions
    from daemon.work.worker import PermanentJobError, read_stored_image

    images = []
    for item in feedback_items(registry_sessions(settings), settings.spool_dir.resolve()):
        if item.verdicts.get(finding) is False:
            try:
                images.append((item.sop_instance_uid, read_stored_image(item.path)[1]))
            except PermanentJobError as exc:
                fail(f"feedback image {item.sop_instance_uid}: {exc}")
    return images


def _false_positive_images(settings: Settings, refs: list[str]) -> list[tuple[str, np.ndarray]]:
    """(id, decoded image [0, 1]) per reference: an existing file (DICOM, PNG, JPEG) or a stored SOP Instance UID."""
    images = []
    for ref in refs:
        path = Path(ref).expanduser()
        if path.is_file():
            images.append((str(path), _read_file(path)))
        elif _UID.match(ref):
            images.append((ref, _read_uid(settings, ref)))
        else:
            fail(f"--false-positive {ref!r} is neither a file nor a SOP Instance UID", 2)
    return images


# --- chexd correct ---------------------------------------------------------------------------------------------------


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


def _threshold_alternative(name: str, threshold: float, p_targets: np.ndarray, p_held_out: np.ndarray,
                           y_held_out: np.ndarray) -> dict[str, Any] | None:
    """Raising the threshold just above the targets' highest probability, and what that costs on the verification
    part (None when no threshold below 1 can do it)."""
    import numpy as np

    new = float(np.nextafter(np.float32(p_targets.max()), np.float32(1.0)))
    if new >= 1.0:
        return None
    tp = y_held_out & (p_held_out >= threshold)
    lost = int((tp & (p_held_out < new)).sum())
    return {"kind": "threshold", "finding": name, "threshold": new, "current_threshold": threshold,
            "held_out_true_positives": int(tp.sum()), "held_out_true_positives_lost": lost,
            "description": f"recalibrate the threshold: raising {name} from {threshold:.4g} to {new:.6g} clears the "
            f"case(s) and would lose {lost} of {int(tp.sum())} held-out true positives (all findings: 'chexd "
            "calibrate')"}


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
    import torch

    from daemon.maintenance import backbone_check, validation_features, write_candidate
    from model.correct import (
        CorrectionRefused,
        apply_correction,
        check_held_out,
        plan_correction,
        verify_correction,
    )
    from model.datasets import finding_index
    from model.features import compute_features
    from model.types import LABELS
    from model.verification import split_features

    index = finding_index(finding)
    if index is None:
        fail(f"Invalid --finding {finding!r} - expected one of {', '.join(LABELS)}", 2)
    if not false_positive and not from_feedback:
        fail("give at least one --false-positive image (or --from-feedback)", 2)
    name = LABELS[index]
    source = _source_options(phantom=phantom, count=count, seed=seed, render_size=render_size,
                             chestxray14=chestxray14, split=split, dicom_dir=dicom_dir, labels=labels)
    settings = _settings()
    parent = _parent(settings, model)
    network, manifest = parent.network, parent.manifest
    targets = _false_positive_images(settings, list(false_positive or []))
    feedback = _feedback_images(settings, name) if from_feedback else []
    known = {ref for ref, _ in targets}
    feedback = [(uid, image) for uid, image in feedback if uid not in known]
    if from_feedback and not feedback and not targets:
        fail(f"no stored image has an 'absent' verdict on {name} ('chexd feedback UID --finding {name} --absent' "
             "records one)", 2)
    params: dict[str, Any] = {
        "finding": name,
        "false_positives": [ref for ref, _ in targets],
        "from_feedback": from_feedback,
        "max_channels": max_channels,
        "tolerance": tolerance,
        "min_positives": min_positives,
        "split_seed": seed,
        "parent_version": manifest.version_id,
        "dry_run": dry_run,
    }
    refusal: dict[str, Any] | None = None

    def refuse(job: Any, data: dict[str, Any]) -> dict[str, Any]:
        nonlocal refusal
        refusal = data | {"refused": True, "model": parent.info(), "candidate": None}
        job.state = "refused"
        job.result = {"refused": True, "reason": data["reason"], "rule": data.get("rule"),
                      "alternatives": list(data.get("alternatives", ()))}
        return refusal

    def work(job: Any) -> dict[str, Any]:
        with _reporter(quiet=False) as report:
            val, cached = validation_features(settings, parent, source, device=device, batch_size=batch_size,
                                              progress=report)
            zeros = [0] * len(LABELS)
            target_set = compute_features(network, [(ref, None, image, zeros) for ref, image in targets + feedback],
                                          recipe=manifest.preprocessing, device=device, batch_size=batch_size)
        network.cpu()  # the head's arithmetic and every check run on the CPU, on the cached features
        head = network.classifier  # type: ignore[union-attr]
        row = manifest.labels.index(name)
        threshold = manifest.thresholds[name]
        if feedback:  # a feedback image the model already calls absent needs no correction: leave it out
            with torch.inference_mode():
                logits = head(torch.from_numpy(target_set.pooled))[:, row]
            still = torch.sigmoid(logits).numpy() >= threshold
            keep = [i for i in range(len(target_set)) if i < len(targets) or still[i]]
            params["false_positives_from_feedback"] = [target_set.ids[i] for i in keep if i >= len(targets)]
            if not keep:
                raise ValueError(f"every image marked absent for {name} is already below the threshold "
                                 f"{threshold:.4g}: nothing to correct")
            target_set = target_set.subset(keep)
        selection, verification, parts = split_features(val, seed=seed)
        params.update({"validation_source": val.source, "validation_images": len(val),
                       "selection_images": len(selection), "verification_images": len(verification),
                       "split_by": parts.kind})
        context = {"finding": name, "validation_source": val.source, "validation_images": len(val),
                   "split": parts.to_dict(), "features_from_cache": cached}
        fewest = min(parts.positives_selection[index], parts.positives_verification[index])
        if fewest < min_positives:
            return refuse(job, context | {
                "rule": f"each part needs at least {min_positives} {name} positives: the selection part chooses the "
                        "channels, the verification part judges the held-out true-positive loss",
                "reason": f"too few positives: {name} has {parts.positives_selection[index]} positive(s) in the "
                          f"selection part and {parts.positives_verification[index]} in the verification part "
                          f"(minimum {min_positives} in each), so no held-out verdict is possible",
                "alternatives": [{"kind": "needs_data", "finding": name,
                                  "description": f"needs more data: a larger labelled validation source with more "
                                  f"{name} positives (--count, --chestxray14 or --dicom-dir)"}],
                "held_out": None,
            })
        weight = head.weight.detach().float().numpy()
        bias = head.bias.detach().float().numpy()
        try:
            plan = plan_correction(weight, bias, manifest.thresholds, selection, target_set.pooled, finding,
                                   max_channels, target_ids=target_set.ids, labels=manifest.labels)
        except CorrectionRefused as exc:
            return refuse(job, exc.to_dict() | context | {
                "rule": f"at most {max_channels} zeroed weights (--max-channels) that clear every case and keep every "
                        "true positive of the selection part",
                "held_out": None,
            })
        edited = apply_correction(network, plan)
        after = edited.classifier  # type: ignore[union-attr]
        held_out = check_held_out(weight, bias, after.weight.detach().float().numpy(),
                                  after.bias.detach().float().numpy(), manifest.thresholds, verification,
                                  finding=name, labels=manifest.labels, tolerance=tolerance, n_bootstrap=n_bootstrap,
                                  min_positives=min_positives,
                                  seed=seed)
        result = plan.to_dict() | context | {"held_out": held_out.to_dict()}
        if not held_out.passed:
            alternatives = []
            if held_out.verdict == "tp_loss":
                with torch.inference_mode():
                    p_targets = torch.sigmoid(head(torch.from_numpy(target_set.pooled))[:, row]).numpy()
                    p_held = torch.sigmoid(head(torch.from_numpy(verification.pooled))[:, row]).numpy()
                option = _threshold_alternative(name, threshold, p_targets, p_held,
                                                verification.labels[:, index].astype(bool))
                alternatives = [option] if option is not None else []
                alternatives.append({"kind": "finetune", "finding": name,
                                     "description": f"fine-tune the head with the case(s) as {name} negatives "
                                     "('chexd finetune'; all 14 rows change)"})
            else:
                alternatives = [{"kind": "needs_data", "finding": name,
                                 "description": f"needs more data: more labelled {name} positives the parent "
                                 "detects, or recalibrate the threshold first ('chexd calibrate')"}]
            return refuse(job, result | {
                "rule": f"the edit may lose at most {tolerance:.1%} (--tolerance) of the verification part's true "
                        f"positives, and each part needs at least {min_positives} {name} positives (the verification "
                        f"part at least {min_positives} that the parent detects)",
                "reason": f"held-out check failed ({held_out.verdict}): {held_out.reason}",
                "alternatives": alternatives,
            })

        def check(reloaded: nn.Module) -> dict[str, Any]:
            again = verify_correction(network, reloaded, finding=plan.finding, thresholds=manifest.thresholds,
                                      features=selection, target_features=target_set.pooled,
                                      target_ids=target_set.ids, labels=manifest.labels)
            backbone, changed = backbone_check(network, reloaded)
            saved = reloaded.classifier  # type: ignore[union-attr]
            lost = check_held_out(weight, bias, saved.weight.detach().float().numpy(),
                                  saved.bias.detach().float().numpy(), manifest.thresholds, verification,
                                  finding=name, labels=manifest.labels, tolerance=tolerance, n_bootstrap=0,
                                  min_positives=min_positives
                                  ).true_positives_lost
            if (not again.passed or not backbone or changed != len(plan.channels)
                    or lost != held_out.true_positives_lost):
                raise ValueError(
                    f"the saved {manifest.dtype} artifact does not reproduce the verified edit (targets corrected: "
                    f"{again.targets_corrected}, true positives lost: {again.true_positives_lost}, held-out true "
                    f"positives lost: {lost} instead of {held_out.true_positives_lost}, other findings identical: "
                    f"{again.other_findings_bit_identical}, backbone identical: {backbone}, changed weights: "
                    f"{changed}) - nothing was registered"
                )
            return {"dtype": manifest.dtype, "verification": again.to_dict(), "backbone_identical": backbone,
                    "changed_weights": changed, "held_out_true_positives_lost": lost}

        if dry_run:
            candidate = None
            check(edited)
            message = "dry run: no candidate was written; the active model is unchanged"
        else:
            written = write_candidate(settings, edited, manifest, operation="correct", params=params, report=result,
                                      check=check)
            candidate, result = written.to_dict(), written.report
            message = (f"registered candidate {written.version} (version {written.manifest_version}); the active "
                       f"model is unchanged - 'chexd model activate {written.version}' makes it active")
        job.result = {"channels": list(plan.channels), "true_positives_lost": plan.verification.true_positives_lost,
                      "held_out_true_positives_lost": held_out.true_positives_lost,
                      "held_out_verdict": held_out.verdict, "targets": len(target_set),
                      "candidate": candidate["version"] if candidate else None}
        return result | {"model": parent.info(), "candidate": candidate, "message": message}

    data = _run_job(settings, "correct", params, work)
    if refusal is not None:
        if json_out:
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
    if json_out:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    _print_correction(data)
    if manifest.synthetic:
        stdout.print("[bold]SYNTHETIC DEMO MODEL - NOT FOR DIAGNOSIS[/]")
