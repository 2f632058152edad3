"""Parametric Map heatmaps (IHE AI Results): valid (dciodvfy), consistent with the source study (dcentvfy), values in
logit units that read back, the source image referenced, referenced by the SR; the equipment module on every object;
the finding codes table."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import reporting.codes
from model.types import LABELS
from reporting.codes import FINDING_CODES, PRIVATE_SCHEME, SCT_FINDINGS
from reporting.pdf import write_pdf
from reporting.pmap import build_pm, pm_grid
from reporting.sc import build_encapsulated_pdf, build_sc
from reporting.sr import build_sr, heat_box
from tests.reporting_helpers import phantom_report

FINDINGS = {"Pneumothorax": 0.97, "Edema": 0.6, "Effusion": 0.9}
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
# dcentvfy's only warning on these objects: its tables file Accession Number under the Series IE for image IODs
# (the Request Attributes Sequence nests it there) and under Study for SR - the values are the same
TOOL_WARNING = "Different information entities for attribute - Element=<AccessionNumber>"


def _run(*cmd: str) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def _lines(output: str, word: str) -> list[str]:
    return [line for line in output.splitlines() if word in line]


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("pm")
    report, sources = phantom_report(findings=FINDINGS)
    result, source = report.images[0], sources[0]
    uid = result.source.sop_instance_uid
    pms = {f.label: build_pm(report, result, f, source, number=n) for n, f in enumerate(result.positive, start=1)}
    paths = {"source": _save(source, folder / "source.dcm")}
    for label, pm in pms.items():
        paths[f"pm-{label}"] = _save(pm, folder / f"pm-{label}.dcm")
        paths[f"sc-{label}"] = _save(
            build_sc(report, result, result.finding(label), source), folder / f"sc-{label}.dcm"
        )
    paths["sr"] = _save(build_sr(report, sources, heatmaps={(uid, k): v for k, v in pms.items()}), folder / "sr.dcm")
    write_pdf(report, folder / "report.pdf")
    paths["pdf-dicom"] = _save(
        build_encapsulated_pdf(report, (folder / "report.pdf").read_bytes(), sources), folder / "report-pdf.dcm"
    )
    return report, sources, pms, paths


def test_parametric_maps_pass_dciodvfy_without_warnings(written) -> None:  # type: ignore[no-untyped-def]
    _, _, pms, paths = written
    assert set(pms) == {"Pneumothorax", "Edema", "Effusion"}  # present and excluded findings, as the SCs
    for label in pms:
        out = _run("dciodvfy", str(paths[f"pm-{label}"]))
        assert "ParametricMap" in out
        assert _lines(out, "Error") == [] and _lines(out, "Warning") == [], out


def test_sr_sc_and_encapsulated_pdf_have_no_avoidable_warnings(written) -> None:  # type: ignore[no-untyped-def]
    _, _, _, paths = written
    for name in ("sr", "pdf-dicom", "sc-Effusion"):
        out = _run("dciodvfy", str(paths[name]))
        assert _lines(out, "Error") == [], out
        # the one private code (Pleural thickening, 99CHEXD) is the only thing dciodvfy questions
        assert [w for w in _lines(out, "Warning") if "<99CHEXD>" not in w] == [], f"{name}: {out}"


def test_every_object_is_one_consistent_patient_and_study(written) -> None:  # type: ignore[no-untyped-def]
    _, _, _, paths = written
    out = _run("dcentvfy", *(str(p) for p in paths.values()))
    assert _lines(out, "Error") == [], out
    assert [w for w in _lines(out, "Warning") if TOOL_WARNING not in w] == [], out


def test_pm_reads_back_with_heat_in_logit_units_and_references_its_source(written) -> None:  # type: ignore[no-untyped-def]
    report, sources, _, paths = written
    result, source = report.images[0], sources[0]
    ds = pydicom.dcmread(paths["pm-Effusion"])
    assert ds.SOPClassUID == PARAMETRIC_MAP
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    # the source image is referenced per frame (Derivation Image Sequence) and in the Referenced Series Sequence
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID and ref.SpatialLocationsPreserved == "YES"
    # highdicom reads it; stored * slope = the finding's heat (ReLU of the CAM, logit units) on the source grid
    pm = hd.pm.ParametricMap.from_dataset(ds)
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "HEAT" and mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    values = pm.pixel_array.astype(np.float64) * float(mapping.RealWorldValueSlope) + float(
        mapping.RealWorldValueIntercept
    )
    heat = result.heatmap("Effusion")
    assert values.shape == heat.shape == (source.Rows, source.Columns)
    assert np.abs(values - heat).max() <= float(mapping.RealWorldValueSlope)  # one quantisation step
    assert values.max() == pytest.approx(heat.max(), rel=1e-6) and values.min() >= 0


def test_a_large_source_gets_a_reduced_grid_covering_the_same_extent() -> None:
    report, sources = phantom_report(findings={"Effusion": 0.9})
    result, source = report.images[0], sources[0]
    pm = build_pm(report, result, result.finding("Effusion"), source, max_side=100)
    assert (pm.Rows, pm.Columns) == pm_grid(source.Rows, source.Columns, 100) == (86, 86)
    spacing = [float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    source_spacing = [float(v) for v in source.PixelSpacing]
    assert spacing[0] * pm.Rows == pytest.approx(source_spacing[0] * source.Rows, rel=1e-5)
    assert spacing[1] * pm.Columns == pytest.approx(source_spacing[1] * source.Columns, rel=1e-5)
    ref = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.SpatialLocationsPreserved == "NO"
    assert pm_grid(3000, 2500) == (250, 209) and pm_grid(256, 100) == (256, 100)
    with pytest.raises(ValueError, match="0x5"):
        pm_grid(0, 5)


@pytest.mark.parametrize("charset", ["", ["", "ISO 2022 IR 87"], "ISO_IR 100"])
def test_a_source_character_set_highdicom_would_refuse_still_gives_a_utf8_map(charset: object) -> None:
    report, sources = phantom_report(findings={"Effusion": 0.9})
    result, source = report.images[0], sources[0]
    source.SpecificCharacterSet = charset  # an empty or multi-valued one came from a hostile sender (test_phi_logs)
    pm = build_pm(report, result, result.finding("Effusion"), source)
    assert pm.SpecificCharacterSet == "ISO_IR 192" and pm.PatientID == source.PatientID


def test_pm_uid_comes_from_the_content() -> None:
    report, sources = phantom_report(findings={"Effusion": 0.9, "Cardiomegaly": 0.8})
    result, source = report.images[0], sources[0]
    effusion = result.finding("Effusion")
    a, b = build_pm(report, result, effusion, source), build_pm(report, result, effusion, source, number=7)
    assert a.SOPInstanceUID == b.SOPInstanceUID  # not the instance number, not the revision
    revised, _ = phantom_report(findings={"Effusion": 0.9, "Cardiomegaly": 0.8}, revision=2)
    assert build_pm(revised, revised.images[0], effusion, source).SOPInstanceUID == a.SOPInstanceUID
    other = build_pm(report, result, result.finding("Cardiomegaly"), source)
    assert other.SOPInstanceUID != a.SOPInstanceUID and other.SeriesInstanceUID == a.SeriesInstanceUID
    with pytest.raises(ValueError, match="absent finding 'Nodule'"):
        build_pm(report, result, result.finding("Nodule"), source)


def test_sr_references_each_parametric_map_and_lists_it_as_evidence(written) -> None:  # type: ignore[no-untyped-def]
    _, _, pms, paths = written
    sr = pydicom.dcmread(paths["sr"])
    groups = sr.ContentSequence[-1].ContentSequence
    illustrated = {}
    for group in groups:
        finding = next(
            i.ConceptCodeSequence[0].CodeMeaning
            for i in group.ContentSequence
            if i.ConceptNameCodeSequence[0].CodeValue == "121071"
        )  # Finding
        for item in group.ContentSequence:
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121200":
                ref = item.ReferencedSOPSequence[0]
                assert ref.ReferencedSOPClassUID == PARAMETRIC_MAP
                illustrated[finding] = ref.ReferencedSOPInstanceUID
    expected = {FINDING_CODES[label].meaning: str(pm.SOPInstanceUID) for label, pm in pms.items()}
    assert illustrated == expected
    evidence = {
        item.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence
        for s in series.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    }
    assert set(expected.values()) <= evidence


def test_every_group_carries_algorithm_identification(written) -> None:  # type: ignore[no-untyped-def]
    report, _, _, paths = written
    sr = pydicom.dcmread(paths["sr"])
    for group in sr.ContentSequence[-1].ContentSequence:
        texts = {
            i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue
            for i in group.ContentSequence
            if i.ValueType == "TEXT"
        }
        assert texts["Algorithm Name"] == report.model.name
        assert texts["Algorithm Version"] == report.model.version


def test_every_object_carries_equipment_and_the_patient(written) -> None:  # type: ignore[no-untyped-def]
    report, sources, _, paths = written
    source = sources[0]
    assert source.get("PatientAge")  # the phantom has one: it must reach every object
    for name, path in paths.items():
        if name == "source":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.Manufacturer == "chexd", name
        assert ds.ManufacturerModelName == report.model.name, name
        assert list(ds.SoftwareVersions)[1] == f"model {report.model.version}", name
        assert str(ds.SoftwareVersions[0]).startswith("chexd "), name
        assert ds.DeviceSerialNumber == report.model.version, name
        for keyword in ("PatientAge", "PatientSex", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID"):
            assert ds.get(keyword) == source.get(keyword), (name, keyword)


def test_the_sr_region_is_the_box_of_the_main_heat() -> None:
    report, _ = phantom_report(findings={"Effusion": 0.9})
    result = report.images[0]
    finding = result.finding("Effusion")
    x0, y0, x1, y1 = heat_box(result, finding)
    heat = result.heatmap("Effusion")
    row, col = finding.peak
    assert x0 <= col < x1 and y0 <= row < y1
    # the bounding box of the half-peak region that holds the peak, to one box-grid cell (2 px on this 256 px image)
    from scipy import ndimage

    labels, _ = ndimage.label(heat >= 0.5 * heat.max(), structure=np.ones((3, 3), dtype=bool))
    rows, cols = np.nonzero(labels == labels[np.unravel_index(np.argmax(heat), heat.shape)])
    expected = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert np.abs(np.array([x0, y0, x1, y1]) - np.array(expected)).max() <= 2
    assert (x1 - x0) * (y1 - y0) < 0.5 * heat.size  # a region, not the whole image


def test_codes_table_documents_every_code_and_claims_sct_only_where_given() -> None:
    assert tuple(FINDING_CODES) == tuple(LABELS)
    doc = reporting.codes.__doc__ or ""
    for label, code in FINDING_CODES.items():
        row = re.search(rf"^\| {label} \| (\S+) \| (\S+) \| ([^|]+) \|", doc, re.MULTILINE)
        assert row is not None, label
        assert (row[1], row[2], row[3].strip()) == (code.value, code.scheme_designator, code.meaning), label
    assert set(SCT_FINDINGS) == set(LABELS) - {"Infiltration", "Pleural_Thickening"}
    for label in SCT_FINDINGS:
        assert re.fullmatch(r"[1-9]\d{5,17}", FINDING_CODES[label].value), label  # SCTID: 6-18 digits
        assert FINDING_CODES[label].value[-3:-1] == "00"  # partition identifier of a concept id (short form)
    assert FINDING_CODES["Hernia"] == FINDING_CODES["Hernia"].__class__("84089009", "SCT", "Hiatal hernia")
    assert [k for k, c in FINDING_CODES.items() if c.scheme_designator == PRIVATE_SCHEME] == ["Pleural_Thickening"]


def test_fast_sr_with_parametric_maps_equals_highdicom_full_build() -> None:
    """highdicom, handed the whole tree, checks every referenced instance is in the evidence: the PMs are."""
    import io

    report, sources = phantom_report(findings={"Effusion": 0.9, "Cardiomegaly": 0.8})
    result = report.images[0]
    pms = {(result.source.sop_instance_uid, f.label): build_pm(report, result, f, sources[0]) for f in result.positive}

    def written(ds: pydicom.Dataset) -> bytes:
        for item in ds.get("ContributingEquipmentSequence", []):
            item.ContributionDateTime = "20000101000000"  # highdicom's build timestamp
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    fast = build_sr(report, sources, heatmaps=pms)
    assert written(fast) == written(build_sr(report, sources, heatmaps=pms, fast=False))
