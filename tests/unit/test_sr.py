"""DICOM SR: TID 1500 content, filed into the source study, valid for dicom3tools (dciodvfy, dcentvfy), readable by
dcmtk (dsrdump), deterministic, revisions reference their predecessors; real DICOM sources work too."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from model.preprocess import decode_image
from model.types import LABELS, Applicability, QualityIssue
from reporting.exclusions import ExclusionRules
from reporting.report import SourceImage, assemble, domain_check, study_report
from reporting.sr import APPLICABILITY, FINDING_CODES, IN_DOMAIN, OUT_OF_DOMAIN, build_sr
from tests.reporting_helpers import demo_model, image_result, make_prediction, phantom_report

REAL_CXR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-cxr"
REAL_FILES = ("siim-ptx-1.2.276.0.7230010.3.1.4.8323329.6904.dcm", "Fake_MONOHR1.dcm")
FINDINGS = {"Pneumothorax": 0.97, "Edema": 0.6, "Effusion": 0.9}


def _run(*cmd: str) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Error" in line]


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def phantom_sr(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("sr")
    report, sources = phantom_report(findings=FINDINGS, revision=2, predecessors=("1.2.826.0.1.3680043.8.498.7",))
    sr = build_sr(report, sources)
    return report, sources, sr, _write(sr, folder / "sr.dcm"), _write(sources[0], folder / "source.dcm")


def test_sr_passes_dciodvfy_and_dcentvfy_with_its_source(phantom_sr) -> None:  # type: ignore[no-untyped-def]
    _, _, _, sr_path, source_path = phantom_sr
    out = _run("dciodvfy", str(sr_path))
    assert "Comprehensive3DSR" in out
    assert _errors(out) == [], out
    out = _run("dcentvfy", str(source_path), str(sr_path))
    assert _errors(out) == [], out


def test_sr_files_into_the_source_study_unverified(phantom_sr) -> None:  # type: ignore[no-untyped-def]
    _, sources, _, sr_path, _ = phantom_sr
    sr, src = pydicom.dcmread(sr_path), sources[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        assert sr.get(keyword) == src.get(keyword), keyword
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    # revision 2 references the SR it supersedes, in the same SR series
    pred = sr.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == src.StudyInstanceUID
    assert pred.ReferencedSeriesSequence[0].SeriesInstanceUID == sr.SeriesInstanceUID
    assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        "1.2.826.0.1.3680043.8.498.7"


def test_dsrdump_shows_every_finding_with_its_evaluation(phantom_sr) -> None:  # type: ignore[no-untyped-def]
    out = _run("dsrdump", "+Pl", str(phantom_sr[3]))  # +Pl: print long text values in full
    for label in LABELS:
        code = FINDING_CODES[label]
        assert f'({code.value},{code.scheme_designator},"{code.meaning}")' in out, label
    assert out.count('(52101004,SCT,"Present")') == 2  # Pneumothorax, Effusion
    assert out.count('(272519000,SCT,"Absent")') == 12  # 11 below threshold + Edema excluded
    assert "Excluded: Pneumothorax present" in out
    assert out.count("(POLYLINE,") == 3 and out.count('NUM:(,,"Probability")') == len(LABELS)
    assert "(POINT," not in out
    assert "Verification Flag   : UNVERIFIED" in out


def test_groups_carry_probability_region_and_algorithm(phantom_sr) -> None:  # type: ignore[no-untyped-def]
    report, _, _, sr_path, _ = phantom_sr
    doc = hd.sr.srread(sr_path)
    content = doc.content
    groups = content.get_planar_roi_measurement_groups() + content.get_image_measurement_groups()
    assert len(groups) == len(LABELS)
    result = report.images[0]
    for group in content.get_planar_roi_measurement_groups():
        label = next(lbl for lbl, code in FINDING_CODES.items() if code.value == group.finding_type.value)
        finding = result.finding(label)
        assert finding.positive
        # SCOORD closed POLYLINE: the box of the main heat region, holding the heatmap peak
        points = group.roi.value
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE and len(points) == 5
        assert tuple(points[0]) == tuple(points[-1])
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        row, col = finding.peak
        assert x0 <= col + 0.5 <= x1 and y0 <= row + 0.5 <= y1
        assert 0 <= x0 < x1 <= report.source.columns and 0 <= y0 < y1 <= report.source.rows
        (measurement,) = group.get_measurements()
        assert measurement.value == pytest.approx(finding.probability, abs=1e-6)
        texts = {item.name.meaning: item.value for item in group[0].ContentSequence
                 if item.value_type == hd.sr.ValueTypeValues.TEXT}
        assert texts["Algorithm Name"] == "chexd-test" and texts["Algorithm Version"] == report.model.version
    assert {g.finding_type.value for g in content.get_planar_roi_measurement_groups()} == {
        FINDING_CODES[x].value for x in ("Pneumothorax", "Edema", "Effusion")}


def test_sr_uid_is_deterministic_and_changes_with_the_revision() -> None:
    report, sources = phantom_report(findings=FINDINGS)
    a, b = build_sr(report, sources), build_sr(report, sources)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    revised, _ = phantom_report(findings=FINDINGS, revision=2, predecessors=(str(a.SOPInstanceUID),))
    c = build_sr(revised, sources)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID == a.SeriesInstanceUID
    assert "PredecessorDocumentsSequence" not in a


def test_sources_must_match_the_report_images() -> None:
    report, sources = phantom_report(findings=FINDINGS)
    with pytest.raises(ValueError, match="1 report images"):
        build_sr(report, sources * 2)
    other = sources[0].copy()
    other.SOPInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="same order"):
        build_sr(report, [other])


@pytest.mark.parametrize("name", REAL_FILES)
def test_sr_for_the_real_dicom_files_passes_dciodvfy(name: str, tmp_path: Path) -> None:
    ds = pydicom.dcmread(REAL_CXR / name)
    image = decode_image(ds)
    result = image_result(ds, image, make_prediction({"Nodule": 0.8, "Effusion": 0.7}))
    report = study_report([result], demo_model())
    with pytest.warns(UserWarning, match="single component"):  # highdicom notes the source's odd PatientName
        sr = build_sr(report, [ds])
    sr_path = _write(sr, tmp_path / "sr.dcm")
    out = _run("dciodvfy", str(sr_path))
    assert _errors(out) == [], out
    # the source's own invalid Patient's Age ("62") is not copied; everything dcentvfy compares is consistent
    assert "PatientAge" not in pydicom.dcmread(sr_path)
    out = _run("dcentvfy", str(REAL_CXR / name), str(sr_path))
    assert _errors(out) == [], out
    assert "Pleural effusion" in _run("dsrdump", str(sr_path))


def test_a_two_image_study_has_a_group_per_finding_and_image(tmp_path: Path) -> None:
    from tests.reporting_helpers import phantom_case

    study = "1.2.826.0.1.3680043.8.498.42"
    results, sources = [], []
    for index in (2, 3):
        _, ds, image, prediction = phantom_case(index=index, findings={"Effusion": 0.9}, study_uid=study)
        if sources:  # a second view of the same patient and study
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate",
                            "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName"):
                setattr(ds, keyword, sources[0].get(keyword))
        results.append(image_result(ds, image, prediction))
        sources.append(ds)
    sr = build_sr(study_report(results, demo_model()), sources)
    path = _write(sr, tmp_path / "sr.dcm")
    assert _errors(_run("dciodvfy", str(path))) == []
    for i, ds in enumerate(sources):
        _write(ds, tmp_path / f"src{i}.dcm")
    assert _errors(_run("dcentvfy", str(tmp_path / "src0.dcm"), str(tmp_path / "src1.dcm"), str(path))) == []
    content = hd.sr.srread(path).content
    groups = content.get_planar_roi_measurement_groups() + content.get_image_measurement_groups()
    assert len(groups) == 2 * len(LABELS)
    out = _run("dsrdump", str(path))
    assert "Effusion image 1" in out and "Effusion image 2" in out


def _comparable(ds: pydicom.Dataset) -> bytes:
    """The written SR without highdicom's build timestamp (Contributing Equipment's ContributionDateTime)."""
    import io

    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = "20000101000000"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_fast_sr_equals_highdicom_full_build() -> None:
    """The fast path (measurement groups attached after highdicom built the document) writes the same bytes as handing
    highdicom the whole content tree, for a revision with a predecessor and an excluded finding."""
    report, sources = phantom_report(
        findings={"Pneumothorax": 0.97, "Edema": 0.6}, revision=2, predecessors=("1.2.826.0.1.3680043.8.498.7",)
    )
    assert any(f.status == "excluded" for f in report.images[0].findings)
    fast, full = build_sr(report, sources), build_sr(report, sources, fast=False)
    assert len(fast.ContentSequence[-1].ContentSequence) == len(LABELS)
    assert _comparable(fast) == _comparable(full)


# --- the applicability gate (issue 14) ---------------------------------------------------------------------------

def _gated_sr(policy: str, tmp_path: Path, applicability: Applicability, quality: tuple = ()):  # type: ignore[no-untyped-def]
    from tests.reporting_helpers import THRESHOLDS, phantom_case

    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9})
    result = assemble(prediction, image, SourceImage.from_dataset(ds), thresholds=THRESHOLDS, rules=ExclusionRules(),
                      domain=domain_check(applicability, quality, policy))
    sr = build_sr(study_report([result], demo_model()), [ds])
    path = _write(sr, tmp_path / f"{policy}.dcm")
    _write(ds, tmp_path / "source.dcm")
    assert _errors(_run("dciodvfy", str(path))) == []
    assert _errors(_run("dcentvfy", str(tmp_path / "source.dcm"), str(path))) == []
    groups = pydicom.dcmread(path).ContentSequence[-1].ContentSequence  # the Imaging Measurements container
    texts = [item.TextValue for item in groups[0].ContentSequence if item.ValueType == "TEXT"]
    return groups, _run("dsrdump", str(path)) + "\n".join(texts)


def _coded(group: pydicom.Dataset) -> dict[str, str]:
    """Concept name code value -> coded value code value of the group's CODE items."""
    return {item.ConceptNameCodeSequence[0].CodeValue: item.ConceptCodeSequence[0].CodeValue
            for item in group.ContentSequence if item.ValueType == "CODE"}


