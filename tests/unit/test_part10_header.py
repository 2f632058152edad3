"""daemon.edge.scp.part10_header: the stored file's header is byte for byte what pydicom's writer (pynetdicom's
``encode_file_meta``) makes of ``event.file_meta``, on the fast path and on the fallback."""

from __future__ import annotations

import io

import pydicom
import pytest
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from daemon.edge.scp import part10_header


def _reference(file_meta: pydicom.dataset.FileMetaDataset) -> bytes:
    return b"\x00" * 128 + b"DICM" + encode_file_meta(file_meta)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even / odd lengths
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.826.0.1.3680043.8.498.2427687173079171225194295", "1.2.840.10008.1.2"),
        ("1.2", "1.23", "1.2.840.10008.1.2.4.90"),
        ("1.2.840.10008.5.1.4.1.1.7", "9" * 64, "1.2.840.10008.1.2.1.99"),
    ],
)
def test_fast_header_equals_pydicoms_encoding(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    file_meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
    )
    header = part10_header(file_meta)
    assert header == _reference(file_meta)
    meta = pydicom.filereader.read_preamble(io.BytesIO(header), False)
    assert meta is not None


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    "change",
    [
        lambda fm: setattr(fm, "SourceApplicationEntityTitle", "MODALITY"),  # an element pynetdicom does not add
        lambda fm: setattr(fm, "MediaStorageSOPInstanceUID", "1.2.3 x"),  # not a plain UID (the SCP refuses it later)
        lambda fm: setattr(fm, "ImplementationVersionName", "OTHER_1"),
    ],
)
def test_unusual_file_meta_goes_through_pydicom(change) -> None:  # type: ignore[no-untyped-def]
    file_meta = create_file_meta(sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid="1.2.3.4",
                                 transfer_syntax="1.2.840.10008.1.2.1")
    change(file_meta)
    assert part10_header(file_meta) == _reference(file_meta)


def test_header_reads_back_as_the_file_meta() -> None:
    file_meta = create_file_meta(sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid="1.2.3.45",
                                 transfer_syntax="1.2.840.10008.1.2.1")
    stream = io.BytesIO(part10_header(file_meta))
    stream.seek(128 + 4)
    read = pydicom.filereader._read_file_meta_info(stream)
    assert (read.MediaStorageSOPInstanceUID, read.TransferSyntaxUID) == ("1.2.3.45", "1.2.840.10008.1.2.1")
