"""The child artifact: saved, reloaded, checked, written again with the check's report, registered as a candidate."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.maintenance.versions import child_version

if TYPE_CHECKING:
    from torch import nn

    from daemon.settings import Settings
    from model.artifact import Manifest

__all__ = ["Candidate", "backbone_check", "write_candidate"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """A registered candidate version: registry ``id``, ``version`` (the manifest's ``version_id``, what ``chexd
    model activate`` takes), ``manifest_version`` (the semantic version from :func:`child_version`), ``path`` (the
    registered manifest), ``state`` ('candidate') and ``report`` (the job's report as written into the manifest,
    including ``saved_artifact``: what the check found on the reloaded weights)."""

    id: int
    version: str
    manifest_version: str
    path: Path
    state: str
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{id, version, manifest_version, path, state}`` (the report is returned beside it by the commands)."""
        return {
            "id": self.id,
            "version": self.version,
            "manifest_version": self.manifest_version,
            "path": str(self.path),
            "state": self.state,
        }


def write_candidate(
    settings: Settings,
    network: nn.Module,
    parent_manifest: Manifest,
    *,
    operation: str,
    params: Mapping[str, Any],
    report: Mapping[str, Any],
    check: Callable[[nn.Module], Mapping[str, Any]],
    thresholds: Mapping[str, float] | None = None,
    extra_provenance: Sequence[tuple[str, Mapping[str, Any]]] = (),
    metrics: Mapping[str, Any] | None = None,
    report_key: str | None = None,
    name: str | None = None,
    applicability_inputs: Any = None,
) -> Candidate:
    """Save ``network`` as a child of ``parent_manifest``, reload it, run ``check(reloaded)`` (raises on failure;
    returns what the saved weights showed, stored as ``report["saved_artifact"]``), write it again with that report
    inside the manifest and register it as a candidate. Never activates.

    - version: :func:`child_version` (parent's version, ``operation``); name, preprocessing, intended use, labels,
      dtype and synthetic flag: the parent's (``name`` overrides the name).
    - thresholds: the parent's, with ``thresholds`` (label -> value in (0, 1)) replacing those it names.
    - provenance: the parent's, then one entry per ``extra_provenance`` (operation, parameters) step (oldest first,
      for a job composing several steps), then ``(operation, params)``; each names the parent's weights hash.
    - metrics: ``metrics`` (default: the parent's) plus ``{report_key or operation: report}``; the registry row gets
      the same.
    - applicability model: fitted on ``applicability_inputs`` (prepared validation inputs [N, channels, S, S] the job
      already has, pooled by ``network``) when given; else the parent's, which stays exact for a job that leaves the
      feature extractor alone (thresholds, head edits). A job that changes the architecture must pass inputs.
    Raises ValueError when the check fails or the bytes written twice differ, ArtifactError for unsavable weights,
    RegistryError when registration fails (inside :func:`run_job` these become MaintenanceError)."""
    from daemon.store.registry import register_candidate

    key = report_key or operation
    version = child_version(parent_manifest.version, operation)
    base = dict(parent_manifest.metrics if metrics is None else metrics)
    artifact_name = name or parent_manifest.name
    save = partial(
        _save_child,
        parent=parent_manifest,
        name=artifact_name,
        version=version,
        thresholds=_child_thresholds(parent_manifest, thresholds),
        provenance=_child_provenance(parent_manifest, operation, params, extra_provenance),
        metrics=base,
        key=key,
        applicability=_child_applicability(network, parent_manifest, applicability_inputs, operation),
    )
    with tempfile.TemporaryDirectory(prefix=f"chexd-{operation}-") as tmp:
        written, final = _save_checked(save, network, Path(tmp) / "check", Path(tmp) / artifact_name, report, check)
        info = register_candidate(
            settings,
            written,
            operation=operation,
            parameters=dict(params),
            metrics=base | {key: final} if metrics is not None else {key: final},
        )
    return Candidate(
        id=info.id, version=info.version, manifest_version=version, path=info.path, state=info.state, report=final
    )


