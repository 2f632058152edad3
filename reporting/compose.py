"""One call from a study's predictions to its written documents: PDF, SR, heatmap SCs and the Encapsulated PDF.

This is what the daemon's report loop calls. It knows nothing of the database: it returns the findings per image
(for the rows) and the files it wrote (kind, path, and for DICOM objects their SOP Instance and Class UIDs).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import EncapsulatedPDFStorage

from model.types import Prediction
from reporting.dicomio import save
from reporting.errors import ReportError
from reporting.exclusions import ExclusionRules
from reporting.facts import ModelFacts
from reporting.pdf import write_pdf
from reporting.pmap import build_pm
from reporting.regions import LungFields
from reporting.report import Finding, SourceImage, StudyReport, assemble, study_report
from reporting.sc import build_encapsulated_pdf, build_sc
from reporting.sr import build_sr

__all__ = ["ComposedStudy", "EarlierObject", "WrittenFile", "compose_study", "earlier_objects"]


@dataclass(frozen=True, kw_only=True, slots=True)
class WrittenFile:
    """A document written to disk: ``kind`` "pdf" (the PDF file), "sr", "sc", "pm" (Parametric Map) or "pdf-dicom"
    (Encapsulated PDF);
    DICOM kinds carry their SOP Instance and Class UIDs (None for the plain PDF); ``unchanged``: a per-image object
    (heatmap) copied from an earlier revision because its content, hence its UID, did not change."""

    kind: str
    path: Path
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    unchanged: bool = False  # the same object (UID and bytes) as in an earlier revision: not to be sent again


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class ComposedStudy:
    """The report, its findings per image (in the order of the input images) and the files written."""

    report: StudyReport
    findings: list[tuple[Finding, ...]]
    files: list[WrittenFile]


def _save(ds: pydicom.Dataset, path: Path) -> None:
    save(ds, path)  # pydicom's bytes, encoded faster (reporting.dicomio)


def _header_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy without the pixels: the result objects copy attributes only, and highdicom deep-copies the
    evidence it is given (half the SR's build time went into copying pixel data)."""
    header = pydicom.Dataset(ds)
    header.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            del header[keyword]
    return header


@dataclass(frozen=True, kw_only=True, slots=True)
class EarlierObject:
    """A per-image DICOM object (heatmap SC or Parametric Map) written by an earlier revision of the study."""

    path: Path
    series_instance_uid: str
    instance_number: int


def earlier_objects(paths: Sequence[Path]) -> dict[str, EarlierObject]:
    """SOP Instance UID -> :class:`EarlierObject` for the DICOM files of earlier revisions (headers only); a missing or
    unreadable file is skipped (it cannot be reused; its instance number may then be given again)."""
    found: dict[str, EarlierObject] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber"])
            found.setdefault(str(ds.SOPInstanceUID), EarlierObject(
                path=Path(path), series_instance_uid=str(ds.SeriesInstanceUID), instance_number=int(ds.InstanceNumber)))
        except (OSError, AttributeError, ValueError, TypeError, pydicom.errors.InvalidDicomError):
            continue
    return found


class _Numbers:
    """Instance numbers unique within each series over all revisions: an earlier object keeps its number, a new one
    gets the next number after every number its series has used."""

    def __init__(self, earlier: Mapping[str, EarlierObject]) -> None:
        self.last: dict[str, int] = {}
        for obj in earlier.values():
            self.last[obj.series_instance_uid] = max(self.last.get(obj.series_instance_uid, 0), obj.instance_number)

    def next(self, series: str) -> int:
        self.last[series] = self.last.get(series, 0) + 1
        return self.last[series]


def _place(ds: pydicom.Dataset, kind: str, path: Path, earlier: Mapping[str, EarlierObject],
           numbers: _Numbers) -> WrittenFile:
    """Write a per-image object (kind "sc" or "pm") to ``path``: a copy of the earlier revision's file when its UID
    (from its content) was written before, else the new object with the next free InstanceNumber of its series."""
    uid = str(ds.SOPInstanceUID)
    previous = earlier.get(uid)
    if previous is not None and previous.path.exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(previous.path, tmp)
        os.replace(tmp, path)
        return WrittenFile(kind=kind, path=path, sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID),
                           unchanged=True)
    ds.InstanceNumber = numbers.next(str(ds.SeriesInstanceUID))
    _save(ds, path)
    return WrittenFile(kind=kind, path=path, sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID))


