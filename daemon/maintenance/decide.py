"""The treatment decision system (``chexd decide``; ``model.decide`` does the work): the parent's pooled features of
a validation source (cached), split patient-disjointly into a selection and a verification part, optionally the
images radiologists marked absent as confirmed false positives, and per finding the cheapest intervention verified
on the verification part. ``apply`` composes the chosen interventions into ONE candidate version (each step in the
provenance, the routing table in the manifest); nothing is ever activated. From a predictions CSV only thresholds
can be routed. Everything runs inside a ``decide`` admin-job record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.candidate import backbone_check, write_candidate
from daemon.maintenance.errors import Progress, quiet
from daemon.maintenance.images import feedback_false_positives
from daemon.maintenance.jobs import run_job
from daemon.maintenance.parent import load_parent
from daemon.maintenance.sources import SourceOptions, validation_features

if TYPE_CHECKING:
    from daemon.maintenance.parent import Parent
    from daemon.settings import Settings
    from model.decide import Decision
    from model.features import FeatureSet

__all__ = ["DecideOptions", "decide_model", "decide_predictions"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DecideOptions:
    """``feedback``: use radiologists' 'absent' verdicts; ``apply``: register the composition; ``reference``: an
    artifact whose AUROC a finding must not fall below; the decision's ``tolerance`` (held-out TP loss rate),
    ``max_channels``, ``n_bootstrap`` and ``seed``; ``device``/``batch_size`` of the feature pass."""

    feedback: bool = False
    apply: bool = False
    reference: Path | None = None
    seed: int = 0
    tolerance: float = 0.02
    max_channels: int = 5
    n_bootstrap: int = 500
    device: str = "auto"
    batch_size: int = 32


def decide_predictions(settings: Settings, predictions: Path, labels: Path, *, seed: int, n_bootstrap: int,
                       tolerance: float) -> dict[str, Any]:
    """The routing of a predictions CSV joined with a labels CSV (thresholds only; no model changes). Raises
    MaintenanceError."""
    from model.decide import decide_predictions as decide
    from model.scores import read_scored_csv

    params = {"mode": "predictions", "predictions": str(predictions), "labels": str(labels), "seed": seed,
              "n_bootstrap": n_bootstrap, "tolerance": tolerance}

    def work(job: Any) -> dict[str, Any]:
        scored = read_scored_csv(predictions, labels)
        decision = decide(scored.scores, scored.labels, scored.patients, seed=seed, n_bootstrap=n_bootstrap,
                          tolerance=tolerance)
        job.result = {"routed": decision.to_dict()["routed"], "images": len(scored.ids)}
        return decision.to_dict() | {
            "source": scored.source,
            "images": len(scored.ids),
            "dropped_rows": scored.dropped,
            "model": None,
            "candidate": None,
            "features_from_cache": None,
            "message": "no model was changed: a predictions CSV has no model to apply thresholds to (thresholds "
            "routed here assume the 0.5 default as the current threshold)",
        }

    return run_job(settings, "decide", params, work)


def decide_model(settings: Settings, parent: Parent, source: SourceOptions, options: DecideOptions,
                 progress: Progress = quiet) -> dict[str, Any]:
    """The routing table for the parent on ``source`` (and, with ``apply``, the registered composition); the report
    with ``candidate``, ``features_from_cache`` and ``message``. Raises MaintenanceError."""
    o, manifest = options, parent.manifest
    params: dict[str, Any] = {
        "source": source.to_dict(),
        "parent_version": manifest.version_id,
        "seed": o.seed,
        "feedback": o.feedback,
        "apply": o.apply,
        "tolerance": o.tolerance,
        "max_channels": o.max_channels,
        "n_bootstrap": o.n_bootstrap,
        "reference": str(o.reference) if o.reference else None,
    }

    def work(job: Any) -> dict[str, Any]:
        weight, bias = _head(parent)
        decision, features, cached, feedback_images = _decide(settings, parent, source, o, weight, bias, progress)
        report = decision.to_dict() | {
            "source": features.source,
            "images": len(features),
            "feedback_images": feedback_images if o.feedback else None,
        }
        report, candidate, message = _apply(settings, parent, decision, (weight, bias), report, params, o.apply)
        job.result = {"routed": decision.to_dict()["routed"], "candidate": candidate["version"] if candidate else None}
        return report | {"model": parent.info(), "candidate": candidate, "features_from_cache": cached,
                         "message": message}

    return run_job(settings, "decide", params, work)


def _decide(settings: Settings, parent: Parent, source: SourceOptions, o: DecideOptions, weight: Any, bias: Any,
            progress: Progress) -> tuple[Decision, FeatureSet, bool, int]:
    """(decision, validation features, from the cache, feedback images read)."""
    from model.decide import decide
    from model.verification import split_features

    features, cached = validation_features(settings, parent, source, device=o.device, batch_size=o.batch_size,
                                           progress=progress)
    parent.network.cpu()
    selection, verification, split = split_features(features, seed=o.seed)
    false_positives, feedback_images = ({}, 0)
    if o.feedback:
        false_positives, feedback_images = feedback_false_positives(settings, parent, device=o.device,
                                                                    batch_size=o.batch_size)
    reference_auroc = None
    if o.reference is not None:
        reference_auroc = _reference_auroc(settings, o.reference, source, features, split.selection, device=o.device,
                                           batch_size=o.batch_size, progress=progress)
    decision = decide(weight, bias, parent.manifest.thresholds, selection, verification, split,
                      labels=parent.manifest.labels, false_positives=false_positives, reference_auroc=reference_auroc,
                      tolerance=o.tolerance, max_channels=o.max_channels, n_bootstrap=o.n_bootstrap, seed=o.seed)
    return decision, features, cached, feedback_images


def _head(parent: Parent) -> tuple[Any, Any]:
    """Copies of the parent's classifier weight [14, C] and bias [14], float32."""
    head = parent.network.classifier  # type: ignore[union-attr]
    return head.weight.detach().float().numpy().copy(), head.bias.detach().float().numpy().copy()


