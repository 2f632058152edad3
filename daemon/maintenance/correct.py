"""Correction (``chexd correct``): zero a few weights of one finding's class row so given false-positive images fall
under its threshold while no selection true positive does, judged on a patient-disjoint verification part the
search never saw (``model.correct``). The edit is registered as a candidate only when the held-out check passes;
otherwise the job is *refused* with the rule, the numbers and the cheapest alternative."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daemon.maintenance.candidate import backbone_check, write_candidate
from daemon.maintenance.errors import Progress, quiet
from daemon.maintenance.jobs import run_job
from daemon.maintenance.sources import validation_features

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from daemon.maintenance.images import Image
    from daemon.maintenance.parent import Parent
    from daemon.maintenance.sources import SourceOptions
    from daemon.settings import Settings
    from model.features import FeatureSet

__all__ = ["Correction", "CorrectionOptions", "correct"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CorrectionOptions:
    """What ``chexd correct`` asks for: the ``finding`` (a LABELS name), at most ``max_channels`` zeroed weights, a
    held-out true-positive loss of at most ``tolerance`` (a share), ``min_positives`` per part, ``n_bootstrap``
    patient resamples, ``seed`` of the split and bootstrap; ``device``/``batch_size`` of the feature pass;
    ``dry_run``: write nothing."""

    finding: str
    max_channels: int = 5
    tolerance: float = 0.02
    n_bootstrap: int = 1000
    min_positives: int = 10
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32
    dry_run: bool = False
    from_feedback: bool = False


@dataclass(frozen=True, slots=True)
class Correction:
    """The job's report (``data``, as ``--json`` prints it), whether it was ``refused``, and the summary kept in the
    admin-job row (``job_result``)."""

    data: dict[str, Any]
    job_result: dict[str, Any]
    refused: bool = False


@dataclass(slots=True)
class _Run:
    """What one correction job has computed so far (the steps below fill it in order)."""

    parent: Parent
    options: CorrectionOptions
    params: dict[str, Any]
    targets: list[Image]
    feedback: list[Image]
    val: FeatureSet | None = None
    target_set: FeatureSet | None = None
    cached: bool = False
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def index(self) -> int:
        from model.types import LABELS

        return LABELS.index(self.options.finding)

    @property
    def row(self) -> int:
        return self.parent.manifest.labels.index(self.options.finding)

    @property
    def threshold(self) -> float:
        return self.parent.manifest.thresholds[self.options.finding]


def correct(
    settings: Settings,
    parent: Parent,
    source: SourceOptions,
    targets: list[Image],
    feedback: list[Image],
    options: CorrectionOptions,
    progress: Progress = quiet,
) -> Correction:
    """Run the correction inside a ``correct`` job record (``refused`` when refused). Raises MaintenanceError."""
    o = options
    params: dict[str, Any] = {
        "finding": o.finding,
        "false_positives": [ref for ref, _ in targets],
        "from_feedback": o.from_feedback,
        "max_channels": o.max_channels,
        "tolerance": o.tolerance,
        "min_positives": o.min_positives,
        "split_seed": o.seed,
        "parent_version": parent.manifest.version_id,
        "dry_run": o.dry_run,
    }
    run = _Run(parent=parent, options=o, params=params, targets=targets, feedback=feedback)

    def work(job: Any) -> Correction:
        outcome = _work(settings, run, source, progress)
        if outcome.refused:
            job.state = "refused"
        job.result = outcome.job_result
        return outcome

    return run_job(settings, "correct", params, work)


def _work(settings: Settings, run: _Run, source: SourceOptions, progress: Progress) -> Correction:
    """The job's steps: features, the images still to correct, the split, the search, the held-out check, the
    candidate."""
    from model.correct import CorrectionRefused, apply_correction, plan_correction
    from model.verification import split_features

    o, manifest, network = run.options, run.parent.manifest, run.parent.network
    _features(settings, run, source, progress)
    network.cpu()  # the head's arithmetic and every check run on the CPU, on the cached features
    head = network.classifier  # type: ignore[union-attr]
    _keep_still_positive(run, head)
    selection, verification, parts = split_features(run.val, seed=o.seed)
    run.params.update({"validation_source": run.val.source, "validation_images": len(run.val),
                       "selection_images": len(selection), "verification_images": len(verification),
                       "split_by": parts.kind})
    run.context = {"finding": o.finding, "validation_source": run.val.source, "validation_images": len(run.val),
                   "split": parts.to_dict(), "features_from_cache": run.cached}
    few = _too_few_positives(run, parts)
    if few is not None:
        return few
    weight = head.weight.detach().float().numpy()
    bias = head.bias.detach().float().numpy()
    try:
        plan = plan_correction(weight, bias, manifest.thresholds, selection, run.target_set.pooled, o.finding,
                               o.max_channels, target_ids=run.target_set.ids, labels=manifest.labels)
    except CorrectionRefused as exc:
        return _refused(run, exc.to_dict() | run.context | {
            "rule": f"at most {o.max_channels} zeroed weights (--max-channels) that clear every case and keep every "
                    "true positive of the selection part",
            "held_out": None,
        })
    edited = apply_correction(network, plan)
    held_out = _check_held_out(run, weight, bias, edited, verification, n_bootstrap=o.n_bootstrap)
    result = plan.to_dict() | run.context | {"held_out": held_out.to_dict()}
    if not held_out.passed:
        return _held_out_refusal(run, head, verification, held_out, result)
    check = _saved_check(run, selection, verification, weight, bias, plan, held_out)
    return _finish(settings, run, edited, check, plan, held_out, result)


def _features(settings: Settings, run: _Run, source: SourceOptions, progress: Progress) -> None:
    """Pooled features of the validation source (cached) and of the target images."""
    from model.features import compute_features
    from model.types import LABELS

    o, manifest = run.options, run.parent.manifest
    run.val, run.cached = validation_features(settings, run.parent, source, device=o.device,
                                                         batch_size=o.batch_size, progress=progress)
    zeros = [0] * len(LABELS)
    images = [(ref, None, image, zeros) for ref, image in run.targets + run.feedback]
    run.target_set = compute_features(run.parent.network, images, recipe=manifest.preprocessing, device=o.device,
                                      batch_size=o.batch_size)


def _keep_still_positive(run: _Run, head: nn.Module) -> None:
    """Leave out feedback images the model already calls absent (they need no correction); ValueError when none is
    left."""
    import torch

    if not run.feedback:
        return
    n = len(run.targets)
    with torch.inference_mode():
        logits = head(torch.from_numpy(run.target_set.pooled))[:, run.row]
    still = torch.sigmoid(logits).numpy() >= run.threshold
    keep = [i for i in range(len(run.target_set)) if i < n or still[i]]
    run.params["false_positives_from_feedback"] = [run.target_set.ids[i] for i in keep if i >= n]
    if not keep:
        raise ValueError(f"every image marked absent for {run.options.finding} is already below the threshold "
                         f"{run.threshold:.4g}: nothing to correct")
    run.target_set = run.target_set.subset(keep)


def _refused(run: _Run, data: dict[str, Any]) -> Correction:
    job_result = {"refused": True, "reason": data["reason"], "rule": data.get("rule"),
                  "alternatives": list(data.get("alternatives", ()))}
    return Correction(data | {"refused": True, "model": run.parent.info(), "candidate": None}, job_result, refused=True)


def _too_few_positives(run: _Run, parts: Any) -> Correction | None:
    """A refusal when either part has fewer than ``min_positives`` positives of the finding, else None."""
    name, index, fewest = run.options.finding, run.index, run.options.min_positives
    if min(parts.positives_selection[index], parts.positives_verification[index]) >= fewest:
        return None
    return _refused(run, run.context | {
        "rule": f"each part needs at least {fewest} {name} positives: the selection part chooses the "
                "channels, the verification part judges the held-out true-positive loss",
        "reason": f"too few positives: {name} has {parts.positives_selection[index]} positive(s) in the "
                  f"selection part and {parts.positives_verification[index]} in the verification part "
                  f"(minimum {fewest} in each), so no held-out verdict is possible",
        "alternatives": [{"kind": "needs_data", "finding": name,
                          "description": f"needs more data: a larger labelled validation source with more "
                          f"{name} positives (--count, --chestxray14 or --dicom-dir)"}],
        "held_out": None,
    })


def _check_held_out(run: _Run, weight: np.ndarray, bias: np.ndarray, edited: nn.Module, verification: FeatureSet,
                    *, n_bootstrap: int) -> Any:
    """``model.correct.check_held_out`` of the edited head against the parent's on the verification part."""
    from model.correct import check_held_out

    o, manifest = run.options, run.parent.manifest
    after = edited.classifier  # type: ignore[union-attr]
    return check_held_out(weight, bias, after.weight.detach().float().numpy(), after.bias.detach().float().numpy(),
                          manifest.thresholds, verification, finding=o.finding, labels=manifest.labels,
                          tolerance=o.tolerance, n_bootstrap=n_bootstrap, min_positives=o.min_positives, seed=o.seed)


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


