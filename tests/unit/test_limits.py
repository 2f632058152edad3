"""Resource limits before decoding (model.preprocess): header sizes, codestream headers, capped inflate of deflated
datasets; their settings; and how the worker classifies what they raise (permanent, never retried)."""

from __future__ import annotations

import io
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, get_frame
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from daemon.edge.intake import UnusableDatasetError, check_element_lengths, check_pixel_module, pixel_limits
from daemon.settings import Settings, SettingsError, load_settings
from daemon.work.worker import PermanentJobError, read_stored_image
from model.errors import ImageDecodeError, ImageTooLargeError
from model.preprocess import (
    PixelLimits,
    check_pixel_limits,
    codestream_geometry,
    decode_image,
    inflate,
    read_deflated_dataset,
    read_dicom,
)
from tests.dicomgen import make_dataset, write_dataset
from tests.hostilegen import (
    deflate,
    deflate_bomb,
    encode,
    encode_compressed,
    noise_image,
    patch_j2k_size,
    patch_jpeg_size,
    write_part10,
)

SMALL = PixelLimits(max_pixels=1_000_000, max_bytes=4 << 20)


# ------------------------------------------------------------------------------------------------ header limits


def test_limits_reject_non_positive_values() -> None:
    with pytest.raises(ValueError, match="max_pixels 0"):
        PixelLimits(max_pixels=0)
    with pytest.raises(ValueError, match="max_bytes -1"):
        PixelLimits(max_bytes=-1)


def test_header_within_limits_passes() -> None:
    ds = make_dataset(rows=1000, columns=1000)  # exactly 1,000,000 pixels, 2,000,000 bytes
    check_pixel_limits(ds, SMALL)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"Rows": 1001, "Columns": 1000}, r"1001 x 1000 x 1 x 1 = 1,001,000 pixels - the limit is 1,000,000"),
        ({"NumberOfFrames": 245}, r"64 x 64 x 245 x 1 = 1,003,520 pixels"),
        ({"SamplesPerPixel": 3, "Rows": 600, "Columns": 600}, r"600 x 600 x 1 x 3 = 1,080,000 pixels"),
        ({"Rows": 1000, "Columns": 1000, "BitsAllocated": 64}, r"BitsAllocated 64 decode to 7.6 MiB - the limit "
                                                              r"is 4 MiB \(max_decompressed_mb\)"),
    ],
)
def test_header_over_a_limit_names_the_dimensions_and_the_limit(attributes: dict, message: str) -> None:
    ds = make_dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    with pytest.raises(ImageTooLargeError, match=message):
        check_pixel_limits(ds, SMALL)


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, "NumberOfFrames is 0"), (-2, "NumberOfFrames is -2 - must not be negative")],
)
def test_frame_counts_below_one_are_named(value: int, message: str) -> None:
    ds = make_dataset()
    ds.NumberOfFrames = value
    with pytest.raises(ImageDecodeError, match=message):
        check_pixel_limits(ds)


def test_the_edge_check_refuses_an_oversized_header_before_looking_at_pixel_data() -> None:
    ds = make_dataset()
    ds.Rows = ds.Columns = 60000  # 8 KiB of pixel data under a header claiming 3.6 gigapixels
    with pytest.raises(UnusableDatasetError, match="image too large: .*60000 x 60000"):
        check_pixel_module(ds, SMALL)


def test_an_element_longer_than_the_dataset_is_refused_before_its_value_is_used() -> None:
    raw = encode(make_dataset())
    at = raw.index(b"\xe0\x7f\x10\x00")
    cut = raw[: at + 8] + (0xFFFFFFF0).to_bytes(4, "little") + raw[at + 12 :]  # PixelData claims ~4 GiB, holds 8 KiB
    with pytest.raises(UnusableDatasetError, match="element \\(7FE0,0010\\) declares 4,294,967,280 bytes, 8,192"):
        check_element_lengths(read_dataset(io.BytesIO(cut), False, True))
    check_element_lengths(read_dataset(io.BytesIO(raw), False, True))  # the intact dataset passes


def test_settings_limits_default_validate_and_come_from_the_environment(tmp_path: Path) -> None:
    defaults = pixel_limits(Settings(data_dir=tmp_path))
    assert defaults == PixelLimits(max_pixels=100_000_000, max_bytes=256 << 20)
    with pytest.raises(SettingsError, match="max_image_pixels 0"):
        Settings(data_dir=tmp_path, max_image_pixels=0)
    with pytest.raises(SettingsError, match="max_decompressed_mb 0"):
        Settings(data_dir=tmp_path, max_decompressed_mb=0)
    settings = load_settings(environ={"CHEXD_DATA_DIR": str(tmp_path), "CHEXD_MAX_IMAGE_PIXELS": "5000000",
                                      "CHEXD_MAX_DECOMPRESSED_MB": "32"})
    assert pixel_limits(settings) == PixelLimits(max_pixels=5_000_000, max_bytes=32 << 20)


