"""reporting.dicomio writes exactly the bytes pydicom's dcmwrite writes, for every kind of object chexd makes (SR with
and without the applicability group, Parametric Map, heatmap SC, Encapsulated PDF), for real sources with names in
other scripts, and falls back to pydicom for what it does not encode itself."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage

import reporting.dicomio as dicomio
from model.preprocess import decode_image
from model.types import Applicability
from reporting.dicomio import encode, save
from reporting.exclusions import ExclusionRules
from reporting.pmap import build_pm
from reporting.report import SourceImage, assemble, domain_check, study_report
from reporting.sc import build_encapsulated_pdf, build_sc
from reporting.sr import build_sr
from tests.reporting_helpers import THRESHOLDS, demo_model, image_result, make_prediction, phantom_case

REAL_CXR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-cxr"


def _pydicom(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _same(ds: Dataset) -> None:
    """encode() of ``ds`` equals pydicom's bytes of an identical copy, and took the fast path."""
    reference = copy.deepcopy(ds)  # both writes resolve ambiguous VRs in place: one object each
    fast = encode(ds)
    assert fast == _pydicom(reference)
    assert pydicom.dcmread(io.BytesIO(fast)).SOPInstanceUID == ds.SOPInstanceUID


def _objects(ds: Dataset, image, policy: str | None = None) -> list[Dataset]:  # type: ignore[no-untyped-def]
    prediction = make_prediction({"Effusion": 0.9, "Pneumothorax": 0.97, "Edema": 0.6})
    domain = None
    if policy:
        domain = domain_check(Applicability(score=41.2, threshold=18.7, in_domain=False, method="m"), (), policy)
    result = assemble(prediction, image, SourceImage.from_dataset(ds), thresholds=THRESHOLDS, rules=ExclusionRules(),
                      domain=domain)
    report = study_report([result], demo_model())
    objects: list[Dataset] = [build_sr(report, [ds]), build_encapsulated_pdf(report, b"%PDF-1.4\n%%EOF", [ds])]
    for finding in result.positive:
        objects += [build_pm(report, result, finding, ds), build_sc(report, result, finding, ds)]
    return objects


@pytest.mark.parametrize("policy", [None, "flag"])
def test_every_document_of_a_phantom_study_is_written_as_pydicom_writes_it(policy: str | None,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, ds, image, _ = phantom_case(findings={"Effusion": 0.9, "Pneumothorax": 0.97, "Edema": 0.6})
    monkeypatch.setattr(dicomio, "_pydicom", lambda ds: pytest.fail("fell back to pydicom"))
    objects = _objects(ds, image, policy)
    assert {o.SOPClassUID.name for o in objects} >= {"Comprehensive 3D SR Storage", "Parametric Map Storage",
                                                     "Encapsulated PDF Storage"}
    for obj in objects:
        reference = copy.deepcopy(obj)
        assert encode(obj) == _pydicom(reference), obj.SOPClassUID.name


@pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom's notes on the real files' odd values
@pytest.mark.parametrize("name", ["siim-ptx-1.2.276.0.7230010.3.1.4.8323329.6904.dcm", "Fake_MONOHR1.dcm"])
def test_documents_of_real_sources_are_written_as_pydicom_writes_them(name: str) -> None:
    ds = pydicom.dcmread(REAL_CXR / name)
    ds.PatientName = "Ωμέγα^Ζήτα=山田^太郎"  # a name UTF-8 must carry, in every copied module
    image = decode_image(ds)
    for obj in _objects(ds, image):
        _same(obj)


def test_what_it_does_not_encode_itself_is_pydicom_s_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another transfer syntax, and a nested dataset read from a file: the whole file is pydicom's."""
    _, ds, image, _ = phantom_case()
    sr = build_sr(study_report([image_result(ds, image, make_prediction({"Effusion": 0.9}))], demo_model()), [ds])
    implicit = copy.deepcopy(sr)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert encode(implicit) == _pydicom(copy.deepcopy(implicit))

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    holder = Dataset()
    holder.SOPClassUID, holder.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    holder.AnatomicRegionSequence = [item]
    holder.file_meta = FileMetaDataset()
    holder.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    holder.save_as(tmp_path / "holder.dcm", enforce_file_format=True)
    read = pydicom.dcmread(tmp_path / "holder.dcm", force=True).AnatomicRegionSequence[0]
    mixed = copy.deepcopy(sr)
    mixed.AnatomicRegionSequence = [read]
    assert read.original_encoding == (False, True)
    calls = []
    monkeypatch.setattr(dicomio, "_pydicom", lambda ds: calls.append(ds) or _pydicom(ds))
    assert encode(mixed) == _pydicom(copy.deepcopy(mixed)) and calls == [mixed]


def test_save_writes_atomically(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.PatientName = "Doe^Jane"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "x.dcm"
    save(ds, path)
    assert path.read_bytes() == _pydicom(ds) and not list(tmp_path.glob("*.tmp"))
