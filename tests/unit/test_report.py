"""Report assembly: statuses, exclusions, regions, channel evidence, study grouping, UIDs, compose_study."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from model.types import LABELS, Applicability, QualityIssue
from reporting.compose import compose_study
from reporting.exclusions import ExclusionRules
from reporting.facts import ModelFacts
from reporting.regions import ZONES
from reporting.report import (
    ChannelEvidence,
    DomainCheck,
    Finding,
    ImageResult,
    ModelInfo,
    SourceImage,
    assemble,
    display_name,
    domain_check,
    study_report,
)
from reporting.uids import derived_uid, instance_uid, series_uid
from tests.reporting_helpers import (
    THRESHOLDS,
    demo_model,
    image_result,
    make_prediction,
    phantom_case,
    phantom_report,
)

REPO = Path(__file__).resolve().parents[2]


def test_source_image_reads_the_dicom_facts() -> None:
    _, ds, image, _ = phantom_case()
    source = SourceImage.from_dataset(ds)
    assert source.sop_instance_uid == ds.SOPInstanceUID and source.study_instance_uid == ds.StudyInstanceUID
    assert (source.rows, source.columns) == image.shape
    assert source.patient_id == ds.PatientID and source.patient_name == str(ds.PatientName)
    assert source.study_date == ds.StudyDate and source.accession_number == ds.AccessionNumber
    assert source.photometric_interpretation == ds.PhotometricInterpretation
    del ds.SOPInstanceUID
    with pytest.raises(ValueError, match="missing SOPInstanceUID"):
        SourceImage.from_dataset(ds)
    with pytest.raises(ValueError, match="study_instance_uid"):
        SourceImage(sop_instance_uid="1.2.3", sop_class_uid="1.2.3", study_instance_uid="x.y",
                    series_instance_uid="1.2", rows=10, columns=10)


def test_model_info_validates_and_reads_the_archived_facts() -> None:
    from reporting.facts import ModelFacts

    info = ModelFacts.from_dict({"name": "demo", "version": "0011223344556677", "weights_sha256": "0f" * 32,
                                 "synthetic": True, "calibrated_at": "2026-11-01T10:00:00+00:00"}).model_info()
    assert info.synthetic and info.calibrated_at == dt.datetime(2026, 11, 1, 10, tzinfo=dt.UTC)
    assert ModelFacts.from_dict({"version": "abc", "calibrated_at": None}).model_info().calibrated_at is None
    with pytest.raises(ValueError, match="weights_sha256"):
        ModelInfo(name="m", version="v1", weights_sha256="xyz")
    with pytest.raises(ValueError, match="version"):
        ModelInfo(name="m", version="has space")


def test_statuses_follow_thresholds_and_exclusions() -> None:
    findings = {"Pneumothorax": 0.97, "Edema": 0.6, "Effusion": 0.9, "Nodule": 0.49}
    _, ds, image, prediction = phantom_case(findings=findings)
    result = image_result(ds, image, prediction)
    status = {f.label: f.status for f in result.findings}
    assert status["Effusion"] == "present" and status["Pneumothorax"] == "present"
    assert status["Nodule"] == "absent"  # 0.49 < 0.5
    # Pneumothorax (0.97 / 0.3 = 3.2) is 2.7x as confident as Edema (0.6 / 0.5): exclusive pair, margin 2
    assert status["Edema"] == "excluded"
    edema = result.finding("Edema")
    assert "Pneumothorax" in edema.reason and "0.30" in edema.reason
    assert [f.label for f in result.findings] == list(LABELS)
    assert [f.label for f in result.positive] == ["Pneumothorax", "Effusion", "Edema"]
    # with a wider margin nothing is excluded
    loose = assemble(prediction, image, result.source, thresholds=THRESHOLDS, rules=ExclusionRules(margin=3.0))
    assert loose.finding("Edema").status == "present" and loose.finding("Edema").reason is None


def test_positive_findings_carry_regions_peak_and_evidence_absent_ones_do_not() -> None:
    _, ds, image, prediction = phantom_case(findings={"Cardiomegaly": 0.8, "Effusion": 0.9})
    result = image_result(ds, image, prediction)
    heart = result.finding("Cardiomegaly")
    assert heart.main_region.zone == "cardiac silhouette"  # its CAM is the phantom's heart mask
    assert heart.region == f"cardiac silhouette ({heart.main_region.share:.0%} of heat)"
    assert heart.peak is not None and 0 <= heart.peak[0] < image.shape[0] and 0 <= heart.peak[1] < image.shape[1]
    assert sum(r.share for r in heart.regions) <= 1.0 + 1e-9 and {r.zone for r in heart.regions} <= set(ZONES)
    for f in result.findings:
        if f.status == "absent":
            assert f.regions == () and f.evidence == () and f.counter_evidence == () and f.peak is None
            assert f.region is None and f.evidence_summary() == ""
        else:
            assert len(f.evidence) == 5 and len(f.counter_evidence) == 1  # make_prediction: one channel against


def test_evidence_shares_are_of_the_total_evidence_and_counter_evidence_is_apart() -> None:
    prediction = make_prediction({"Effusion": 0.9})
    _, ds, image, _ = phantom_case(findings={"Effusion": 0.9})
    result = assemble(prediction, image, SourceImage.from_dataset(ds), thresholds=THRESHOLDS,
                      rules=ExclusionRules(), top_k=3)
    i = LABELS.index("Effusion")
    effusion = result.finding("Effusion")
    total = float(prediction.evidence_total[i])
    pairs = sorted(zip(prediction.top_channels[i], prediction.top_contributions[i], strict=True),
                   key=lambda t: -abs(t[1]))
    expected_for = [(int(c), pytest.approx(float(v))) for c, v in pairs if v > 0][:3]
    expected_against = [(int(c), pytest.approx(float(v))) for c, v in pairs if v < 0]
    assert [(e.channel, e.contribution) for e in effusion.evidence] == expected_for
    assert [(e.channel, e.contribution) for e in effusion.counter_evidence] == expected_against
    for e in effusion.evidence + effusion.counter_evidence:
        assert e.share == pytest.approx(abs(e.contribution) / total)
    # the listed rows carry a part of the total that the summary states
    assert 0 < effusion.shown_share < 1 and effusion.evidence_complete
    assert f"carry {effusion.shown_share:.0%} of the evidence" in effusion.evidence_summary()
    assert "counter-evidence" in effusion.evidence_summary()
    assert effusion.evidence_net == pytest.approx(float(prediction.logits[i] - prediction.bias[i]))
    with pytest.raises(ValueError, match="top_k"):
        assemble(prediction, image, result.source, thresholds=THRESHOLDS, rules=ExclusionRules(), top_k=0)
    # an archive without the total: the stored channels stand in for it, and the summary says so
    older = replace(prediction, evidence_total=None)
    old_result = assemble(older, image, result.source, thresholds=THRESHOLDS, rules=ExclusionRules(), top_k=3)
    f = old_result.finding("Effusion")
    assert not f.evidence_complete and f.share_for is None and "was not recorded" in f.evidence_summary()
    # a row that pushes against the finding is never listed as evidence for it
    with pytest.raises(ValueError, match="counter-evidence"):
        Finding(label="Effusion", probability=0.9, threshold=0.4, status="present",
                evidence=(ChannelEvidence(channel=3, contribution=-0.2, share=0.1),))


def test_evidence_from_a_real_engine_sums_to_the_logit() -> None:
    torch = pytest.importorskip("torch")  # torch is a project dependency; reporting itself never imports it
    from model.engine import Engine
    from model.network import Architecture, DenseNet
    from model.types import PreprocessRecipe

    torch.manual_seed(0)
    net = DenseNet(Architecture.tiny()).eval()
    recipe = PreprocessRecipe(input_size=64, resize=None)
    engine = Engine(net, recipe=recipe, labels=LABELS, model_version="tiny", device="cpu", top_k=1000)
    sample, ds, image, _ = phantom_case(findings={"Effusion": 0.9})
    prediction = engine.predict([image])[0]
    thresholds = dict.fromkeys(LABELS, 0.01)  # everything positive
    result = assemble(prediction, image, SourceImage.from_dataset(ds), thresholds=thresholds,
                      rules=ExclusionRules(), top_k=1000, recipe=recipe)
    for i, f in enumerate(result.findings):
        assert f.positive
        # the top-k list covers every channel of the tiny net: every channel for it is listed, and their shares of
        # the total evidence add up to the share that pushes for the finding; all shares together to 1
        phi = engine.contributions(image)[i]
        assert f.evidence_total == pytest.approx(float(abs(phi).sum()), rel=1e-4)
        assert sum(e.share for e in f.evidence) == pytest.approx(f.share_for, abs=1e-3)
        assert f.share_for == pytest.approx(float(phi[phi > 0].sum() / abs(phi).sum()), abs=1e-3)
        assert f.evidence_net == pytest.approx(float(phi.sum()), abs=1e-3)
        assert len(f.counter_evidence) == min(3, int((phi < 0).sum()))


def test_findings_reject_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="status"):
        Finding(label="Mass", probability=0.2, threshold=0.5, status="present")
    with pytest.raises(ValueError, match="reason"):
        Finding(label="Mass", probability=0.7, threshold=0.5, status="excluded")
    with pytest.raises(ValueError, match="threshold"):
        Finding(label="Mass", probability=0.7, threshold=1.0, status="present")
    _, ds, image, prediction = phantom_case()
    with pytest.raises(ValueError, match="No threshold for 'Hernia'"):
        image_result(ds, image, prediction, thresholds={k: v for k, v in THRESHOLDS.items() if k != "Hernia"})
    with pytest.raises(ValueError, match="image shape"):
        image_result(ds, image[:100], prediction)


def test_study_report_groups_one_study_and_validates() -> None:
    _, ds1, im1, p1 = phantom_case(index=2, study_uid="1.2.826.0.1.3680043.8.498.1")
    _, ds2, im2, p2 = phantom_case(index=3, study_uid="1.2.826.0.1.3680043.8.498.1")
    r1, r2 = image_result(ds1, im1, p1), image_result(ds2, im2, p2)
    report = study_report([r1, r2], demo_model(), revision=2, predecessors=["1.2.3.4"])
    assert report.study_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert report.created_at.tzinfo is not None and report.revision == 2 and report.predecessors == ("1.2.3.4",)
    _, ds3, im3, p3 = phantom_case(index=4, study_uid="1.2.826.0.1.3680043.8.498.2")
    with pytest.raises(ValueError, match="2 studies"):
        study_report([r1, image_result(ds3, im3, p3)], demo_model())
    with pytest.raises(ValueError, match="timezone"):
        study_report([r1], demo_model(), created_at=dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="revision"):
        study_report([r1], demo_model(), revision=0)
    with pytest.raises(ValueError, match="no images"):
        study_report([], demo_model())


def test_result_uids_are_deterministic_and_change_with_every_input() -> None:
    a = instance_uid("sr", ["1.2.3", "1.2.4"], "v1", 1)
    assert a == instance_uid("sr", ["1.2.4", "1.2.3"], "v1", 1)  # order of sources does not matter
    others = {instance_uid("sr", ["1.2.3"], "v1", 1), instance_uid("sr", ["1.2.3", "1.2.4"], "v2", 1),
              instance_uid("sr", ["1.2.3", "1.2.4"], "v1", 2), instance_uid("pdf", ["1.2.3", "1.2.4"], "v1", 1)}
    assert a not in others and len(others) == 4
    for uid in (a, series_uid("sr", "1.2.3"), derived_uid("x")):
        assert uid.startswith("2.25.") and uid.is_valid and len(uid) <= 64
    assert series_uid("sr", "1.2.3") != series_uid("sc", "1.2.3")
    with pytest.raises(ValueError, match="revision"):
        instance_uid("sr", ["1.2.3"], "v1", 0)
    with pytest.raises(ValueError, match="source"):
        instance_uid("sr", [], "v1", 1)


def test_compose_study_writes_every_document_with_stable_uids(tmp_path: Path) -> None:
    findings = {"Pneumothorax": 0.97, "Edema": 0.6, "Cardiomegaly": 0.8}
    _, ds, image, prediction = phantom_case(findings=findings)
    facts = ModelFacts(name="chexd-test", version="0123456789abcdef", weights_sha256="ab" * 32, synthetic=True,
                       intended_use="tests", thresholds=THRESHOLDS)
    when = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
    composed = compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=[],
                             folder=tmp_path / "r1", top_channels=3, created_at=when)
    kinds = sorted(f.kind for f in composed.files)
    # one Parametric Map and one SC per present or excluded finding: Pneumothorax, Cardiomegaly, Edema (excluded)
    assert kinds == ["pdf", "pdf-dicom", "pm", "pm", "pm", "sc", "sc", "sc", "sr"]
    assert all(f.path.is_file() for f in composed.files)
    assert [len(f) for f in composed.findings] == [14]
    assert {f.label for f in composed.findings[0] if f.status == "excluded"} == {"Edema"}
    assert all(len(f.evidence) == 3 for f in composed.findings[0] if f.positive)
    for f in composed.files:
        if f.kind != "pdf":
            written = pydicom.dcmread(f.path)
            assert written.SOPInstanceUID == f.sop_instance_uid and written.SOPClassUID == f.sop_class_uid
            assert written.StudyInstanceUID == ds.StudyInstanceUID
    again = compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=[],
                          folder=tmp_path / "again", top_channels=3, created_at=when)
    assert [f.sop_instance_uid for f in again.files] == [f.sop_instance_uid for f in composed.files]
    revised = compose_study(images=[(ds, image, prediction, facts)], revision=2,
                            predecessors=[next(f.sop_instance_uid for f in composed.files if f.kind == "sr")],
                            folder=tmp_path / "r2", top_channels=3, created_at=when)
    # a revision: new SR and PDF; an unchanged heatmap keeps its UID (content, not revision: reporting.uids)
    def uids(files, kinds):  # type: ignore[no-untyped-def]
        return {f.sop_instance_uid for f in files if f.kind in kinds}

    assert not uids(revised.files, ("sr", "pdf-dicom")) & uids(composed.files, ("sr", "pdf-dicom"))
    assert uids(revised.files, ("sc", "pm")) == uids(composed.files, ("sc", "pm"))


def test_reporting_never_imports_torch() -> None:
    code = ("import sys, reporting.compose, reporting.regions, reporting.exclusions; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or "reporting imported torch"


def test_heatmap_covers_the_image_and_is_non_negative() -> None:
    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9})
    result = image_result(ds, image, prediction)
    heat = result.heatmap("Effusion")
    assert heat.shape == image.shape and heat.min() >= 0 and heat.max() > 0
    small = result.heatmap("Effusion", (64, 64))
    assert small.shape == (64, 64)
    # the reported peak is where the upsampled heat is highest (bilinear heat peaks at a CAM cell centre)
    peak = result.finding("Effusion").peak
    assert heat[peak] == pytest.approx(float(heat.max()), rel=1e-3)


# --- the applicability gate (issue 14) ---------------------------------------------------------------------------

OUTSIDE = Applicability(score=41.2, threshold=18.7, in_domain=False, method="mahalanobis-pca32")
INSIDE = Applicability(score=7.5, threshold=18.7, in_domain=True, method="mahalanobis-pca32")
INVERTED = QualityIssue(code="inverted", reason="the image looks inverted for MONOCHROME2")


def test_domain_check_applies_the_policy() -> None:
    assert domain_check(OUTSIDE, (), "withhold").status == "withheld"
    assert domain_check(OUTSIDE, (), "flag").status == "flagged"
    assert domain_check(OUTSIDE, (INVERTED,), "off") is None  # off: nothing checked, nothing stored
    assert domain_check(INSIDE, (), "withhold").status == "in_domain"
    assert domain_check(INSIDE, (INVERTED,), "withhold").status == "withheld"  # a quality issue alone withholds
    assert domain_check(None, (), "withhold").status == "unchecked"  # no applicability model in the artifact
    assert domain_check(None, (INVERTED,), "flag").status == "flagged"
    check = domain_check(OUTSIDE, (INVERTED,), "withhold")
    assert check is not None and (check.score, check.threshold, check.method) == (41.2, 18.7, "mahalanobis-pca32")
    assert check.reasons() == ("applicability score 41.2 above the threshold 18.7 (mahalanobis-pca32)",
                               INVERTED.reason)
    assert domain_check(INSIDE, (), "withhold").reasons() == ()
    with pytest.raises(ValueError, match="Invalid applicability policy 'block'"):
        domain_check(OUTSIDE, (), "block")


def test_domain_check_round_trips_and_rejects_contradictions() -> None:
    for check in (domain_check(OUTSIDE, (INVERTED,), "withhold"), domain_check(None, (), "flag"),
                  DomainCheck(status="withheld", score=float("inf"), threshold=3.0, method="knn")):
        assert check is not None and DomainCheck.from_dict(check.to_dict()) == check
    with pytest.raises(ValueError, match="'in_domain' - needs a score at or below"):
        DomainCheck(status="in_domain", score=20.0, threshold=18.7)
    with pytest.raises(ValueError, match="'withheld' - needs a score above its threshold or a quality issue"):
        DomainCheck(status="withheld", score=1.0, threshold=18.7)
    with pytest.raises(ValueError, match="both given or both None"):
        DomainCheck(status="flagged", score=30.0, quality=(INVERTED,))
    with pytest.raises(ValueError, match="Invalid domain status 'maybe'"):
        DomainCheck(status="maybe")  # type: ignore[arg-type]


def test_a_withheld_image_gets_no_findings_a_flagged_one_keeps_them() -> None:
    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9, "Cardiomegaly": 0.8})
    source = SourceImage.from_dataset(ds)
    rules = ExclusionRules()
    withheld = assemble(prediction, image, source, thresholds=THRESHOLDS, rules=rules,
                        domain=domain_check(OUTSIDE, (), "withhold"))
    assert withheld.withheld and withheld.findings == () and withheld.positive == ()
    flagged = assemble(prediction, image, source, thresholds=THRESHOLDS, rules=rules,
                       domain=domain_check(OUTSIDE, (), "flag"))
    assert not flagged.withheld and len(flagged.findings) == len(LABELS)
    assert {f.label for f in flagged.positive} == {"Effusion", "Cardiomegaly"}
    plain = image_result(ds, image, prediction)
    assert [f.status for f in plain.findings] == [f.status for f in flagged.findings]
    with pytest.raises(ValueError, match="withheld by the applicability gate has none"):
        ImageResult(source=source, findings=plain.findings, image=plain.image, cams=plain.cams, labels=plain.labels,
                    lung_fields=plain.lung_fields, model_version=plain.model_version, domain=withheld.domain)


def test_compose_study_writes_no_findings_and_no_heatmap_for_a_withheld_image(tmp_path: Path) -> None:
    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9, "Cardiomegaly": 0.8})
    facts = ModelFacts(name="chexd-test", version="0123456789abcdef", weights_sha256="ab" * 32, synthetic=True,
                       intended_use="tests", thresholds=THRESHOLDS)
    withheld = domain_check(OUTSIDE, (INVERTED,), "withhold")
    assert withheld is not None
    composed = compose_study(images=[(ds, image, prediction, replace(facts, domain=withheld))], revision=1,
                             predecessors=[], folder=tmp_path / "r1", top_channels=3)
    assert composed.findings == [()]
    assert sorted(f.kind for f in composed.files) == ["pdf", "pdf-dicom", "sr"]  # no heatmap SC
    assert composed.report.images[0].domain == withheld


def test_display_names_and_what_a_revision_supersedes() -> None:
    assert display_name("Pleural_Thickening") == "Pleural thickening" and display_name("Effusion") == "Effusion"
    assert all("_" not in display_name(label) for label in LABELS)
    report, _ = phantom_report(revision=3)
    assert report.supersedes_text() == "the previous revision"  # not known: no guess, no bare UID
    dated = replace(report, superseded_revision=2, superseded_at=dt.datetime(2026, 11, 26, 18, 5, tzinfo=dt.UTC))
    assert dated.supersedes_text() == "revision 2 of 2026-11-26 18:05 UTC"
    assert phantom_report()[0].supersedes_text() is None
    with pytest.raises(ValueError, match="superseded_revision"):
        replace(report, superseded_revision=3)
    with pytest.raises(ValueError, match="superseded_at"):
        replace(report, superseded_revision=2, superseded_at=dt.datetime(2026, 11, 26))
