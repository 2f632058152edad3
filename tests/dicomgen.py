"""Synthetic but standard-shaped DICOM test data: datasets, files in any transfer syntax, studies, bad files.

Images are smooth chest-like phantoms (dark lungs, bright mediastinum and diaphragm) plus seeded noise;
attributes follow the IODs of PS3.3 A.2 (CR), A.26 (DX), A.8 (SC), A.3 (CT) and A.4 (MR) closely
enough for dciodvfy. Nothing here is patient data.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = [
    "LOSSLESS_TRANSFER_SYNTAXES",
    "LOSSY_TRANSFER_SYNTAXES",
    "TRANSFER_SYNTAXES",
    "bad_files",
    "make_dataset",
    "make_folder",
    "write_dataset",
]

_NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_PYDICOM_ENCODED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
_DCMCJPEG_FLAG = {JPEGBaseline8Bit: "+eb", JPEGExtended12Bit: "+ee", JPEGLosslessSV1: "+e1"}
_MAX_BITS_STORED = {JPEGBaseline8Bit: 8, JPEGExtended12Bit: 12}

LOSSLESS_TRANSFER_SYNTAXES: tuple[UID, ...] = (*_NATIVE, *_PYDICOM_ENCODED, JPEGLosslessSV1)
LOSSY_TRANSFER_SYNTAXES: tuple[UID, ...] = (JPEGBaseline8Bit, JPEGExtended12Bit)
TRANSFER_SYNTAXES: tuple[UID, ...] = LOSSLESS_TRANSFER_SYNTAXES + LOSSY_TRANSFER_SYNTAXES

_MODALITY = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX",
    DigitalXRayImageStorageForProcessing: "DX",
    SecondaryCaptureImageStorage: "OT",
    CTImageStorage: "CT",
    MRImageStorage: "MR",
}
_FIELD_OF_VIEW_MM = 400.0
_CHEST_CODE = ("51185008", "SCT", "Thorax")
_VIEW_CODE = {
    "PA": ("399348003", "SCT", "postero-anterior"),
    "AP": ("399067008", "SCT", "antero-posterior"),
    "LL": ("399173006", "SCT", "left lateral"),
    "RL": ("399198007", "SCT", "right lateral"),
}


def make_dataset(
    *,
    sop_class: str = DigitalXRayImageStorageForPresentation,
    modality: str | None = None,
    rows: int = 64,
    columns: int = 64,
    bits: int = 16,
    photometric: str = "MONOCHROME2",
    body_part: str = "CHEST",
    view_position: str = "PA",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    patient_id: str = "CHEXD-TEST-0001",
    patient_name: str = "Test^Chest",
    patient_birth_date: str = "19700101",
    seed: int = 0,
    pixel: np.ndarray | None = None,
) -> Dataset:
    """Return a complete single-frame grey-scale image dataset with file meta (Explicit VR Little Endian).

    bits is BitsStored (1..16; BitsAllocated is 8 up to 8 bits, else 16); pixels are unsigned. modality
    defaults to the SOP class's own (CR, DX, OT, CT, MR). pixel, if given, is used as the stored values
    (2-D integer array; its shape overrides rows/columns). MONOCHROME1 stores the inverted phantom, so it
    displays like the MONOCHROME2 twin. DX For Presentation and any image over 8 bits except DX For
    Processing get a WindowCenter/Width covering 90% of the stored range; CT gets RescaleIntercept -1024
    (HU). Missing UIDs come from generate_uid().
    """
    sop_class = UID(sop_class)
    if sop_class not in _MODALITY:
        raise ValueError(f"Unsupported sop_class {str(sop_class)!r} - expected one of {sorted(_MODALITY)}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"Invalid photometric {photometric!r} - expected MONOCHROME1 or MONOCHROME2")
    if not 1 <= bits <= 16:
        raise ValueError(f"Invalid bits {bits} - BitsStored must be in 1..16")
    max_value = 2**bits - 1
    if pixel is None:
        dense = _chest_phantom(rows, columns, seed)
        stored = np.rint(dense * 0.9 * max_value + 0.05 * max_value).astype(np.int64)
    else:
        stored = np.asarray(pixel)
        if stored.ndim != 2 or stored.dtype.kind not in "ui" or stored.min() < 0 or stored.max() > max_value:
            raise ValueError(f"Invalid pixel: need a 2-D array of integers in [0, {max_value}] for bits={bits}")
        rows, columns = stored.shape
    if photometric == "MONOCHROME1" and pixel is None:
        stored = max_value - stored
    bits_allocated = 8 if bits <= 8 else 16
    stored = stored.astype(np.uint8 if bits_allocated == 8 else np.uint16)

    sop_uid = sop_uid or generate_uid()
    modality = modality or _MODALITY[sop_class]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CHEXD_DICOMGEN"

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "chexd"
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"{modality} {body_part}"
    ds.SeriesDescription = f"{body_part} {view_position}"
    ds.ManufacturerModelName = "dicomgen"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    spacing = round(_FIELD_OF_VIEW_MM / max(rows, columns), 4)

    intercept = 0
    if sop_class in (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
    ):
        ds.ViewPosition = view_position
        ds.PatientOrientation = ["L", "F"]
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.KVP = 120
    if sop_class == ComputedRadiographyImageStorage:
        ds.RescaleType = "US"
    elif sop_class in (DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing):
        _add_dx(ds, sop_class)
    elif sop_class == SecondaryCaptureImageStorage:
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ConversionType = "WSD"
        ds.ViewPosition = view_position
        ds.PatientOrientation = ["L", "F"]
    else:
        intercept = _add_cross_sectional(ds, sop_class, spacing)

    if sop_class == DigitalXRayImageStorageForPresentation or (
        bits > 8 and sop_class != DigitalXRayImageStorageForProcessing
    ):
        center_stored = round(0.5 * max_value)
        if photometric == "MONOCHROME1" and pixel is None:
            center_stored = max_value - center_stored + 1
        ds.WindowCenter = center_stored + intercept
        ds.WindowWidth = round(0.9 * max_value)
        ds.WindowCenterWidthExplanation = "PHANTOM"
    return ds


def write_dataset(ds: Dataset, path: str | Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write a copy of `ds` to `path` as a Part 10 file in `transfer_syntax`; return the path.

    Native and deflated syntaxes are written by pydicom; RLE Lossless, JPEG-LS Lossless and JPEG 2000
    Lossless by pydicom's encoders (pylibjpeg-rle/pydicom, pyjpegls, pylibjpeg-openjpeg); JPEG Baseline
    (BitsStored 8), JPEG Extended (BitsStored <= 12) and JPEG Lossless SV1 by dcmtk's dcmcjpeg, which gives
    lossy results a new SOPInstanceUID (PS3.3 C.7.6.1.1.5). The caller's dataset is not changed.

    Raises:
        ValueError: unsupported transfer syntax, or BitsStored too large for the JPEG process.
        RuntimeError: dcmcjpeg missing or failing.
    """
    path = Path(path)
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"Unsupported transfer_syntax {transfer_syntax.name!r} - expected one of "
            f"{[uid.name for uid in TRANSFER_SYNTAXES]}"
        )
    ds = copy.deepcopy(ds)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    if transfer_syntax in _DCMCJPEG_FLAG:
        return _dcmcjpeg(ds, path, transfer_syntax)
    if transfer_syntax in _PYDICOM_ENCODED:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def make_folder(path: str | Path, n: int, *, transfer_syntax: str = ExplicitVRLittleEndian, **kw: Any) -> list[Path]:
    """Write `n` distinct instances of one study and series to `path` (created) as IM0001.dcm, ...

    kw go to :func:`make_dataset`; instance i gets seed ``seed + i`` and InstanceNumber ``i + 1``.
    """
    if "sop_uid" in kw or "instance_number" in kw:
        raise TypeError("make_folder() assigns sop_uid and instance_number itself")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kw.setdefault("study_uid", generate_uid())
    kw.setdefault("series_uid", generate_uid())
    seed = kw.pop("seed", 0)
    return [
        write_dataset(
            make_dataset(seed=seed + i, instance_number=i + 1, **kw), path / f"IM{i + 1:04d}.dcm", transfer_syntax
        )
        for i in range(n)
    ]


