"""reporting.facts.ModelFacts: the typed model facts between the daemon's prediction archive and compose_study (issue
17): archives written before it (plain dicts) still read, to_dict/from_dict round-trip through JSON, bad facts are a
ReportError, and compose_study takes nothing else."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from model.types import LABELS, PreprocessRecipe, QualityIssue
from reporting.compose import compose_study
from reporting.errors import ReportError
from reporting.facts import ModelFacts
from reporting.report import DomainCheck
from tests.reporting_helpers import THRESHOLDS, phantom_case

# what daemon.work.reports archived before ModelFacts (a model with a manifest, gate on)
OLD_ARCHIVE = {
    "name": "chexd-demo", "version": "0123456789abcdef", "weights_sha256": "ab" * 32, "synthetic": True,
    "intended_use": "synthetic demo", "thresholds": {label: 0.5 for label in LABELS},
    "calibrated_at": "2026-11-01T12:00:00+00:00",
    "preprocessing": {"channels": 3, "input_size": 128, "resize": 146, "normalization": "imagenet"},
    "domain": {"status": "flagged", "score": 41.2, "threshold": 18.7, "method": "m",
               "quality": [{"code": "inverted", "reason": "looks inverted"}]},
}


def test_an_old_archive_dict_reads_and_round_trips_through_json() -> None:
    facts = ModelFacts.from_dict(OLD_ARCHIVE)
    assert facts.calibrated_at == dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)
    assert facts.preprocessing == PreprocessRecipe(channels=3, input_size=128, resize=146)
    assert facts.domain == DomainCheck(status="flagged", score=41.2, threshold=18.7, method="m",
                                       quality=(QualityIssue(code="inverted", reason="looks inverted"),))
    assert facts.thresholds["Mass"] == 0.5
    assert ModelFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    assert json.loads(json.dumps(facts.to_dict())) == OLD_ARCHIVE
    info = facts.model_info()
    assert (info.name, info.version, info.synthetic) == ("chexd-demo", "0123456789abcdef", True)


def test_the_fallback_facts_of_a_model_without_manifest_read() -> None:
    facts = ModelFacts.from_dict({"name": "", "version": "v1", "weights_sha256": "", "synthetic": False,
                                  "intended_use": "", "thresholds": {"Mass": 0.5}, "calibrated_at": None})
    assert facts.name == "unnamed" and facts.preprocessing is None and facts.domain is None
    assert "preprocessing" not in facts.to_dict() and "domain" not in facts.to_dict()


def test_the_facts_are_read_only() -> None:
    facts = ModelFacts(name="m", version="v1", thresholds={"Mass": 0.5})
    with pytest.raises(TypeError):
        facts.thresholds["Mass"] = 0.1  # type: ignore[index]
    with pytest.raises(AttributeError):
        facts.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("data, match", [
    ({"name": "m"}, "no model version"),
    ({"version": "v1", "thresholds": {"Mass": "high"}}, "threshold"),
    ({"version": "v1", "calibrated_at": "yesterday"}, "calibrated_at|isoformat|Invalid"),
    ({"version": "v1", "preprocessing": {"channels": 2}}, "channels"),
    ({"version": "v1", "domain": {"status": "maybe"}}, "domain status"),
])
def test_malformed_facts_are_a_report_error(data: dict, match: str) -> None:
    with pytest.raises(ReportError, match=match):
        ModelFacts.from_dict(data)
    assert issubclass(ReportError, ValueError)  # callers catching ValueError keep working


def test_compose_study_takes_typed_facts_and_explicit_settings(tmp_path: Path) -> None:
    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9}, size=128)
    facts = ModelFacts(name="chexd-test", version="0123456789abcdef", thresholds=THRESHOLDS)
    with pytest.raises(TypeError, match="ModelFacts"):
        compose_study(images=[(ds, image, prediction, facts.to_dict())], revision=1, predecessors=[],  # type: ignore[list-item]
                      folder=tmp_path / "dict")
    with pytest.raises(ReportError, match="top_channels"):
        compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=[], folder=tmp_path / "k",
                      top_channels=0)
    composed = compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=[],
                             folder=tmp_path / "r1", top_channels=2)
    assert all(len(f.evidence) <= 2 for f in composed.findings[0] if f.positive)
