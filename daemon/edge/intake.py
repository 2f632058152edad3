"""What the C-STORE edge learns from a received dataset before it stores it: validated UIDs, the checks that decide
0xC000 versus storage, and the input gate (is this a frontal chest radiograph?).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID

from daemon.errors import DaemonError
from daemon.settings import Settings
from daemon.store.identity import PatientIdentity
from daemon.store.spool import validate_uid
from model.errors import ImageDecodeError
from model.preprocess import PixelLimits, check_pixel_limits

CHEST_MODALITIES = frozenset({"CR", "DX"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "XTABLE"})


class UnusableDatasetError(DaemonError, ValueError):
    """The dataset parses but cannot be an image chexd can keep (e.g. Rows is 0); maps to 0xC000."""


@dataclass(frozen=True, kw_only=True, slots=True)
class InstanceMeta:
    """Identifying, non-patient attributes of one received instance; all UIDs already validated."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    study_date: str | None
    skip_reason: str | None  # set when the input gate keeps the instance away from the model
    # who the image belongs to, in memory only (its repr shows no values); the store keeps a keyed fingerprint
    identity: PatientIdentity | None = None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip().upper() or None


def _clip(value: str | None, length: int) -> str | None:
    """Senders exceed VR lengths (e.g. ViewPosition 'POSTERO ANTERIOR ERECT'); keep what fits the column."""
    return None if value is None else value[:length]


def gate_reason(modality: str | None, body_part: str | None, view_position: str | None) -> str | None:
    """Why an instance is not a frontal chest radiograph, or None when it is (PS3.3 C.8.11.5 View Position)."""
    if modality not in CHEST_MODALITIES:
        return f"not a chest radiograph: Modality={modality or '(missing)'} - expected CR or DX"
    if body_part is not None and body_part != "CHEST":
        return f"not a chest radiograph: BodyPartExamined={body_part}"
    if view_position is not None and view_position in LATERAL_VIEWS:
        return f"not a frontal view: ViewPosition={view_position}"
    return None


def check_element_lengths(ds: Dataset) -> None:
    """Reject a dataset whose top-level element declares more bytes than the dataset holds (e.g. PixelData with
    length 0xFFFFFFF0 at the end): pydicom keeps the short value silently. Call before the values are converted.
    Raises UnusableDatasetError."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value is not None:
            if len(raw.value) < raw.length:
                raise UnusableDatasetError(
                    f"dataset truncated: element {tag} declares {raw.length:,} bytes, {len(raw.value):,} present"
                )


def pixel_limits(settings: Settings) -> PixelLimits:
    """The image size limits of ``settings`` (max_image_pixels, max_decompressed_mb)."""
    return PixelLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_decompressed_mb * 2**20)


def check_pixel_module(ds: Dataset, limits: PixelLimits | None = None) -> None:
    """Reject images no decoder could use: missing PixelData, zero Rows/Columns, NumberOfFrames below 1, a header
    over ``limits`` (rows x columns x frames x samples, decoded bytes; model.preprocess.check_pixel_limits), or
    native pixel data shorter than Rows x Columns x SamplesPerPixel x BitsAllocated/8 x frames (PS3.3 C.7.6.3).
    Raises UnusableDatasetError."""
    if "PixelData" not in ds:
        raise UnusableDatasetError("PixelData is missing")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        value = ds.get(keyword)
        if not value:
            raise UnusableDatasetError(f"{keyword} is {value!r} - an image needs a positive value")
    try:
        check_pixel_limits(ds, limits or PixelLimits())
    except ImageDecodeError as exc:
        raise UnusableDatasetError(str(exc)) from exc
    if ds.PixelData is None or len(ds.PixelData) == 0:
        raise UnusableDatasetError("PixelData is empty")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and not UID(ts).is_compressed:
        frames = int(ds.get("NumberOfFrames") or 1)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * frames
        expected = expected * int(ds.BitsAllocated) // 8 if ds.BitsAllocated >= 8 else (expected + 7) // 8
        got = len(ds.PixelData)
        if got < expected:
            raise UnusableDatasetError(f"pixel data truncated: expected {expected} bytes, got {got}")


def inspect(ds: Dataset, transfer_syntax_uid: str, limits: PixelLimits | None = None) -> InstanceMeta:
    """Validate and extract what storage needs; ``limits`` bound the image size (default: PixelLimits()).
    Raises InvalidUIDError or UnusableDatasetError (both 0xC000)."""
    modality = _text(ds, "Modality")
    body_part = _text(ds, "BodyPartExamined")
    view_position = _text(ds, "ViewPosition")
    meta = InstanceMeta(
        sop_class_uid=validate_uid(ds.get("SOPClassUID"), "SOPClassUID"),
        sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        study_instance_uid=validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_instance_uid=validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        transfer_syntax_uid=validate_uid(transfer_syntax_uid, "TransferSyntaxUID"),
        modality=_clip(modality, 16),
        body_part=_clip(body_part, 64),
        view_position=_clip(view_position, 16),
        study_date=(str(ds.get("StudyDate") or "")[:8] or None),
        skip_reason=gate_reason(modality, body_part, view_position),
        identity=PatientIdentity.from_dataset(ds),
    )
    check_pixel_module(ds, limits)
    return meta
