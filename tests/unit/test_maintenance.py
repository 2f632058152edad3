"""The maintenance layer (daemon.maintenance): the version rule, the child artifact, the job record, validation data.

A tiny DenseNet stands in for the model; the registry is SQLite under the test's data dir.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from daemon.maintenance import (
    MaintenanceError,
    SourceOptions,
    backbone_check,
    child_version,
    load_parent,
    run_job,
    validation_features,
    write_candidate,
)
from daemon.settings import Settings
from daemon.store.registry import list_versions, registry_sessions
from daemon.store.tables import AdminJob
from model.artifact import load_artifact, read_manifest, save_artifact
from model.types import LABELS, PreprocessRecipe
from tests.nets import tiny

RECIPE = PreprocessRecipe(input_size=64, resize=None)
USE = "synthetic demo model, not for diagnosis (test fixture)"


@pytest.fixture
def parent_path(tmp_path: Path) -> Path:
    return save_artifact(
        tiny(seed=5),
        tmp_path / "parent",
        name="tiny",
        version="2.4.7-rc1",
        preprocessing=RECIPE,
        intended_use=USE,
        synthetic=True,
        dtype="float16",
        metrics={"test": {"mean_auroc": 0.5}},
    )


@pytest.fixture
def settings(tmp_path: Path, parent_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", model_path=str(parent_path))


@pytest.mark.parametrize(
    ("parent", "operation", "child"),
    [
        ("1.0.0", "calibrate", "1.0.1"),
        ("1.2.9", "correct", "1.2.10"),
        ("1.2.3", "finetune", "1.2.4"),
        ("1.2.3", "decide", "1.2.4"),
        ("1.2.3", "compress", "1.3.0"),
        ("1.2.3-rc1", "calibrate", "1.2.4"),
        ("1.2.3+build.5", "compress", "1.3.0"),
    ],
)
def test_every_derived_artifact_gets_a_new_version(parent: str, operation: str, child: str) -> None:
    assert child_version(parent, operation) == child != parent


@pytest.mark.parametrize(("parent", "operation"), [("1.2", "calibrate"), ("v1.0.0", "correct"), ("1.0.0", "")])
def test_the_version_rule_refuses_what_it_cannot_bump(parent: str, operation: str) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        child_version(parent, operation)


def test_write_candidate_appends_provenance_and_puts_the_checked_report_in_the_manifest(
    settings: Settings, parent_path: Path
) -> None:
    parent = load_parent(settings, None)  # the configured model
    assert parent.path == parent_path and parent.manifest.version == "2.4.7-rc1"
    child = tiny(seed=5)
    child.load_state_dict(parent.network.state_dict())
    row = LABELS.index("Effusion")
    with torch.no_grad():
        child.classifier.weight[row, :3] = 0.0
    seen: list[int] = []

    def check(reloaded: torch.nn.Module) -> dict[str, object]:
        backbone, changed = backbone_check(parent.network, reloaded)
        seen.append(changed)
        return {"backbone_identical": backbone, "changed_weights": changed}

    candidate = write_candidate(
        settings, child, parent.manifest, operation="decide", params={"findings": ["Effusion"]},
        report={"routing": [{"finding": "Effusion", "intervention": "channel edit"}]}, check=check,
        thresholds={"Effusion": 0.61}, extra_provenance=[("calibrate", {"finding": "Effusion"}),
                                                          ("correct", {"finding": "Effusion", "channels": [0, 1, 2]})],
    )  # fmt: skip
    assert seen and seen[0] > 0, "the check ran on the reloaded weights"
    assert candidate.state == "candidate" and candidate.manifest_version == "2.4.8"
    manifest = read_manifest(candidate.path)
    assert manifest.version == "2.4.8" and manifest.version_id == candidate.version
    assert [p["operation"] for p in manifest.provenance] == ["calibrate", "correct", "decide"]
    assert all(p["parent_sha256"] == parent.manifest.weights_sha256 for p in manifest.provenance)
    assert manifest.provenance[1]["parameters"]["channels"] == [0, 1, 2]
    report = manifest.metrics["decide"]
    assert report["routing"][0]["intervention"] == "channel edit"
    assert report["saved_artifact"] == {"backbone_identical": True, "changed_weights": seen[0]}
    assert report == candidate.report
    assert manifest.metrics["test"] == {"mean_auroc": 0.5}, "the parent's metrics are kept"
    assert manifest.thresholds["Effusion"] == pytest.approx(0.61)
    assert all(manifest.thresholds[k] == parent.manifest.thresholds[k] for k in LABELS if k != "Effusion")
    states = {v.version: v.state for v in list_versions(settings)}
    assert states == {parent.manifest.version_id: "active", candidate.version: "candidate"}, "never activates"
    reloaded, _ = load_artifact(candidate.path)
    assert torch.equal(reloaded.classifier.weight[row, :3], torch.zeros(3))


def test_a_failing_check_registers_nothing(settings: Settings) -> None:
    parent = load_parent(settings, None)

    def check(reloaded: torch.nn.Module) -> dict[str, object]:
        raise ValueError("the saved weights do not reproduce the edit")

    with pytest.raises(ValueError, match="do not reproduce"):
        write_candidate(
            settings, parent.network, parent.manifest, operation="correct", params={}, report={}, check=check
        )
    assert list_versions(settings) == [], "nothing registered - not even the baseline (reading writes nothing)"


def test_write_candidate_refuses_thresholds_for_unknown_labels(settings: Settings) -> None:
    parent = load_parent(settings, None)
    with pytest.raises(ValueError, match="unknown labels"):
        write_candidate(
            settings,
            parent.network,
            parent.manifest,
            operation="calibrate",
            params={},
            report={},
            check=lambda m: {},
            thresholds={"Pneumonitis": 0.3},
        )


def test_run_job_records_the_job_and_raises_one_error_type(settings: Settings) -> None:
    def refuse(job):  # type: ignore[no-untyped-def]
        job.state, job.result = "refused", {"reason": "too few positives"}
        return "refused"

    def broken(job):  # type: ignore[no-untyped-def]
        raise ValueError("Invalid max_channels 0 - must be >= 1")

    assert run_job(settings, "correct", {"finding": "Mass"}, refuse) == "refused"
    with pytest.raises(MaintenanceError, match="max_channels 0") as caught:
        run_job(settings, "correct", {"finding": "Mass"}, broken)
    assert caught.value.usage is False
    with registry_sessions(settings)() as session:
        jobs = [(j.kind, j.state, j.result) for j in session.scalars(select(AdminJob).order_by(AdminJob.id))]
    assert jobs == [("correct", "refused", {"reason": "too few positives"}), ("correct", "failed", None)]


def test_load_parent_names_an_unusable_artifact(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(MaintenanceError, match="no such artifact"):
        load_parent(settings, tmp_path / "missing")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"phantom": "val", "chestxray14": Path("x")}, "choose one validation source"),
        ({"labels": Path("l.csv")}, "--labels goes with --dicom-dir"),
        ({"dicom_dir": Path("d")}, "--dicom-dir needs --labels"),
    ],
)
def test_conflicting_source_options_are_a_usage_error(options: dict, message: str) -> None:
    with pytest.raises(MaintenanceError, match=message) as caught:
        SourceOptions(**options)
    assert caught.value.usage is True


def test_validation_features_are_computed_once_then_cached(settings: Settings) -> None:
    parent = load_parent(settings, None)
    source = SourceOptions(phantom="val", count=12, seed=1, render_size=64)
    stages: list[str] = []
    first, cached = validation_features(
        settings, parent, source, device="cpu", batch_size=8, progress=lambda stage, done, total: stages.append(stage)
    )
    assert not cached and len(first) == 12 and first.pooled.shape == (12, parent.network.classifier.in_features)
    assert stages, "progress went through the callback"
    again, cached = validation_features(settings, parent, source, device="cpu")
    assert cached and again.ids == first.ids and np.array_equal(again.pooled, first.pooled)
    with pytest.raises(MaintenanceError, match="--phantom 'validation'") as caught:
        validation_features(settings, parent, SourceOptions(phantom="validation"), device="cpu")
    assert caught.value.usage is True