# ------------------------------------------------------------------------------------------ codestream headers


def _j2k_frame(rows: int = 64, columns: int = 64) -> bytes:
    ds, _ = encode_compressed(make_dataset(bits=12, pixel=noise_image(64, 64)), JPEG2000Lossless)
    return patch_j2k_size(get_frame(ds.PixelData, 0, number_of_frames=1), rows, columns)


def test_j2k_siz_is_read_without_decoding() -> None:
    assert codestream_geometry(_j2k_frame(), JPEG2000Lossless) == (64, 64, 1)
    assert codestream_geometry(_j2k_frame(60000, 50000), JPEG2000Lossless) == (60000, 50000, 1)
    wrapped = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x14ftypjp2 " + bytes(8) + _j2k_frame()
    assert codestream_geometry(wrapped, JPEG2000Lossless) == (64, 64, 1)  # a JP2 wrapper around the codestream


def test_jpeg_ls_and_jpeg_frame_headers_are_read_without_decoding() -> None:
    ds, _ = encode_compressed(make_dataset(bits=12, pixel=noise_image(48, 80)), JPEGLSLossless)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    assert codestream_geometry(frame, JPEGLSLossless) == (48, 80, 1)
    assert codestream_geometry(patch_jpeg_size(frame, 60000, 7, 0xF7), JPEGLSLossless) == (60000, 7, 1)
    picture = io.BytesIO()
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(picture, "JPEG")  # JFIF APP0, DQT, SOF0, DHT ...
    assert codestream_geometry(picture.getvalue(), JPEGBaseline8Bit) == (30, 50, 1)
    assert codestream_geometry(b"anything", RLELossless) is None


@pytest.mark.parametrize(
    ("frame", "syntax", "message"),
    [
        (b"\xff\x4f" + bytes(100), JPEG2000Lossless, "no SIZ marker segment"),
        (b"\x00\x01" + bytes(100), JPEGLSLossless, "does not start with SOI"),
        (b"\xff\xd8\xff\xda\x00\x08" + bytes(100), JPEGBaseline8Bit, "no frame header"),
        (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x00\x40\x01", JPEGBaseline8Bit, "0 lines"),
    ],
)
def test_a_missing_or_broken_frame_header_is_named(frame: bytes, syntax: str, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        codestream_geometry(frame, syntax)


def test_a_small_header_over_a_huge_codestream_fails_before_any_decoder_runs() -> None:
    ds, _ = encode_compressed(make_dataset(bits=12, pixel=noise_image(64, 64)), JPEG2000Lossless)
    ds.PixelData = encapsulate([_j2k_frame(60000, 60000)])
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="codestream too large: .*60000 x 60000 .* 3,600,000,000 pixels"):
        decode_image(ds)
    assert time.perf_counter() - started < 1.0, "refused from the SIZ marker, not by decoding"


def test_a_codestream_that_disagrees_with_the_header_is_refused() -> None:
    ds, _ = encode_compressed(make_dataset(bits=12, pixel=noise_image(64, 64)), JPEG2000Lossless)
    ds.PixelData = encapsulate([_j2k_frame(64, 32)])
    with pytest.raises(ImageDecodeError, match=r"claims 64 x 32 x 1 .* header says .* 64 x 64 x 1"):
        decode_image(ds)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"BitsAllocated": 64, "BitsStored": 64, "HighBit": 63}, "unsupported BitsAllocated 64 - expected 8, 16 or 32"),
        ({"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0}, "unsupported BitsAllocated 1"),
        ({"BitsAllocated": 12, "BitsStored": 12, "HighBit": 11}, "unsupported BitsAllocated 12"),
        ({"BitsStored": 17, "HighBit": 16}, r"BitsStored 17 - must be in 1..BitsAllocated \(16\)"),
        ({"HighBit": 15}, r"HighBit 15 - must be BitsStored - 1 \(11"),
        ({"PixelRepresentation": 2}, "PixelRepresentation 2"),
    ],
)
def test_unsupported_bit_layouts_are_named_before_decoding(attributes: dict, message: str) -> None:
    ds = make_dataset(bits=12)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(ds)


# --------------------------------------------------------------------------------------------------- inflate


