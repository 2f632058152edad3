"""Heatmap Secondary Capture images and the Encapsulated PDF, both filed into the source images' study.

- :func:`build_sc`: one Secondary Capture Image (PS3.3 A.8.1, highdicom ``SCImage``) per present or excluded finding
  and image: the image (bright = dense, radiological orientation) with the finding's heatmap, a colour bar and a
  burned-in red banner "AI RESULT — NOT FOR DIAGNOSIS" (plus "SYNTHETIC DEMO MODEL" when it applies);
  BurnedInAnnotation YES. RGB, at most 1024 px on the image's longer side.
- :func:`build_encapsulated_pdf`: the PDF report as Encapsulated PDF Storage (PS3.3 A.45.1), built on highdicom's
  ``SOPClass`` with the patient and study copied from the first source image.

Both are in one series per study and kind, with deterministic SOP Instance UIDs (reporting.uids), and carry the
equipment module of every chexd object (reporting.equipment). The heatmaps are also written as Parametric Maps
(reporting.pmap) for viewers that overlay them; the SC stays for viewers that cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from reporting.equipment import MANUFACTURER, set_equipment, source_header
from reporting.errors import ReportError
from reporting.render import colour_bar, draw_peak, font, overlay
from reporting.report import Finding, ImageResult, StudyReport
from reporting.uids import content_uid, instance_uid, series_uid

__all__ = ["SC_BANNER", "SC_SERIES_NUMBER", "PDF_SERIES_NUMBER", "build_encapsulated_pdf", "build_sc",
           "render_sc"]

SC_BANNER = "AI RESULT — NOT FOR DIAGNOSIS"
SC_SERIES_NUMBER = 9002
PDF_SERIES_NUMBER = 9003
_RED = (192, 0, 26)


def render_sc(report: StudyReport, result: ImageResult, finding: Finding, *, max_side: int = 1024,
              min_side: int = 640) -> np.ndarray:
    """The Secondary Capture's pixels: uint8 RGB [rows, columns, 3] — banner on top, image with heatmap and peak
    marker, colour bar on the right; the image part is ``min_side`` to ``max_side`` px on its longer side."""
    ov = overlay(result, finding, max_side=max_side, min_side=min_side)
    h, w = ov.rgb.shape[:2]
    unit = max(12, round(max(h, w) / 48))  # text size scales with the picture
    banner_h = 3 * unit + (unit if report.model.synthetic else 0)
    panel_w = 5 * unit
    canvas = Image.new("RGB", (w + panel_w, h + banner_h), (0, 0, 0))
    picture = Image.fromarray(ov.rgb)
    draw_peak(picture, ov.peak)
    canvas.paste(picture, (0, banner_h))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, canvas.width, banner_h - 1], fill=_RED)
    draw.text((unit // 2, unit // 4), SC_BANNER, fill=(255, 255, 255), font=font(round(1.3 * unit), bold=True))
    m = report.model
    line = (f"{finding.name}: {finding.status}, p={finding.probability:.2f} (threshold {finding.threshold:.2f})"
            f" · model {m.name} {m.version}")
    draw.text((unit // 2, round(1.85 * unit)), line, fill=(255, 255, 255), font=font(round(0.75 * unit)))
    if m.synthetic:
        draw.text((unit // 2, round(2.85 * unit)), "SYNTHETIC DEMO MODEL — trained on phantoms only",
                  fill=(255, 235, 120), font=font(round(0.8 * unit), bold=True))
    bar_h = h // 2
    bar = Image.fromarray(colour_bar(bar_h, width=unit))
    x0, y0 = w + unit, banner_h + unit * 2
    canvas.paste(bar, (x0, y0))
    small = font(round(0.7 * unit))
    draw.text((w + unit // 2, banner_h + unit // 2), "heat (logit)", fill=(255, 255, 255), font=small)
    for frac in (1.0, 0.5, 0.0):
        y = y0 + round((1.0 - frac) * (bar_h - 1)) - unit // 3
        draw.text((x0 + unit + 4, y), f"{ov.vmax * frac:.2f}", fill=(255, 255, 255), font=small)
    main = finding.main_region  # the same words as the PDF and the SR (Finding.region)
    if main is not None:
        draw.text((w + unit // 2, y0 + bar_h + unit), "most heat:", fill=(255, 255, 255), font=small)
        lines: list[str] = []
        for word in main.name.split():  # wrap the zone's name to the panel's width
            joined = f"{lines[-1]} {word}" if lines else word
            if lines and small.getlength(joined) <= panel_w - unit:
                lines[-1] = joined
            else:
                lines.append(word)
        for k, text in enumerate([*lines, f"{main.share:.0%} of heat"]):
            draw.text((w + unit // 2, y0 + bar_h + unit * (2 + k)), text, fill=(255, 255, 255), font=small)
    return np.asarray(canvas)


def _orientation(ds: Dataset) -> tuple[str, str]:
    value = ds.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return str(value[0]), str(value[1])
    return "L", "F"  # a frontal chest radiograph as displayed: rows to the patient's left, columns to the feet


def build_sc(report: StudyReport, result: ImageResult, finding: Finding, source: pydicom.Dataset,
             *, number: int = 1) -> hd.sc.SCImage:
    """The heatmap Secondary Capture of one present or excluded ``finding`` of ``result``.

    ``source``: the source image dataset (patient and study are copied from it); ``number``: its Instance Number.
    Raises ReportError for an absent finding or a source that is not the result's image."""
    if not finding.positive:
        raise ReportError(f"No heatmap Secondary Capture for absent finding {finding.label!r}")
    if str(source.SOPInstanceUID) != result.source.sop_instance_uid:
        raise ReportError(f"Invalid source {source.SOPInstanceUID} - the result is for "
                          f"{result.source.sop_instance_uid}")
    ref = source_header(source)
    pixels = render_sc(report, result, finding)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid("sc", report.study_instance_uid),
        series_number=SC_SERIES_NUMBER,
        # from the content, not the revision: an unchanged heatmap keeps its UID (reporting.uids.content_uid)
        sop_instance_uid=content_uid(f"sc:{finding.label}", result.source.sop_instance_uid, result.model_version,
                                     pixels),
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="chexd AI heatmaps (not for diagnosis)",
        specific_character_set="ISO_IR 192",  # UTF-8, as the SR (reporting/sr.py says why)
    )
    sc.copy_patient_and_study_information(ref)  # from_ref_dataset copies only the core study attributes
    # General Series Laterality is Type 2C, needed only for a paired body part: say what the body part is
    sc.BodyPartExamined = str(ref.get("BodyPartExamined") or "CHEST")
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"AI heatmap of {finding.name} ({finding.status}); not for diagnosis"
    sc.DerivationDescription = (f"Class activation map of {report.model.name} {report.model.version} over the "
                                "source image")
    sc.SourceImageSequence = [_reference(source)]
    _stamp(sc, report)
    set_equipment(sc, report)
    return sc


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _study_reference(study: str, series: str, sop_class: str, uids: Sequence[str]) -> Dataset:
    """A Hierarchical SOP Instance Reference Macro item (PS3.3 Table C.17-3): one study, one series, ``uids``."""
    refs = []
    for uid in uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    series_item = Dataset()
    series_item.SeriesInstanceUID = series
    series_item.ReferencedSOPSequence = refs
    item = Dataset()
    item.StudyInstanceUID = study
    item.ReferencedSeriesSequence = [series_item]
    return item