def _held_out_refusal(run: _Run, head: nn.Module, verification: FeatureSet, held_out: Any,
                      result: dict[str, Any]) -> Correction:
    """The refusal when the held-out check failed, with the alternatives, cheapest first."""
    import torch

    o, name = run.options, run.options.finding
    if held_out.verdict == "tp_loss":
        with torch.inference_mode():
            p_targets = torch.sigmoid(head(torch.from_numpy(run.target_set.pooled))[:, run.row]).numpy()
            p_held = torch.sigmoid(head(torch.from_numpy(verification.pooled))[:, run.row]).numpy()
        option = _threshold_alternative(name, run.threshold, p_targets, p_held,
                                        verification.labels[:, run.index].astype(bool))
        alternatives = [option] if option is not None else []
        alternatives.append({"kind": "finetune", "finding": name,
                             "description": f"fine-tune the head with the case(s) as {name} negatives "
                             "('chexd finetune'; all 14 rows change)"})
    else:
        alternatives = [{"kind": "needs_data", "finding": name,
                         "description": f"needs more data: more labelled {name} positives the parent "
                         "detects, or recalibrate the threshold first ('chexd calibrate')"}]
    return _refused(run, result | {
        "rule": f"the edit may lose at most {o.tolerance:.1%} (--tolerance) of the verification part's true "
                f"positives, and each part needs at least {o.min_positives} {name} positives (the verification "
                f"part at least {o.min_positives} that the parent detects)",
        "reason": f"held-out check failed ({held_out.verdict}): {held_out.reason}",
        "alternatives": alternatives,
    })


