"""Heatmaps as DICOM Parametric Map objects (PS3.3 A.75, highdicom ``ParametricMap``), the IHE AI Results form of
"where the model looked": one per present or excluded finding and image — the same set the heatmap SC covers.

What a Parametric Map holds:

- **Values**: the finding's heat = ReLU of its class activation map (CAM) **in logit units**, resampled onto the
  PM's pixel grid (reporting.report.ImageResult.heatmap). Stored as unsigned 16-bit integers; the Real World Value
  Mapping (LUT label "HEAT", unit UCUM "1") maps them back: heat = stored * slope, slope = max heat / 65535 (0 .. the
  map's maximum). Not normalised: two maps of one image compare on one scale. The VOI window spans 0 .. max.
- **Grid**: the source image's pixel matrix, divided by an integer factor so the longer side is at most
  :data:`MAX_SIDE` px (the CAM itself is 7x7 or 8x8 cells: finer would only cost bytes). It covers exactly the source
  image's extent; Pixel Spacing = source spacing (Pixel Spacing, else Imager Pixel Spacing, else 1 mm) times the
  factor per axis. Spatial Locations Preserved (Derivation Image Sequence) is YES when the matrix is the source's,
  NO when it is reduced.
- **Geometry**: the PM IOD requires a Frame of Reference and Plane Position/Orientation (Patient); a projection
  radiograph (CR, DX) has neither. The PM then gets a Frame of Reference of its own, derived from the source SOP
  Instance UID (the same for every map of that image, so maps of one image share it), the detector plane at the
  origin (Image Position (Patient) 0\\0\\0) and an orientation read from the source's Patient Orientation (rows
  toward the first letter, columns toward the second; default L, F). A source that has a Frame of Reference and
  Image Position/Orientation (Patient) lends them instead. Viewers place the map on its source by the reference in
  the Derivation Image Sequence (Source Image for Image Processing Operation) and the identical extent.
- **Identity**: SOP Instance UID from the content (reporting.uids.content_uid: "pm:<finding>", source, model version,
  the heat values, which fix both the stored pixels and the slope), so an unchanged map keeps its UID across
  revisions; one PM series per study (reporting.uids.series_uid "pm", Series Number :data:`PM_SERIES_NUMBER`);
  equipment as every chexd object (reporting.equipment.set_equipment); patient and study copied from the source.
"""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from reporting.equipment import set_equipment, software_versions, source_header
from reporting.errors import ReportError
from reporting.report import Finding, ImageResult, StudyReport
from reporting.uids import content_uid, derived_uid, series_uid

__all__ = ["MAX_SIDE", "PM_SERIES_NUMBER", "build_pm", "pm_grid"]