def _stamp(ds: Dataset, report: StudyReport) -> None:
    created = report.created_at
    ds.ContentDate = ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = created.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = "+0000"


def build_encapsulated_pdf(report: StudyReport, pdf: bytes, sources: Sequence[pydicom.Dataset],
                           *, predecessors: Sequence[str] = ()) -> Dataset:
    """The PDF report (its bytes) as an Encapsulated PDF instance in the study; write it with ``save_as``.

    ``predecessors``: SOP Instance UIDs of the Encapsulated PDFs this revision replaces (Predecessor Documents
    Sequence of the Encapsulated Document module, PS3.3 C.24.2; they are in this study's PDF series).

    Raises ReportError for bytes that are not a PDF or no sources."""
    if not pdf.startswith(b"%PDF-"):
        raise ReportError("Invalid pdf - the bytes do not start with %PDF-")
    if not sources:
        raise ReportError("Invalid sources - need at least one source image dataset")
    ref = source_header(sources[0])
    ds = hd.SOPClass(
        study_instance_uid=report.study_instance_uid,
        series_instance_uid=series_uid("pdf", report.study_instance_uid),
        series_number=PDF_SERIES_NUMBER,
        sop_instance_uid=instance_uid("pdf", [r.source.sop_instance_uid for r in report.images],
                                      report.model.version, report.revision),
        sop_class_uid=EncapsulatedPDFStorage,
        instance_number=report.revision,
        modality="DOC",
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="chexd AI report (PDF, unverified)",
        specific_character_set="ISO_IR 192",  # UTF-8: copied names in any script survive (default: '?' for them)
    )
    ds.copy_patient_and_study_information(ref)
    _stamp(ds, report)
    set_equipment(ds, report)
    ds.ConversionType = "WSD"  # SC Equipment module: workstation
    ds.AcquisitionDateTime = report.created_at.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the PDF names the patient
    ds.DocumentTitle = ("Revised " if report.revision > 1 else "") + "AI chest radiograph findings report"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.SourceInstanceSequence = [_reference(s) for s in sources]
    if predecessors:
        ds.PredecessorDocumentsSequence = [_study_reference(report.study_instance_uid,
                                                            series_uid("pdf", report.study_instance_uid),
                                                            EncapsulatedPDFStorage, predecessors)]
    data = pdf + (b"\0" if len(pdf) % 2 else b"")  # OB value of even length (PS3.5 7.1.1)
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds
