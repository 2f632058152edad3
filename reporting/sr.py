"""The study report as a DICOM Comprehensive 3D SR, TID 1500 Measurement Report, built with highdicom.

Document (PS3.3 A.35.13, PS3.16 TID 1500): filed into the source images' study (Patient and General Study modules
copied from the first source image), one SR series per study (reporting.uids), VerificationFlag UNVERIFIED,
CompletionFlag COMPLETE, PreliminaryFlag PRELIMINARY; a revision lists the SR documents it supersedes in
PredecessorDocumentsSequence. The observer is a device (chexd and the model); procedure reported: Plain chest X-ray
(SCT 399208008).

One measurement group per finding and image:

- present or excluded findings: TID 1410 Planar ROI group whose region is an SCOORD closed POLYLINE, the box of the
  main heat region (:func:`heat_box`: the bounding box of the connected region of heat >= half its peak that holds
  the peak, PS3.3 C.18.6.1.1 pixel coordinates) referencing the source image, and — when the caller gives it — an
  IMAGE item DCM 121200 "Illustration of ROI" referencing the finding's heatmap Parametric Map (reporting.pmap; the
  PMs are also listed in the evidence); absent findings: TID 1501 group whose measurement references the source image;
- finding type: the finding's code (reporting.codes, where the table and the sources are): SNOMED CT where a code is
  established (Hernia: SCT 84089009 "Hiatal hernia"), DCM 112121 "Infiltrate" for Infiltration, and a private scheme
  ``99CHEXD`` for Pleural_Thickening only (no SNOMED CT id verified); tracking identifier "<finding> image <n>" with a
  deterministic UID;
- qualitative evaluation: the finding code = SCT 52101004 "Present" or SCT 272519000 "Absent". An **excluded**
  finding (above its threshold, but mutually exclusive with a much more confident one) is reported **Absent**, with a
  DCM 121106 "Comment" TEXT item "Excluded: <reason>" — the probability stays in the measurement;
- measurement: DCM 122157 "Probability", unit UCUM "1" (no units), value in [0, 1];
- algorithm identification (TID 4019): the model name, version = the model version hash (it covers the weights, the
  thresholds and the preprocessing), parameter: the decision threshold;
- present and excluded findings: a "Comment" TEXT item with the zone holding most of the heat.

Equipment (every object chexd writes, :func:`set_equipment`): Manufacturer "chexd", Manufacturer's Model Name = the
model name, Software Versions = "chexd <version>" and "model <model version>", Device Serial Number = the model
version id. Patient's Age is copied when the source's value is valid AS; an invalid one (seen: "62") is left out
(dcentvfy then warns that it is present in the source only — repairing it to "062Y" would be an error instead).

The applicability gate (reporting.report.DomainCheck), when it ran, adds one TID 1501 group per image before its
findings, tracking identifier "Applicability image <n>": finding type and qualitative evaluation concept
``99CHEXD APPLICABILITY`` "Applicability of the AI model to the image" with value ``99CHEXD OUT-OF-DOMAIN`` "Outside
the model's validated domain" (withheld or flagged), ``99CHEXD IN-DOMAIN`` or SCT 373121007 "Not Evaluated" (the
model has no applicability model). No DCM or SCT code says "outside an algorithm's validated domain", so these are
in the private scheme (declared in CodingSchemeIdentificationSequence). Input-quality issues add DCM 111029 "Image
Quality Rating" = DCM 111235 "Unusable - Quality renders image unusable" (withheld) or DCM 111236 "Usable - Does not
meet the quality control standard" (flagged). The score is a measurement ``99CHEXD APPL-SCORE`` (unit "1",
referencing the image; left out when infinite), the threshold and method are parameters of its algorithm
identification, and a "Comment" TEXT item says it in words: "outside the model's validated domain — no AI findings for
this image: applicability score ... above the threshold ...; input quality: ...". A **withheld** image has that group
and no finding groups at all.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, Comprehensive3DSRStorage
from scipy import ndimage

from reporting.codes import FINDING_CODES, PRIVATE_SCHEME
from reporting.equipment import MANUFACTURER, set_equipment, source_header
from reporting.errors import ReportError
from reporting.report import DOMAIN_HEADLINE, FLAG_HEADLINE, DomainCheck, Finding, ImageResult, StudyReport
from reporting.uids import derived_uid, instance_uid, series_uid

__all__ = ["APPLICABILITY", "FINDING_CODES", "IN_DOMAIN", "OUT_OF_DOMAIN", "PRIVATE_SCHEME", "SR_SERIES_NUMBER",
           "build_sr", "heat_box"]

SR_SERIES_NUMBER = 9001

PROBABILITY = Code("122157", "DCM", "Probability")
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
ILLUSTRATION_OF_ROI = Code("121200", "DCM", "Illustration of ROI")
APPLICABILITY = Code("APPLICABILITY", PRIVATE_SCHEME, "Applicability of the AI model to the image")
OUT_OF_DOMAIN = Code("OUT-OF-DOMAIN", PRIVATE_SCHEME, "Outside the model's validated domain")
IN_DOMAIN = Code("IN-DOMAIN", PRIVATE_SCHEME, "Within the model's validated domain")
NOT_EVALUATED = Code("373121007", "SCT", "Not Evaluated")
APPLICABILITY_SCORE = Code("APPL-SCORE", PRIVATE_SCHEME, "Applicability score")
IMAGE_QUALITY_RATING = Code("111029", "DCM", "Image Quality Rating")
QUALITY_UNUSABLE = Code("111235", "DCM", "Unusable - Quality renders image unusable")
QUALITY_BELOW_STANDARD = Code("111236", "DCM", "Usable - Does not meet the quality control standard")

# highdicom converts every pydicom Code it is given into a CodedConcept (validated, hashed): convert ours once.
_CONCEPTS = {label: hd.sr.CodedConcept.from_code(code) for label, code in FINDING_CODES.items()}
_PROBABILITY = hd.sr.CodedConcept.from_code(PROBABILITY)
_PRESENT, _ABSENT = hd.sr.CodedConcept.from_code(PRESENT), hd.sr.CodedConcept.from_code(ABSENT)
_NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
_COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
_ILLUSTRATION = hd.sr.CodedConcept.from_code(ILLUSTRATION_OF_ROI)


def _code(label: str) -> hd.sr.CodedConcept:
    try:
        return _CONCEPTS[label]
    except KeyError:
        raise ReportError(f"No code for finding {label!r} - known: {sorted(FINDING_CODES)}") from None


def _algorithm(report: StudyReport, finding: Finding) -> hd.sr.AlgorithmIdentification:
    m = report.model
    return _algorithm_item(m.name[:64], m.version, f"decision threshold {finding.threshold:.4f}")


@functools.lru_cache(maxsize=256)
def _algorithm_item(name: str, version: str, parameter: str) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for one model and decision threshold; one object shared by every group and document that states it
    (the items are only read and written, never changed: building them was a sixth of the SR's group time)."""
    return hd.sr.AlgorithmIdentification(name=name, version=version, parameters=[parameter])