def compose_study(
    *,
    images: Sequence[tuple[pydicom.Dataset, np.ndarray, Prediction, ModelFacts]],
    revision: int,
    predecessors: Sequence[str],
    folder: Path,
    top_channels: int = 5,
    exclusion_margin: float = 2.0,
    created_at: dt.datetime | None = None,
    pdf_predecessors: Sequence[str] = (),
    earlier: Sequence[Path] = (),
    superseded: tuple[int, dt.datetime | None] | None = None,
    lung_fields: Sequence[LungFields | None] = (),
) -> ComposedStudy:
    """Assemble and write one study report revision into ``folder`` (created if needed).

    ``images``: per image of the study, oldest first: (source dataset, decoded image float [Rows, Columns] in [0, 1]
    bright = dense, its Prediction, the facts about the model that made it (reporting.facts.ModelFacts: thresholds,
    preprocessing - without it the CAM is taken to span the whole, square-padded image - and the applicability gate's
    verdict: a withheld image gets no findings and no heatmap)). The report states the last image's model.
    ``top_channels``: channel evidence rows per positive finding (>= 1); ``exclusion_margin``: how much more
    confident a mutually exclusive partner must be to exclude a finding (reporting.exclusions, >= 1).
    ``superseded``: (revision, created_at) of the report revision this one replaces (the PDF names it), if known.
    ``lung_fields``: per image (aligned with ``images``; empty or None entries: estimated here), the lung fields the
    inference worker already estimated for its input checks (reporting.regions.estimate_lung_fields of the same
    decoded image), so they are not estimated twice.

    Writes report.pdf, report-pdf.dcm (Encapsulated PDF), sr.dcm and per present or excluded finding one
    sc-<image>-<finding>.dcm (heatmap SC) and one pm-<image>-<finding>.dcm (Parametric Map, referenced by the SR).
    ``pdf_predecessors``: the Encapsulated PDFs this revision replaces (SOP Instance UIDs; listed in its
    PredecessorDocumentsSequence). ``earlier``: the per-image DICOM files (SC, PM) of the study's earlier
    revisions: an object whose UID (from its content: reporting.uids.content_uid) is among them is copied, marked
    ``unchanged``, and keeps its InstanceNumber; new ones number on after the highest used in their series.
    Raises ReportError (a ValueError) for no images, mixed studies, thresholds that do not cover the labels or
    ``top_channels`` < 1; TypeError for model facts that are not a ModelFacts (read an archived dict with
    ModelFacts.from_dict)."""
    if not images:
        raise ReportError("Invalid images - a study report needs at least one image")
    if top_channels < 1:
        raise ReportError(f"Invalid top_channels {top_channels} - must be >= 1")
    rules = ExclusionRules(margin=float(exclusion_margin))
    results = []
    fields = list(lung_fields) + [None] * (len(images) - len(lung_fields))
    for (ds, pixels, prediction, facts), known_fields in zip(images, fields, strict=False):
        if not isinstance(facts, ModelFacts):
            raise TypeError(f"Invalid model facts {type(facts).__name__} - expected reporting.facts.ModelFacts")
        if known_fields is not None and tuple(known_fields.image_shape) != tuple(np.shape(pixels)):
            known_fields = None  # estimated on another decode of the image: estimate again rather than misplace
        results.append(assemble(prediction, pixels, SourceImage.from_dataset(ds), thresholds=facts.thresholds,
                                rules=rules, top_k=int(top_channels), recipe=facts.preprocessing,
                                domain=facts.domain, lung_fields=known_fields))
    report = study_report(results, images[-1][3].model_info(), revision=revision,
                          predecessors=tuple(predecessors), created_at=created_at,
                          superseded_revision=superseded[0] if superseded else None,
                          superseded_at=superseded[1] if superseded else None)
    sources = [_header_only(ds) for ds, *_ in images]
    folder.mkdir(parents=True, exist_ok=True)
    files: list[WrittenFile] = []

    pdf_path = folder / "report.pdf"
    write_pdf(report, pdf_path)
    files.append(WrittenFile(kind="pdf", path=pdf_path))

    encapsulated = build_encapsulated_pdf(report, pdf_path.read_bytes(), sources, predecessors=pdf_predecessors)
    path = folder / "report-pdf.dcm"
    _save(encapsulated, path)
    files.append(WrittenFile(kind="pdf-dicom", path=path, sop_instance_uid=str(encapsulated.SOPInstanceUID),
                             sop_class_uid=str(EncapsulatedPDFStorage)))

    # the heatmaps as Parametric Maps first: the SR references them (reporting.pmap)
    maps = [(n, result.source.sop_instance_uid, finding.label, build_pm(report, result, finding, ds))
            for n, (result, ds) in enumerate(zip(report.images, sources, strict=True), start=1)
            for finding in result.positive]
    sr = build_sr(report, sources, heatmaps={(uid, label): pm for _, uid, label, pm in maps})
    path = folder / "sr.dcm"
    _save(sr, path)
    files.append(WrittenFile(kind="sr", path=path, sop_instance_uid=str(sr.SOPInstanceUID),
                             sop_class_uid=str(sr.SOPClassUID)))

    known = earlier_objects(earlier)
    numbers = _Numbers(known)
    for n, (result, ds) in enumerate(zip(report.images, sources, strict=True), start=1):
        for finding in result.positive:
            sc = build_sc(report, result, finding, ds)
            files.append(_place(sc, "sc", folder / f"sc-{n}-{finding.label}.dcm", known, numbers))
    for n, _, label, pm in maps:
        files.append(_place(pm, "pm", folder / f"pm-{n}-{label}.dcm", known, numbers))
    return ComposedStudy(report=report, findings=[r.findings for r in report.images], files=files)
