"""One call from a study's predictions to its written documents: PDF, SR, heatmap SCs and the Encapsulated PDF.

This is what the daemon's report loop calls. It knows nothing of the database: it returns the findings per image
(for the rows) and the files it wrote (kind, path, and for DICOM objects their SOP Instance and Class UIDs).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import EncapsulatedPDFStorage

from model.types import Prediction, PreprocessRecipe
from reporting.exclusions import ExclusionRules
from reporting.pdf import write_pdf
from reporting.report import DomainCheck, Finding, ModelInfo, SourceImage, StudyReport, assemble, study_report
from reporting.sc import build_encapsulated_pdf, build_sc
from reporting.sr import build_sr

__all__ = ["ComposedStudy", "WrittenFile", "compose_study"]


@dataclass(frozen=True, kw_only=True, slots=True)
class WrittenFile:
    """A document written to disk: ``kind`` "pdf" (the PDF file), "sr", "sc" or "pdf-dicom" (Encapsulated PDF);
    DICOM kinds carry their SOP Instance and Class UIDs (None for the plain PDF)."""

    kind: str
    path: Path
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class ComposedStudy:
    """The report, its findings per image (in the order of the input images) and the files written."""

    report: StudyReport
    findings: list[tuple[Finding, ...]]
    files: list[WrittenFile]


def _recipe(facts: Mapping[str, Any]) -> PreprocessRecipe | None:
    value = facts.get("preprocessing")
    if isinstance(value, PreprocessRecipe):
        return value
    if isinstance(value, Mapping):
        return PreprocessRecipe(**value)
    return None


def _domain(facts: Mapping[str, Any]) -> DomainCheck | None:
    value = facts.get("domain")
    if isinstance(value, DomainCheck):
        return value
    if isinstance(value, Mapping):
        return DomainCheck.from_dict(value)
    return None


def _save(ds: pydicom.Dataset, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def _header_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy without the pixels: the result objects copy attributes only, and highdicom deep-copies the
    evidence it is given (half the SR's build time went into copying pixel data)."""
    header = pydicom.Dataset(ds)
    header.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            del header[keyword]
    return header


def compose_study(
    *,
    images: Sequence[tuple[pydicom.Dataset, np.ndarray, Prediction, Mapping[str, Any]]],
    revision: int,
    predecessors: Sequence[str],
    folder: Path,
    settings: Any = None,
    created_at: dt.datetime | None = None,
) -> ComposedStudy:
    """Assemble and write one study report revision into ``folder`` (created if needed).

    ``images``: per image of the study, oldest first: (source dataset, decoded image float [Rows, Columns] in [0, 1]
    bright = dense, its Prediction, the model facts archived with it: name, version, weights_sha256, synthetic,
    intended_use, thresholds, calibrated_at, and optionally preprocessing (a PreprocessRecipe dict; without it the
    CAM is assumed to span the whole, square-padded image) and domain (the applicability gate's verdict, a
    DomainCheck dict; a withheld image gets no findings and no heatmap SC)). The report states the last image's model.
    ``settings``: anything with ``report_top_channels`` and ``exclusion_margin`` (defaults 5 and 2.0).

    Writes report.pdf, report-pdf.dcm (Encapsulated PDF), sr.dcm and one sc-<image>-<finding>.dcm per present or
    excluded finding. Raises ValueError for no images, mixed studies, or thresholds that do not cover the labels."""
    if not images:
        raise ValueError("Invalid images - a study report needs at least one image")
    top_k = int(getattr(settings, "report_top_channels", 5))
    rules = ExclusionRules(margin=float(getattr(settings, "exclusion_margin", 2.0)))
    results = []
    for ds, pixels, prediction, facts in images:
        thresholds = facts.get("thresholds") or {}
        results.append(assemble(prediction, pixels, SourceImage.from_dataset(ds), thresholds=thresholds,
                                rules=rules, top_k=top_k, recipe=_recipe(facts), domain=_domain(facts)))
    report = study_report(results, ModelInfo.from_facts(images[-1][3]), revision=revision,
                          predecessors=tuple(predecessors), created_at=created_at)
    sources = [_header_only(ds) for ds, *_ in images]
    folder.mkdir(parents=True, exist_ok=True)
    files: list[WrittenFile] = []

    pdf_path = folder / "report.pdf"
    write_pdf(report, pdf_path)
    files.append(WrittenFile(kind="pdf", path=pdf_path))

    encapsulated = build_encapsulated_pdf(report, pdf_path.read_bytes(), sources)
    path = folder / "report-pdf.dcm"
    _save(encapsulated, path)
    files.append(WrittenFile(kind="pdf-dicom", path=path, sop_instance_uid=str(encapsulated.SOPInstanceUID),
                             sop_class_uid=str(EncapsulatedPDFStorage)))

    sr = build_sr(report, sources)
    path = folder / "sr.dcm"
    _save(sr, path)
    files.append(WrittenFile(kind="sr", path=path, sop_instance_uid=str(sr.SOPInstanceUID),
                             sop_class_uid=str(sr.SOPClassUID)))

    number = 0
    for n, (result, ds) in enumerate(zip(report.images, sources, strict=True), start=1):
        for finding in result.positive:
            number += 1
            sc = build_sc(report, result, finding, ds, number=number)
            path = folder / f"sc-{n}-{finding.label}.dcm"
            _save(sc, path)
            files.append(WrittenFile(kind="sc", path=path, sop_instance_uid=str(sc.SOPInstanceUID),
                                     sop_class_uid=str(sc.SOPClassUID)))
    return ComposedStudy(report=report, findings=[r.findings for r in report.images], files=files)
