"""daemon.edge.intake: the input gate (frontal chest radiographs only) and pixel-module checks that decide 0xC000."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from daemon.edge.intake import UnusableDatasetError, check_pixel_module, gate_reason, inspect
from daemon.store.spool import InvalidUIDError

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def small_image(
    *, rows: int = 8, columns: int = 8, bits: int = 16, transfer_syntax: str = ExplicitVRLittleEndian
) -> Dataset:
    """An 8x8 DX chest PA image, native 16-bit, with file meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9999.7.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.9999.7"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.9999.7.1"
    ds.StudyDate = "20240131"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(rows * columns * bits // 8)
    return ds


def test_dx_chest_pa_passes_the_gate() -> None:
    assert gate_reason("DX", "CHEST", "PA") is None


def test_cr_chest_ap_passes_the_gate() -> None:
    assert gate_reason("CR", "CHEST", "AP") is None


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "MG"])
def test_non_radiograph_modality_is_gated(modality: str) -> None:
    reason = gate_reason(modality, "CHEST", "PA")
    assert reason is not None and f"Modality={modality}" in reason


def test_missing_modality_is_gated() -> None:
    reason = gate_reason(None, "CHEST", "PA")
    assert reason is not None and "Modality=(missing)" in reason


@pytest.mark.parametrize("body_part", ["HAND", "EXTREMITY", "SKULL", "ABDOMEN"])
def test_other_body_part_is_gated(body_part: str) -> None:
    reason = gate_reason("DX", body_part, "PA")
    assert reason is not None and f"BodyPartExamined={body_part}" in reason


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "LAT", "XTABLE"])
def test_lateral_view_is_gated(view: str) -> None:
    reason = gate_reason("DX", "CHEST", view)
    assert reason is not None and f"ViewPosition={view}" in reason and "frontal" in reason


def test_missing_body_part_and_view_are_allowed() -> None:
    assert gate_reason("DX", None, None) is None
    assert gate_reason("CR", None, "PA") is None


def test_inspect_extracts_uids_and_normalises_case() -> None:
    ds = small_image()
    with pytest.warns(UserWarning, match="Invalid value for VR CS"):  # lower case is invalid CS; senders do it
        ds.BodyPartExamined = "chest "
        ds.ViewPosition = "pa"
    meta = inspect(ds, ExplicitVRLittleEndian)
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.study_instance_uid == ds.StudyInstanceUID
    assert meta.series_instance_uid == ds.SeriesInstanceUID
    assert meta.sop_class_uid == DX_FOR_PRESENTATION
    assert meta.transfer_syntax_uid == ExplicitVRLittleEndian
    assert (meta.modality, meta.body_part, meta.view_position) == ("DX", "CHEST", "PA")
    assert meta.study_date == "20240131"
    assert meta.skip_reason is None


def test_inspect_sets_skip_reason_for_lateral() -> None:
    ds = small_image()
    ds.ViewPosition = "LL"
    assert "ViewPosition=LL" in (inspect(ds, ExplicitVRLittleEndian).skip_reason or "")


def test_inspect_without_body_part_is_not_gated() -> None:
    ds = small_image()
    del ds.BodyPartExamined
    meta = inspect(ds, ExplicitVRLittleEndian)
    assert meta.body_part is None and meta.skip_reason is None


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_inspect_rejects_a_path_like_uid(keyword: str) -> None:
    ds = small_image()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        setattr(ds, keyword, "1.2/../../etc")
    with pytest.raises(InvalidUIDError, match=keyword):
        inspect(ds, ExplicitVRLittleEndian)


def test_well_formed_native_image_passes_pixel_check() -> None:
    check_pixel_module(small_image())


@pytest.mark.parametrize("keyword", ["Rows", "Columns"])
def test_zero_rows_or_columns_is_unusable(keyword: str) -> None:
    ds = small_image()
    setattr(ds, keyword, 0)
    with pytest.raises(UnusableDatasetError, match=keyword):
        check_pixel_module(ds)


def test_missing_bits_allocated_is_unusable() -> None:
    ds = small_image()
    del ds.BitsAllocated
    with pytest.raises(UnusableDatasetError, match="BitsAllocated"):
        check_pixel_module(ds)


def test_missing_pixel_data_is_unusable() -> None:
    ds = small_image()
    del ds.PixelData
    with pytest.raises(UnusableDatasetError, match="PixelData is missing"):
        check_pixel_module(ds)


def test_truncated_native_pixel_data_is_unusable() -> None:
    ds = small_image()
    ds.PixelData = bytes(100)  # 8 x 8 x 2 = 128 expected
    with pytest.raises(UnusableDatasetError, match="expected 128 bytes, got 100"):
        check_pixel_module(ds)


def test_empty_pixel_data_read_from_a_file_is_unusable() -> None:
    # pydicom reads a zero-length (7FE0,0010) as None; the SCP must answer 0xC000, not 0x0110 from a TypeError
    buffer = BytesIO()
    ds = small_image()
    ds.PixelData = b""
    ds.save_as(buffer, enforce_file_format=True)
    received = dcmread(BytesIO(buffer.getvalue()))
    with pytest.raises(UnusableDatasetError, match="PixelData"):
        check_pixel_module(received)


def test_truncated_8_bit_pixel_data_is_unusable() -> None:
    ds = small_image(bits=8)
    ds.PixelData = bytes(62)  # 64 expected
    with pytest.raises(UnusableDatasetError, match="expected 64"):
        check_pixel_module(ds)


def test_truncated_multiframe_pixel_data_is_unusable() -> None:
    ds = small_image()
    ds.NumberOfFrames = 2
    with pytest.raises(UnusableDatasetError, match="expected 256 bytes, got 128"):
        check_pixel_module(ds)


def test_compressed_pixel_data_is_not_length_checked() -> None:
    ds = small_image(transfer_syntax=JPEGLosslessSV1)
    ds.PixelData = b"\xfe\xff\x00\xe0" + bytes(4)  # encapsulated; shorter than native size by design
    check_pixel_module(ds)


def test_inspect_checks_the_pixel_module() -> None:
    ds = small_image()
    ds.Rows = 0
    with pytest.raises(UnusableDatasetError):
        inspect(ds, ExplicitVRLittleEndian)