_BOX_SIDE = 128  # grid (longer side, px) on which the heat box is found: the CAM has 7 or 8 cells a side
_BOX_LEVEL = 0.5  # share of the peak heat that bounds the box


def heat_box(result: ImageResult, finding: Finding) -> tuple[float, float, float, float] | None:
    """The main heat region of a present or excluded finding as a box in source-image pixel coordinates
    (x0, y0, x1, y1) = (left, top, right, bottom) edges, PS3.3 C.18.6.1.1 (0, 0 = the top left corner of the top
    left pixel): the bounding box of the connected region (8-neighbours) of heat >= half the peak heat that holds
    the peak, found on a grid of at most 128 px on the longer side. None for a finding without heat."""
    rows, columns = result.source.rows, result.source.columns
    factor = max(1, -(-max(rows, columns) // _BOX_SIDE))
    shape = (-(-rows // factor), -(-columns // factor))
    heat = result.heatmap(finding.label, shape)
    peak = float(heat.max()) if heat.size else 0.0
    if not peak > 0:
        return None
    labels, _ = ndimage.label(heat >= _BOX_LEVEL * peak, structure=np.ones((3, 3), dtype=bool))
    top = np.unravel_index(int(np.argmax(heat)), heat.shape)
    r, c = np.nonzero(labels == labels[top])
    sy, sx = rows / shape[0], columns / shape[1]
    return (round(c.min() * sx, 2), round(r.min() * sy, 2), round((c.max() + 1) * sx, 2),
            round((r.max() + 1) * sy, 2))


def _comment(finding: Finding) -> str | None:
    """What the coded items do not say: the zone (or outside the lung fields) with most of the heat, as the PDF and
    the SC label say it (Finding.region; present and excluded findings)."""
    if not finding.positive or not finding.region:
        return None
    return f"Main region of the heatmap: {finding.region}"


def _group(report: StudyReport, result: ImageResult, n: int, finding: Finding, ds: Dataset,  # type: ignore[no-untyped-def]
           heatmap: Dataset | None = None, refs: _ImageRefs | None = None):
    code = _code(finding.label)
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid("tracking", finding.label, result.source.sop_instance_uid, result.model_version),
        identifier=f"{finding.label} image {n}",
    )
    algorithm = _algorithm(report, finding)
    evaluation = hd.sr.QualitativeEvaluation(name=code, value=_PRESENT if finding.status == "present" else _ABSENT)
    probability = round(finding.probability, 6)
    box = heat_box(result, finding) if finding.positive else None
    if box is not None:
        x0, y0, x1, y1 = box
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: the first point repeated last
            graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]),
            source_image=refs.region if refs else hd.sr.SourceImageForRegion.from_source_image(ds),
        )
        measurement = hd.sr.Measurement(name=_PROBABILITY, value=probability, unit=_NO_UNITS)
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_region=region, finding_type=code, algorithm_id=algorithm,
            measurements=[measurement], qualitative_evaluations=[evaluation],
        )
    else:
        measurement = hd.sr.Measurement(
            name=_PROBABILITY, value=probability, unit=_NO_UNITS,
            referenced_images=[refs.measurement if refs else hd.sr.SourceImageForMeasurement.from_source_image(ds)],
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=code, algorithm_id=algorithm, measurements=[measurement],
            qualitative_evaluations=[evaluation],
        )
    items = group[0].ContentSequence
    if heatmap is not None and box is not None:
        items.append(hd.sr.ImageContentItem(
            name=_ILLUSTRATION, referenced_sop_class_uid=heatmap.SOPClassUID,
            referenced_sop_instance_uid=heatmap.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ))
    comment = _comment(finding)
    if comment:
        items.append(hd.sr.TextContentItem(name=_COMMENT, value=comment[:1024],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    if finding.status == "excluded" and finding.reason:
        items.append(hd.sr.TextContentItem(name=_COMMENT, value=f"Excluded: {finding.reason}"[:1024],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _domain_text(domain: DomainCheck) -> str:
    if domain.status in ("withheld", "flagged"):
        reasons = [r for r in (domain.score_text() if domain.out_of_domain else "",) if r]
        reasons += [f"input quality: {issue.reason}" for issue in domain.quality]
        headline = DOMAIN_HEADLINE if domain.withheld else FLAG_HEADLINE
        return f"{headline}: {'; '.join(reasons)}"
    if domain.status == "in_domain":
        return f"within the model's validated domain: {domain.score_text()}"
    return "not checked: the model carries no applicability model"


def _domain_group(report: StudyReport, result: ImageResult, n: int, ds: Dataset):  # type: ignore[no-untyped-def]
    """The applicability gate's verdict on one image as a TID 1501 group (see the module docstring)."""
    domain = result.domain
    assert domain is not None
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid("tracking", "applicability", result.source.sop_instance_uid, result.model_version),
        identifier=f"Applicability image {n}",
    )
    parameters = []
    if domain.threshold is not None:
        parameters.append(f"applicability threshold {domain.threshold:.6g}")
    if domain.method:
        parameters.append(f"method {domain.method}"[:64])
    algorithm = hd.sr.AlgorithmIdentification(name=report.model.name[:64], version=report.model.version,
                                              parameters=parameters or None)
    value = {"withheld": OUT_OF_DOMAIN, "flagged": OUT_OF_DOMAIN, "in_domain": IN_DOMAIN}.get(domain.status,
                                                                                              NOT_EVALUATED)
    evaluations = [hd.sr.QualitativeEvaluation(name=APPLICABILITY, value=value)]
    if domain.quality:
        rating = QUALITY_UNUSABLE if domain.withheld else QUALITY_BELOW_STANDARD
        evaluations.append(hd.sr.QualitativeEvaluation(name=IMAGE_QUALITY_RATING, value=rating))
    measurements = None
    if domain.score is not None and np.isfinite(domain.score):
        measurements = [hd.sr.Measurement(
            name=APPLICABILITY_SCORE, value=round(float(domain.score), 6), unit=_NO_UNITS,
            referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(ds)],
        )]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=APPLICABILITY, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=_COMMENT, value=_domain_text(domain)[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


@dataclass(frozen=True, slots=True)
class _ImageRefs:
    """An image's reference items, built once and shared by all its groups (they are only read and written)."""

    measurement: hd.sr.SourceImageForMeasurement
    region: hd.sr.SourceImageForRegion


def _image_groups(report: StudyReport, result: ImageResult, n: int, ds: Dataset,  # type: ignore[type-arg]
                  heatmaps: Mapping[tuple[str, str], Dataset]) -> list:
    groups = [] if result.domain is None else [_domain_group(report, result, n, ds)]
    uid = result.source.sop_instance_uid
    refs = _ImageRefs(measurement=hd.sr.SourceImageForMeasurement.from_source_image(ds),
                      region=hd.sr.SourceImageForRegion.from_source_image(ds))
    return groups + [_group(report, result, n, finding, ds, heatmaps.get((uid, finding.label)), refs)
                     for finding in result.findings]


def _without_measurements(root: Dataset) -> Dataset:
    """A shallow copy of a TID 1500 root container without its "Imaging Measurements" container (DCM 126010), the
    subtree that holds the measurement groups; the other items are shared, not copied."""
    out = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            out.add(elem)
    out.ContentSequence = [
        item for item in root.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue != IMAGING_MEASUREMENTS.value
    ]
    return out


def _predecessor(report: StudyReport, uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = report.study_instance_uid
    ds.SeriesInstanceUID = series_uid("sr", report.study_instance_uid)
    return ds


def sr_instance_uid(report: StudyReport) -> UID:
    """The SR's SOP Instance UID (deterministic: sources, model version, revision)."""
    return instance_uid("sr", [r.source.sop_instance_uid for r in report.images], report.model.version,
                        report.revision)


def build_sr(
    report: StudyReport, sources: Sequence[pydicom.Dataset], *, fast: bool = True,
    heatmaps: Mapping[tuple[str, str], Dataset] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The report as a Comprehensive 3D SR (see the module docstring); write it with ``sr.save_as(path)``.

    ``fast`` (default) attaches the measurement groups after highdicom built the document around the rest of the
    content tree (same dataset, a third of the time); ``fast=False`` hands highdicom the whole tree. With ``fast``
    the returned object's ``content`` property lacks the groups: read the dataset (``ContentSequence``) instead.

    ``sources``: the source image datasets, one per ``report.images`` in the same order (pixel data not needed).
    ``heatmaps``: (source SOP Instance UID, finding label) -> the finding's Parametric Map (reporting.pmap; header
    suffices): its group references it as "Illustration of ROI" and it joins the SR's evidence.
    Raises ReportError when sources and images do not match (count or SOP Instance UID)."""
    heatmaps = dict(heatmaps or {})
    if len(sources) != len(report.images):
        raise ReportError(f"Invalid sources - {len(sources)} datasets for {len(report.images)} report images")
    evidence = []
    for result, ds in zip(report.images, sources, strict=True):
        if str(ds.SOPInstanceUID) != result.source.sop_instance_uid:
            raise ReportError(f"Invalid sources - dataset {ds.SOPInstanceUID} is not report image "
                             f"{result.source.sop_instance_uid} (same order required)")
        evidence.append(source_header(ds))
    groups = [
        group
        for n, (result, ds) in enumerate(zip(report.images, evidence, strict=True), start=1)
        for group in _image_groups(report, result, n, ds, heatmaps)
    ]
    for pm in heatmaps.values():
        item = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(item, keyword, pm[keyword].value)
        evidence.append(item)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", MANUFACTURER, report.model.name), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=report.model.name[:64],
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    root = content[0]
    if fast:
        # highdicom's document constructor deep-copies the content tree and searches it for image references: about
        # two thirds of the SR's build time for a tree we have just built. Give it the root container without the
        # measurement groups, then attach the full tree. The evidence (every source image, all that the groups
        # reference) and so CurrentRequestedProcedureEvidenceSequence are the same; the test
        # test_fast_sr_equals_highdicom_full_build proves the written files identical.
        full = root.ContentSequence
        root = _without_measurements(root)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_uid("sr", report.study_instance_uid),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_instance_uid(report),
        instance_number=report.revision,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=report.source.institution_name or None,
        previous_versions=[_predecessor(report, uid) for uid in report.predecessors] or None,
        series_description="chexd AI findings (unverified)",
        # UTF-8 holds every copied name; highdicom would copy the source's, and refuses a legal one that starts
        # with an empty value (["", "ISO 2022 IR 87"], Japanese) - the report then failed
        specific_character_set="ISO_IR 192",
    )
    if fast:
        sr.ContentSequence = full
    set_equipment(sr, report)
    created = report.created_at
    sr.ContentDate = created.strftime("%Y%m%d")
    sr.ContentTime = created.strftime("%H%M%S")
    sr.InstanceCreationDate, sr.InstanceCreationTime = sr.ContentDate, sr.ContentTime
    sr.TimezoneOffsetFromUTC = "+0000"
    if any(c.scheme_designator == PRIVATE_SCHEME for c in FINDING_CODES.values()):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = PRIVATE_SCHEME
        scheme.CodingSchemeName = "chexd local codes for ChestX-ray14 findings"
        scheme.CodingSchemeResponsibleOrganization = "chexd"
        sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