OUTSIDE = Applicability(score=41.2, threshold=18.7, in_domain=False, method="mahalanobis-pca32")


def test_withheld_image_is_one_coded_out_of_domain_group_and_no_findings(tmp_path: Path) -> None:
    quality = (QualityIssue(code="inverted", reason="the image looks inverted for MONOCHROME2"),)
    groups, dump = _gated_sr("withhold", tmp_path, OUTSIDE, quality)
    assert len(groups) == 1  # no finding groups at all
    coded = _coded(groups[0])
    assert coded[APPLICABILITY.value] == OUT_OF_DOMAIN.value
    assert coded["111029"] == "111235"  # DCM Image Quality Rating: Unusable - Quality renders image unusable
    assert "Applicability image 1" in dump and "Effusion" not in dump
    assert "outside the model's validated domain — no AI findings for this image" in dump
    assert "41.2" in dump and "18.7" in dump and "inverted for MONOCHROME2" in dump
    scores = [item for item in groups[0].ContentSequence if item.ValueType == "NUM"]
    assert float(scores[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(41.2)


def test_flagged_image_keeps_its_finding_groups_beside_the_warning(tmp_path: Path) -> None:
    groups, dump = _gated_sr("flag", tmp_path, OUTSIDE)
    assert len(groups) == 1 + len(LABELS)
    assert _coded(groups[0])[APPLICABILITY.value] == OUT_OF_DOMAIN.value and "111029" not in _coded(groups[0])
    assert "findings shown with this warning" in dump and "Effusion image 1" in dump


def test_in_domain_image_is_coded_in_domain(tmp_path: Path) -> None:
    inside = Applicability(score=7.5, threshold=18.7, in_domain=True, method="mahalanobis-pca32")
    groups, _ = _gated_sr("withhold", tmp_path, inside)
    assert len(groups) == 1 + len(LABELS) and _coded(groups[0])[APPLICABILITY.value] == IN_DOMAIN.value