def bad_files(path: str | Path) -> dict[str, Path]:
    """Write undecodable inputs to `path` (created); return them by name.

    - ``truncated``: valid DX whose PixelData element holds 1000 of 8192 bytes (consistent lengths).
    - ``cut``: a valid DX file whose bytes end in the middle of PixelData.
    - ``garbage``: 4096 random bytes.
    - ``zero_rows``: valid DX with Rows 0 and empty PixelData.
    - ``rgb``: valid Secondary Capture in RGB.
    dcmtk storescu sends ``truncated``, ``zero_rows`` and ``rgb``; it refuses ``garbage`` and ``cut`` (it
    cannot parse them).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = {name: path / f"{name}.dcm" for name in ("truncated", "cut", "garbage", "zero_rows", "rgb")}

    ds = make_dataset(seed=101)
    ds.PixelData = ds.PixelData[:1000]
    write_dataset(ds, files["truncated"])

    write_dataset(make_dataset(seed=102), files["cut"])
    data = files["cut"].read_bytes()
    files["cut"].write_bytes(data[: len(data) - 4000])

    files["garbage"].write_bytes(np.random.default_rng(103).bytes(4096))

    ds = make_dataset(seed=104)
    ds.Rows = 0
    ds.PixelData = b""
    write_dataset(ds, files["zero_rows"])

    ds = make_dataset(sop_class=SecondaryCaptureImageStorage, bits=8, seed=105)
    grey = np.frombuffer(ds.PixelData, dtype=np.uint8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = np.repeat(grey, 3).tobytes()
    write_dataset(ds, files["rgb"])
    return files


def _chest_phantom(rows: int, columns: int, seed: int) -> np.ndarray:
    """Float [rows, columns] in [0, 1], bright = dense: soft tissue, two dark lungs, mediastinum, diaphragm."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0.0 : 1.0 : rows * 1j, 0.0 : 1.0 : columns * 1j]
    shift = rng.uniform(-0.03, 0.03, size=2)
    body = np.exp(-(((x - 0.5) / 0.46) ** 8))
    image = 0.15 + 0.55 * body + 0.1 * y
    for side in (-1.0, 1.0):
        lung = ((x - 0.5 - side * 0.19 - shift[0]) / 0.15) ** 2 + ((y - 0.45 - shift[1]) / 0.3) ** 2
        image -= 0.45 * body * np.exp(-(lung**3))
    image += 0.25 * np.exp(-(((x - 0.5) / 0.07) ** 2)) * (y > 0.15)
    image += 0.2 / (1.0 + np.exp(-(y - 0.82 - shift[1]) / 0.02))
    image += 0.02 * rng.standard_normal((rows, columns))
    return np.clip((image - image.min()) / (image.max() - image.min()), 0.0, 1.0)


