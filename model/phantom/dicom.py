"""``to_dicom``: a phantom sample as a DICOM CR or DX image (stored bits, photometric interpretation and spacing as
drawn; ImageComments says it is a synthetic phantom).
"""

from __future__ import annotations

import datetime as _dt

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from model.phantom.values import MANUFACTURER, PHANTOM_COMMENT, PhantomSample

# ---------------------------------------------------------------------------------------------------- DICOM


def to_dicom(
    sample: PhantomSample,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "DX",
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Return ``sample`` as a DX (Digital X-Ray For Presentation, PS3.3 A.26) or CR (PS3.3 A.2) image dataset.

    Explicit VR Little Endian with file meta; UIDs not given are derived deterministically from the sample's
    seed and index. ``model.preprocess.decode_image`` of the result equals ``sample.image`` (float32 rounding).

    Raises:
        ValueError: modality other than "DX" or "CR".
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"Invalid modality {modality!r} - expected 'DX' or 'CR'")
    key = [f"chexd-phantom:{sample.seed}:{sample.index}"]
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    study_uid = study_uid or generate_uid(entropy_srcs=[*key, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[*key, "series", modality])
    sop_uid = sop_uid or generate_uid(entropy_srcs=[*key, "instance", modality])
    ds = pydicom.Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    _identify(ds, sample, modality, sop_class, (study_uid, series_uid, sop_uid), instance_number)
    _image(ds, sample)
    if modality == "DX":
        _dx(ds, sample)
    ds.PixelData = sample.stored.astype("<u2").tobytes()
    return ds


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    """PS3.10 file meta: Explicit VR Little Endian, pydicom's implementation UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CHEXD_PHANTOM"
    return meta


def _identify(
    ds: pydicom.Dataset,
    sample: PhantomSample,
    modality: str,
    sop_class: str,
    uids: tuple[str, str, str],
    instance_number: int,
) -> None:
    """Patient, study, series, equipment and SOP common attributes; ``uids``: (study, series, instance)."""
    study_uid, series_uid, sop_uid = uids
    date = sample.study_date.strftime("%Y%m%d")
    minutes = 8 * 60 + (sample.index * 7) % 600
    time = f"{minutes // 60:02d}{minutes % 60:02d}00"
    birth = sample.study_date.replace(year=sample.study_date.year - sample.age, month=1, day=1) \
        if sample.study_date.year - sample.age > 1 else _dt.date(1900, 1, 1)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] + ([""] if modality == "DX" else [])
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AccessionNumber = f"PH{sample.seed % 10000:04d}{sample.index:08d}"[:16]
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "chexd synthetic chest phantom"
    ds.InstitutionName = "chexd synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"{modality} CHEST {sample.view}"
    ds.SeriesDescription = f"CHEST {sample.view}"
    ds.PatientName = f"PHANTOM^{sample.patient_id}"
    ds.PatientID = sample.patient_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sample.sex
    ds.PatientAge = f"{sample.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{sample.follow_up + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number


def _image(ds: pydicom.Dataset, sample: PhantomSample) -> None:
    """Image plane, pixel and VOI LUT attributes (no pixel data)."""
    spacing = f"{sample.pixel_spacing_mm:.4f}"
    ds.PatientOrientation = ["L", "F"]
    ds.ViewPosition = sample.view
    ds.ImageComments = PHANTOM_COMMENT
    ds.BurnedInAnnotation = "NO"
    ds.KVP = 120 if sample.view == "PA" else 90
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = sample.photometric
    ds.Rows = ds.Columns = sample.size
    ds.BitsAllocated = 16
    ds.BitsStored = sample.bits_stored
    ds.HighBit = sample.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = f"{sample.window_center:g}"
    ds.WindowWidth = f"{sample.window_width:g}"
    ds.WindowCenterWidthExplanation = "PHANTOM"
    ds.LossyImageCompression = "00"


def _dx(ds: pydicom.Dataset, sample: PhantomSample) -> None:
    """The DX image module's presentation and acquisition attributes (PS3.3 C.8.11)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    # PS3.3 C.8.11.3.1.2: -1 = higher values are less beam intensity (denser), as in our MONOCHROME2 data
    ds.PixelIntensityRelationshipSign = -1 if sample.photometric == "MONOCHROME2" else 1
    ds.PresentationLUTShape = "INVERSE" if sample.photometric == "MONOCHROME1" else "IDENTITY"
    ds.ImageLaterality = "U"
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
    view = ("399348003", "SCT", "postero-anterior") if sample.view == "PA" else \
        ("399067008", "SCT", "antero-posterior")
    ds.ViewCodeSequence = [_code(*view)]


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