PM_SERIES_NUMBER = 9004
MAX_SIDE = 256
_TOP = 65535
# patient coordinate axes (PS3.3 C.7.6.2.1.1): x to the patient's left, y posterior, z head
_AXES = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def pm_grid(rows: int, columns: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The PM's matrix (rows, columns) for a source of ``rows`` x ``columns``: divided by the smallest integer factor
    that brings the longer side to at most ``max_side``. Raises ReportError for sizes < 1."""
    if rows < 1 or columns < 1 or max_side < 1:
        raise ReportError(f"Invalid size {rows}x{columns} (max_side {max_side}) - all must be >= 1")
    factor = max(1, math.ceil(max(rows, columns) / max_side))
    return math.ceil(rows / factor), math.ceil(columns / factor)


def _spacing(ds: Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return row, col
    return 1.0, 1.0


def _orientation(ds: Dataset) -> list[float]:
    value = ds.get("PatientOrientation")
    letters = ("L", "F")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        first, second = str(value[0])[:1].upper(), str(value[1])[:1].upper()
        if first in _AXES and second in _AXES and np.dot(_AXES[first], _AXES[second]) == 0:
            letters = (first, second)
    return [*_AXES[letters[0]], *_AXES[letters[1]]]


def _geometry(source: Dataset) -> Dataset:
    """A header copy of ``source`` carrying the geometry highdicom needs for a PM (see the module docstring)."""
    geo = source_header(source)
    own = not (
        "FrameOfReferenceUID" in source
        and "ImagePositionPatient" in source
        and "ImageOrientationPatient" in source
        and "PixelSpacing" in source
    )
    if own:
        for keyword in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness"):
            if keyword in geo:
                del geo[keyword]
        geo.FrameOfReferenceUID = derived_uid("frame-of-reference", str(source.SOPInstanceUID))
        geo.PositionReferenceIndicator = ""
        geo.ImagePositionPatient = [0.0, 0.0, 0.0]
        geo.ImageOrientationPatient = _orientation(source)
        geo.PixelSpacing = list(_spacing(source))
        geo.SliceThickness = 1.0  # highdicom reads the source's pixel measures; the PM itself states none
    return geo


def build_pm(
    report: StudyReport,
    result: ImageResult,
    finding: Finding,
    source: pydicom.Dataset,
    *,
    number: int = 1,
    max_side: int = MAX_SIDE,
) -> hd.pm.ParametricMap:
    """The Parametric Map of one present or excluded ``finding`` of ``result`` (see the module docstring).

    ``source``: the source image dataset (header suffices); ``number``: its Instance Number. Raises ReportError for
    an absent finding or a source that is not the result's image."""
    if not finding.positive:
        raise ReportError(f"No Parametric Map for absent finding {finding.label!r}")
    if str(source.SOPInstanceUID) != result.source.sop_instance_uid:
        raise ReportError(f"Invalid source {source.SOPInstanceUID} - the result is for "
                          f"{result.source.sop_instance_uid}")
    rows, columns = int(source.Rows), int(source.Columns)
    shape = pm_grid(rows, columns, max_side)
    heat = result.heatmap(finding.label, shape)
    peak = float(heat.max()) if heat.size else 0.0
    slope = peak / _TOP if peak > 0 else 1.0
    stored = np.clip(np.rint(heat / slope), 0, _TOP).astype(np.uint16)
    geo = _geometry(source)
    row_spacing, col_spacing = (float(v) for v in geo.PixelSpacing)
    spacing = (round(row_spacing * rows / shape[0], 6), round(col_spacing * columns / shape[1], 6))
    # the first PM pixel's centre: the source's first pixel centre moved by half the difference of the spacings
    along_row, along_column = (
        np.array(geo.ImageOrientationPatient[:3], float),
        np.array(geo.ImageOrientationPatient[3:], float),
    )
    origin = (
        np.array(geo.ImagePositionPatient, float)
        + along_row * (spacing[1] - col_spacing) / 2
        + along_column * (spacing[0] - row_spacing) / 2
    )
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="HEAT",
        lut_explanation=f"{finding.label} heat: ReLU of the class activation map, logit units"[:64],
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(0, _TOP),
        slope=slope,
        intercept=0.0,
    )
    m = report.model
    pm = hd.pm.ParametricMap(
        source_images=[geo],
        pixel_array=stored,
        series_instance_uid=series_uid("pm", report.study_instance_uid),
        series_number=PM_SERIES_NUMBER,
        # from the heat itself (it fixes the stored pixels and the slope): a map scaled by 0.5 has the same stored
        # pixels but another slope, so another UID
        sop_instance_uid=content_uid(f"pm:{finding.label}", result.source.sop_instance_uid, result.model_version, heat),
        instance_number=number,
        manufacturer="chexd",
        manufacturer_model_name=m.name[:64],
        software_versions=software_versions(report)[0],  # all of them: set_equipment
        device_serial_number=m.version,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=_TOP / 2, window_width=_TOP)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description=f"AI heatmap of {finding.label} (not for diagnosis)"[:64],
        content_label="HEATMAP",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=None),
        plane_orientation=hd.PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, [float(v) for v in geo.ImageOrientationPatient]
        ),
        plane_positions=[
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [round(float(v), 6) for v in origin])
        ],
        derived_pixel_contrast="NONE",
        # UTF-8 like the SR and SC: highdicom would copy the source's SpecificCharacterSet, which may be empty,
        # multi-valued or unknown to it (a hostile or old sender) and then refuses the whole report
        specific_character_set="ISO_IR 192",
    )
    pm.SeriesDescription = "chexd AI heatmaps, Parametric Map (not for diagnosis)"
    pm.copy_patient_and_study_information(geo)
    pm.BodyPartExamined = str(geo.get("BodyPartExamined") or "CHEST")
    pm.ImageComments = f"AI heatmap of {finding.label} ({finding.status}); not for diagnosis"[:10240]
    set_equipment(pm, report)
    if shape != (rows, columns):
        for item in pm.PerFrameFunctionalGroupsSequence:
            for derivation in item.get("DerivationImageSequence", []):
                for ref in derivation.get("SourceImageSequence", []):
                    ref.SpatialLocationsPreserved = "NO"
    created = report.created_at
    pm.ContentDate = pm.InstanceCreationDate = created.strftime("%Y%m%d")
    pm.ContentTime = pm.InstanceCreationTime = created.strftime("%H%M%S")
    pm.TimezoneOffsetFromUTC = "+0000"
    return pm