def _add_dx(ds: Dataset, sop_class: UID) -> None:
    """DX Series, DX Image, DX Anatomy Imaged, DX Detector and Acquisition Context (PS3.3 C.8.11)."""
    for_processing = sop_class == DigitalXRayImageStorageForProcessing
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = "U"
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    ds.AnatomicRegionSequence = [_code(*_CHEST_CODE)]
    ds.ViewCodeSequence = [_code(*_VIEW_CODE[ds.ViewPosition])] if ds.ViewPosition in _VIEW_CODE else []


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _add_cross_sectional(ds: Dataset, sop_class: UID, spacing: float) -> int:
    """Frame of Reference, Image Plane and CT or MR Image attributes; return the RescaleIntercept used."""
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.PixelSpacing = [spacing, spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-_FIELD_OF_VIEW_MM / 2, -_FIELD_OF_VIEW_MM / 2, 0]
    ds.SliceThickness = 5
    ds.AcquisitionNumber = 1
    if sop_class == CTImageStorage:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        return -1024
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = ["SE"]
    ds.SequenceVariant = ["NONE"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 500
    ds.EchoTime = 15
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = 1.5
    return 0


def _dcmcjpeg(ds: Dataset, path: Path, transfer_syntax: UID) -> Path:
    limit = _MAX_BITS_STORED.get(transfer_syntax)
    if limit is not None and ds.BitsStored > limit:
        raise ValueError(f"BitsStored {ds.BitsStored} is too large for {transfer_syntax.name} - at most {limit}")
    executable = shutil.which("dcmcjpeg")
    if executable is None:
        raise RuntimeError(f"dcmcjpeg (dcmtk) is needed to write {transfer_syntax.name} - install dcmtk")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.dcm"
        ds.save_as(source, enforce_file_format=True)
        result = subprocess.run(
            [executable, _DCMCJPEG_FLAG[transfer_syntax], str(source), str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"dcmcjpeg {_DCMCJPEG_FLAG[transfer_syntax]} failed ({result.returncode}): {result.stderr.strip()}"
        )
    if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID != transfer_syntax:
        raise RuntimeError(f"dcmcjpeg did not write {transfer_syntax.name} to {path}")
    return path