def _child_thresholds(parent: Manifest, thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """The parent's thresholds with ``thresholds`` replacing those it names; ValueError for an unknown label."""
    child = dict(parent.thresholds)
    if thresholds is not None:
        unknown = sorted(set(thresholds) - set(parent.labels))
        if unknown:
            raise ValueError(f"Invalid thresholds: unknown labels {unknown} - expected {list(parent.labels)}")
        child.update({label: float(value) for label, value in thresholds.items()})
    return child


def _child_provenance(
    parent: Manifest,
    operation: str,
    params: Mapping[str, Any],
    extra: Sequence[tuple[str, Mapping[str, Any]]],
) -> tuple[Mapping[str, Any], ...]:
    """The parent's provenance, one entry per ``extra`` step, then ``(operation, params)``; each names the parent's
    weights hash."""
    from model.artifact import provenance_entry

    steps = [*extra, (operation, params)]
    entries = [provenance_entry(step, dict(p), parent_sha256=parent.weights_sha256) for step, p in steps]
    return (*parent.provenance, *entries)


def _save_child(
    model: nn.Module,
    folder: Path,
    content: Mapping[str, Any],
    *,
    parent: Manifest,
    name: str,
    version: str,
    thresholds: Mapping[str, float],
    provenance: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    key: str,
    applicability: Any,
) -> Path:
    """Save ``model`` into ``folder`` as the child artifact with ``content`` as its ``metrics[key]``; the manifest
    path."""
    from model.artifact import save_artifact

    return save_artifact(
        model,  # type: ignore[arg-type]
        folder,
        name=name,
        version=version,
        preprocessing=parent.preprocessing,
        intended_use=parent.intended_use,
        labels=parent.labels,
        thresholds=dict(thresholds),
        provenance=tuple(provenance),
        metrics=dict(metrics) | {key: dict(content)},
        synthetic=parent.synthetic,
        dtype=parent.dtype,
        applicability=applicability,
    )


def _save_checked(
    save: Callable[[nn.Module, Path, Mapping[str, Any]], Path],
    network: nn.Module,
    check_folder: Path,
    folder: Path,
    report: Mapping[str, Any],
    check: Callable[[nn.Module], Mapping[str, Any]],
) -> tuple[Path, dict[str, Any]]:
    """(manifest written into ``folder``, final report): save into ``check_folder``, reload, check the reloaded
    weights, then write them again into ``folder`` with the check inside the report. ValueError when the two writes
    differ in bytes."""
    from model.artifact import load_artifact, read_manifest

    first = save(network, check_folder, report)
    reloaded, _ = load_artifact(first)
    final = dict(report) | {"saved_artifact": dict(check(reloaded))}
    # the manifest carries the report including that check: the same weights written again (same bytes, same hash)
    written = save(reloaded, folder, final)
    if read_manifest(written).weights_sha256 != read_manifest(first).weights_sha256:
        raise ValueError("writing the checked weights again gave different bytes - nothing was registered")
    return written, final


def _child_applicability(network: nn.Module, parent: Manifest, inputs: Any, operation: str) -> Any:
    """The child's applicability model (see :func:`write_candidate`). Raises ValueError when the architecture changed
    and no inputs were given while the parent had one (its feature space is not the child's)."""
    if inputs is not None:
        from model.train import fit_applicability_on

        return fit_applicability_on(network, inputs, source=f"{operation} job validation inputs ({len(inputs)} images)")
    architecture = getattr(network, "architecture", parent.architecture)
    if parent.applicability is not None and architecture != parent.architecture:
        raise ValueError(f"{operation} changed the architecture: its applicability model must be fitted again - pass "
                         "applicability_inputs")
    return parent.applicability


def backbone_check(parent: nn.Module, reloaded: nn.Module) -> tuple[bool, int]:
    """(every non-classifier tensor equal, number of classifier weights + biases that differ) between two networks
    of the same architecture: what a head-only job may change."""
    import torch

    a, b = parent.state_dict(), reloaded.state_dict()
    backbone = all(torch.equal(a[k], b[k]) for k in a if not k.startswith("classifier."))
    changed = int((a["classifier.weight"] != b["classifier.weight"]).sum())
    changed += int((a["classifier.bias"] != b["classifier.bias"]).sum())
    return backbone, changed