def _reference_auroc(settings: Settings, reference: Path, source: SourceOptions, features: FeatureSet,
                     selection: Any, *, device: str, batch_size: int, progress: Progress) -> dict[str, float]:
    """The reference model's AUROC per finding on the selection images (its own features of the same source)."""
    from model.finetune import head_aurocs

    ref = load_parent(settings, reference)
    ref_features, _ = validation_features(settings, ref, source, device=device, batch_size=batch_size,
                                          progress=progress)
    ref.network.cpu()
    if ref_features.ids != features.ids:
        raise ValueError("the reference model's features are not of the same images - cannot compare AUROCs")
    weight, bias = _head(ref)
    aurocs = head_aurocs(ref_features.subset(selection), weight, bias, labels=ref.manifest.labels)
    return {label: a for label, a in zip(ref.manifest.labels, aurocs, strict=True) if a is not None}


def _apply(settings: Settings, parent: Parent, decision: Decision, head: tuple[Any, Any], report: dict[str, Any],
           params: dict[str, Any], apply: bool) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(report, candidate, message): with ``apply`` and a chosen intervention, the composition as one candidate."""
    from model.decide import compose
    from model.finetune import with_head

    if not apply:
        return report, None, ("routing table only: nothing was written ('--apply' composes the chosen interventions "
                              "into one candidate version)")
    if not decision.chosen:
        return report, None, ("--apply: no intervention was chosen for any finding - nothing to write, nothing was "
                              "registered")
    manifest = parent.manifest
    composition = compose(decision, *head, manifest.thresholds)
    network = with_head(parent.network, composition.weight, composition.bias)
    rows = {manifest.labels.index(r.finding) for r in decision.chosen
            if r.intervention in ("channel_edit", "head_finetune")}
    written = write_candidate(settings, network, manifest, operation="decide", params=params, report=report,
                              check=_rows_check(parent, rows), thresholds=composition.thresholds,
                              extra_provenance=[(step["operation"], step) for step in composition.steps])
    candidate = written.to_dict()
    message = (f"registered candidate {candidate['version']} composing {len(composition.steps)} step(s); the "
               f"active model is unchanged - 'chexd model activate {candidate['version']}' makes it active")
    return written.report | {"composition": composition.to_dict()}, candidate, message


def _rows_check(parent: Parent, routed_rows: set[int]) -> Any:
    """The saved artifact may differ from the parent only in the routed rows of the head (ValueError otherwise)."""
    manifest = parent.manifest

    def check(reloaded: Any) -> dict[str, Any]:
        import torch

        backbone, changed = backbone_check(parent.network, reloaded)
        w0, w1 = parent.network.classifier.weight, reloaded.classifier.weight  # type: ignore[union-attr]
        b0, b1 = parent.network.classifier.bias, reloaded.classifier.bias  # type: ignore[union-attr]
        untouched = [j for j in range(len(manifest.labels)) if j not in routed_rows]
        identical = all(torch.equal(w0[j], w1[j]) and torch.equal(b0[j], b1[j]) for j in untouched)
        if not backbone or not identical:
            raise ValueError(
                f"the saved artifact changed more than the routed rows (backbone identical: {backbone}, untouched "
                f"rows identical: {identical}) - nothing was registered"
            )
        return {"dtype": manifest.dtype, "backbone_identical": backbone, "changed_weights": changed,
                "untouched_rows_identical": identical, "rows_checked": len(untouched)}

    return check
