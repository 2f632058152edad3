"""Heatmap Secondary Capture and Encapsulated PDF: valid (dciodvfy), consistent with the source study (dcentvfy),
burned-in banner, deterministic UIDs, the PDF inside is the report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from reporting.pdf import write_pdf
from reporting.sc import SC_BANNER, build_encapsulated_pdf, build_sc, render_sc
from reporting.sr import build_sr
from tests.reporting_helpers import phantom_report

FINDINGS = {"Pneumothorax": 0.97, "Edema": 0.6, "Effusion": 0.9}


def _run(*cmd: str) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Error" in line]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("sc")
    report, sources = phantom_report(findings=FINDINGS)
    result = report.images[0]
    paths = {"source": folder / "source.dcm", "sr": folder / "sr.dcm", "pdf": folder / "report.pdf",
             "pdf-dicom": folder / "report-pdf.dcm"}
    sources[0].save_as(paths["source"], enforce_file_format=True)
    build_sr(report, sources).save_as(paths["sr"], enforce_file_format=True)
    for n, finding in enumerate(result.positive, start=1):
        path = folder / f"sc-{finding.label}.dcm"
        build_sc(report, result, finding, sources[0], number=n).save_as(path, enforce_file_format=True)
        paths[f"sc-{finding.label}"] = path
    write_pdf(report, paths["pdf"])
    build_encapsulated_pdf(report, paths["pdf"].read_bytes(), sources).save_as(paths["pdf-dicom"],
                                                                                 enforce_file_format=True)
    return report, sources, paths


def test_every_object_passes_dciodvfy(written) -> None:  # type: ignore[no-untyped-def]
    _, _, paths = written
    for name, path in paths.items():
        if name in ("source", "pdf"):
            continue
        out = _run("dciodvfy", str(path))
        assert _errors(out) == [], f"{name}: {out}"


def test_source_and_results_are_one_consistent_patient_and_study(written) -> None:  # type: ignore[no-untyped-def]
    _, _, paths = written
    files = [str(p) for name, p in paths.items() if name != "pdf"]
    assert len(files) == 6  # source, SR, Encapsulated PDF, 3 SCs (Pneumothorax, Effusion, Edema excluded)
    out = _run("dcentvfy", *files)
    assert _errors(out) == [], out


def test_sc_is_an_rgb_heatmap_with_a_burned_in_banner(written) -> None:  # type: ignore[no-untyped-def]
    report, sources, paths = written
    sc = pydicom.dcmread(paths["sc-Effusion"])
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.StudyInstanceUID == sources[0].StudyInstanceUID and sc.PatientID == sources[0].PatientID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    pixels = sc.pixel_array.astype(int)
    # the banner: a red band across the top, with white text in it
    band = pixels[: max(12, pixels.shape[0] // 40)]
    red = (band[..., 0] > 150) & (band[..., 1] < 60) & (band[..., 2] < 80)
    assert red.mean() > 0.6
    assert ((band.min(axis=2) > 200).sum()) > 20
    # below the banner: grey anatomy and saturated heat colours
    body = pixels[pixels.shape[0] // 8:, : pixels.shape[1] * 3 // 4]
    grey = (body.max(axis=2) - body.min(axis=2)) < 4
    assert grey.mean() > 0.5
    assert ((body.max(axis=2) - body.min(axis=2)) > 150).sum() > 100
    assert "NOT FOR DIAGNOSIS" in SC_BANNER and "not for diagnosis" in sc.ImageComments


def test_sc_uids_are_deterministic_per_finding_and_absent_findings_have_none(written) -> None:  # type: ignore[no-untyped-def]
    report, sources, paths = written
    result = report.images[0]
    again = build_sc(report, result, result.finding("Effusion"), sources[0])
    assert again.SOPInstanceUID == pydicom.dcmread(paths["sc-Effusion"]).SOPInstanceUID
    assert again.SOPInstanceUID != pydicom.dcmread(paths["sc-Pneumothorax"]).SOPInstanceUID
    assert again.SeriesInstanceUID == pydicom.dcmread(paths["sc-Pneumothorax"]).SeriesInstanceUID
    with pytest.raises(ValueError, match="absent finding 'Nodule'"):
        build_sc(report, result, result.finding("Nodule"), sources[0])


def test_sc_shows_the_decoded_image_under_the_heat() -> None:
    report, _ = phantom_report(findings={"Effusion": 0.9})
    result = report.images[0]
    effusion = result.finding("Effusion")
    rgb = render_sc(report, result, effusion, max_side=256, min_side=256).astype(int)
    h, w = result.image.shape
    top = rgb.shape[0] - h  # the banner sits above the picture
    picture = rgb[top:, :w]
    heat = result.heatmap("Effusion")
    cold = heat <= 0.05 * heat.max()
    assert np.abs(picture[..., 1][cold] - np.round(result.image * 255)[cold]).max() <= 1


def test_encapsulated_pdf_holds_the_report(written, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report, sources, paths = written
    ds = pydicom.dcmread(paths["pdf-dicom"])
    assert ds.SOPClassUID == pydicom.uid.EncapsulatedPDFStorage and ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    document = bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength]
    assert document == paths["pdf"].read_bytes()
    (tmp_path / "x.pdf").write_bytes(document)
    text = _run("pdftotext", str(tmp_path / "x.pdf"), "-")
    assert "Pneumothorax" in text and "NOT FOR DIAGNOSIS" in text
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    with pytest.raises(ValueError, match="%PDF-"):
        build_encapsulated_pdf(report, b"not a pdf", sources)