def _peak_bytes(call) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_inflate_round_trips_and_refuses_beyond_the_cap_with_bounded_memory() -> None:
    raw = np.random.default_rng(0).bytes(300_000)
    assert inflate(deflate(raw), len(raw)) == raw
    bomb = deflate(bytes(64 << 20), level=9)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 100_000

    def refuse() -> None:
        with pytest.raises(ImageTooLargeError, match=r"inflates to more than 1 MiB \(max_decompressed_mb\)"):
            inflate(bomb, 1 << 20)

    assert _peak_bytes(refuse) < 4 << 20, "inflating stops at the cap, never at the bomb's size"


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\xff" * 100, "deflated dataset is corrupt"), (deflate(bytes(10_000))[:-3], "deflated dataset is truncated")],
)
def test_inflate_names_corrupt_and_truncated_streams(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        inflate(data, 1 << 20)


def test_deflated_dataset_is_parsed_like_pydicom_does() -> None:
    ds = make_dataset(seed=3)
    parsed = read_deflated_dataset(deflate(encode(ds)))
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID and parsed.PixelData == ds.PixelData


def test_deflate_bomb_is_refused_from_its_header_before_its_pixels_are_inflated() -> None:
    _, bomb = deflate_bomb(4096, 4096)  # 32 MiB of pixels, ~33 KiB compressed
    limits = PixelLimits(max_pixels=1_000_000, max_bytes=1 << 30)  # the byte cap alone would let it through

    def refuse() -> None:
        with pytest.raises(ImageTooLargeError, match="4096 x 4096 x 1 x 1 = 16,777,216 pixels"):
            read_deflated_dataset(bomb, limits)

    assert _peak_bytes(refuse) < 4 << 20


def test_deflate_bomb_with_a_small_header_is_refused_by_its_pixel_data_length() -> None:
    _, bomb = deflate_bomb(64, 64, pixel_bytes=64 << 20)
    with pytest.raises(ImageTooLargeError, match="PixelData claims 67,108,864 bytes"):
        read_deflated_dataset(bomb, SMALL)


def test_deflate_bomb_behind_a_long_header_is_stopped_by_the_cap() -> None:
    _, bomb = deflate_bomb(64, 64, pixel_bytes=64 << 20, header_padding=2 << 20)

    def refuse() -> None:
        with pytest.raises(ImageTooLargeError, match="inflates to more than 4 MiB"):
            read_deflated_dataset(bomb, SMALL)

    assert _peak_bytes(refuse) < 16 << 20


def test_read_dicom_caps_deflated_files_and_reads_others_like_dcmread(tmp_path: Path) -> None:
    ds = make_dataset(seed=4)
    deflated = write_dataset(ds, tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    read = read_dicom(deflated)
    assert read.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(decode_image(read), decode_image(pydicom.dcmread(deflated)))
    plain = write_dataset(ds, tmp_path / "plain.dcm")
    assert read_dicom(plain).PixelData == pydicom.dcmread(plain).PixelData
    meta, bomb = deflate_bomb(4096, 4096)
    path = write_part10(tmp_path / "bomb.dcm", str(meta.SOPClassUID), str(meta.SOPInstanceUID),
                        DeflatedExplicitVRLittleEndian, bomb)
    with pytest.raises(ImageTooLargeError):
        read_dicom(path, SMALL)
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(bomb, 100)  # a real deflate stream


# ----------------------------------------------------------------------------------- the worker's classification


def test_worker_reads_limits_and_bad_bit_depths_as_permanent_errors(tmp_path: Path) -> None:
    ds = make_dataset(bits=12)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 64, 64, 63
    ds.PixelData = np.zeros(64 * 64, np.uint64).tobytes()
    with pytest.raises(PermanentJobError, match="unsupported BitsAllocated 64"):
        read_stored_image(write_dataset(ds, tmp_path / "b64.dcm"))
    meta, bomb = deflate_bomb(4096, 4096)
    path = write_part10(tmp_path / "bomb.dcm", str(meta.SOPClassUID), str(meta.SOPInstanceUID),
                        DeflatedExplicitVRLittleEndian, bomb)
    with pytest.raises(PermanentJobError, match="image too large"):
        read_stored_image(path, SMALL)
    with pytest.raises(PermanentJobError, match="missing from the spool"):
        read_stored_image(tmp_path / "gone.dcm")


def test_worker_lets_os_errors_through_as_transient(tmp_path: Path) -> None:
    (tmp_path / "a-directory.dcm").mkdir()
    with pytest.raises(IsADirectoryError):
        read_stored_image(tmp_path / "a-directory.dcm")