def _saved_check(run: _Run, selection: FeatureSet, verification: FeatureSet, weight: np.ndarray, bias: np.ndarray,
                 plan: Any, held_out: Any) -> Any:
    """The check of the saved artifact: it must reproduce the verified edit exactly (ValueError otherwise)."""
    from model.correct import verify_correction

    manifest, network = run.parent.manifest, run.parent.network

    def check(reloaded: nn.Module) -> dict[str, Any]:
        again = verify_correction(network, reloaded, finding=plan.finding, thresholds=manifest.thresholds,
                                  features=selection, target_features=run.target_set.pooled,
                                  target_ids=run.target_set.ids, labels=manifest.labels)
        backbone, changed = backbone_check(network, reloaded)
        lost = _check_held_out(run, weight, bias, reloaded, verification, n_bootstrap=0).true_positives_lost
        if not again.passed or not backbone or changed != len(plan.channels) or lost != held_out.true_positives_lost:
            raise ValueError(
                f"the saved {manifest.dtype} artifact does not reproduce the verified edit (targets corrected: "
                f"{again.targets_corrected}, true positives lost: {again.true_positives_lost}, held-out true "
                f"positives lost: {lost} instead of {held_out.true_positives_lost}, other findings identical: "
                f"{again.other_findings_bit_identical}, backbone identical: {backbone}, changed weights: "
                f"{changed}) - nothing was registered"
            )
        return {"dtype": manifest.dtype, "verification": again.to_dict(), "backbone_identical": backbone,
                "changed_weights": changed, "held_out_true_positives_lost": lost}

    return check


def _finish(settings: Settings, run: _Run, edited: nn.Module, check: Any, plan: Any, held_out: Any,
            result: dict[str, Any]) -> Correction:
    """Register the edit as a candidate (or, dry run, only check it); the report with the job's result."""
    if run.options.dry_run:
        candidate = None
        check(edited)
        message = "dry run: no candidate was written; the active model is unchanged"
    else:
        written = write_candidate(settings, edited, run.parent.manifest, operation="correct", params=run.params,
                                  report=result, check=check)
        candidate, result = written.to_dict(), written.report
        message = (f"registered candidate {written.version} (version {written.manifest_version}); the active "
                   f"model is unchanged - 'chexd model activate {written.version}' makes it active")
    job_result = {"channels": list(plan.channels), "true_positives_lost": plan.verification.true_positives_lost,
                  "held_out_true_positives_lost": held_out.true_positives_lost,
                  "held_out_verdict": held_out.verdict, "targets": len(run.target_set),
                  "candidate": candidate["version"] if candidate else None}
    return Correction(result | {"model": run.parent.info(), "candidate": candidate, "message": message}, job_result)
