"""What every DICOM object chexd writes shares: the General Equipment module (Manufacturer "chexd", the model as
model name, software versions, the model version id as device serial number) and the source image's header, cleaned
so the copied Patient and Study modules are valid."""

from __future__ import annotations

import functools
import importlib.metadata
from copy import deepcopy

from pydicom import Dataset

from reporting.report import StudyReport

__all__ = ["MANUFACTURER", "set_equipment", "software_versions", "source_header"]

MANUFACTURER = "chexd"

# Patient/study attributes whose source value may violate its VR (seen in the wild: AS "62"); such values are
# left out rather than copied.
_AGE_LENGTH = 4


def source_header(ds: Dataset) -> Dataset:
    """A header-only copy of a source dataset with the Type 2 patient/study attributes present (possibly empty) and
    an invalid Patient's Age removed, so the copied Patient and Study modules of every object chexd writes (SR, SC,
    Parametric Map) are valid."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or 0x6000 <= elem.tag.group <= 0x60FF:  # pixels and overlays
            continue
        out.add(deepcopy(elem))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in out:
            setattr(out, keyword, "")
    age = str(out.get("PatientAge", ""))
    # an invalid age is left out, not repaired: "62" -> "062Y" would differ from the source (dcentvfy: an error)
    if "PatientAge" in out and (len(age) != _AGE_LENGTH or not age[:3].isdigit() or age[3] not in "DWMY"):
        del out.PatientAge
    return out


@functools.cache
def _package_version() -> str:
    try:
        return importlib.metadata.version("chexd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def software_versions(report: StudyReport) -> list[str]:
    """Software Versions of every object chexd writes: ["chexd <package version>", "model <model version>"]."""
    return [f"chexd {_package_version()}"[:64], f"model {report.model.version}"[:64]]


def set_equipment(ds: Dataset, report: StudyReport) -> None:
    """The General Equipment module of every object chexd writes (SR, SC, Parametric Map, Encapsulated PDF):
    Manufacturer "chexd", Manufacturer's Model Name = the model's name, Software Versions (:func:`software_versions`)
    and Device Serial Number = the model version id (it identifies the weights, thresholds and preprocessing that
    made the object; chexd keeps no per-install id)."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = report.model.name[:64]
    ds.SoftwareVersions = software_versions(report)
    ds.DeviceSerialNumber = report.model.version[:64]
