"""model.preprocess: decoding every transfer syntax, LUTs, photometric handling, rejects, statistics."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from model import ImageDecodeError, ImageStats, ModelError, decode_image, image_stats
from model.preprocess import decode_file
from tests.dicomgen import (
    LOSSLESS_TRANSFER_SYNTAXES,
    bad_files,
    make_dataset,
    make_folder,
    write_dataset,
)

REAL_CXR = Path(__file__).resolve().parents[2].parent / "shared/data/real-cxr"


def _roundtrip(ds: pydicom.Dataset, tmp_path: Path, transfer_syntax: str) -> pydicom.Dataset:
    path = write_dataset(ds, tmp_path / "image.dcm", transfer_syntax)
    written = pydicom.dcmread(path)
    assert written.file_meta.TransferSyntaxUID == transfer_syntax
    return written


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("transfer_syntax", LOSSLESS_TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_lossless_transfer_syntax_decodes_identically(tmp_path: Path, transfer_syntax: str, bits: int) -> None:
    ds = make_dataset(bits=bits, seed=bits)
    written = _roundtrip(ds, tmp_path, transfer_syntax)
    assert written.SOPInstanceUID == ds.SOPInstanceUID
    np.testing.assert_array_equal(decode_image(written), decode_image(ds))


@pytest.mark.parametrize(("transfer_syntax", "bits"), [(JPEGBaseline8Bit, 8), (JPEGExtended12Bit, 12)])
def test_lossy_transfer_syntax_decodes_within_tolerance(tmp_path: Path, transfer_syntax: str, bits: int) -> None:
    ds = make_dataset(bits=bits, rows=128, columns=96, seed=7)
    written = _roundtrip(ds, tmp_path, transfer_syntax)
    assert written.LossyImageCompression == "01"
    error = np.abs(decode_image(written) - decode_image(ds))
    assert error.mean() < 0.02
    assert error.max() < 0.1


def test_lossy_transfer_syntax_rejects_too_many_bits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BitsStored 12 is too large for JPEG Baseline"):
        write_dataset(make_dataset(bits=12), tmp_path / "x.dcm", JPEGBaseline8Bit)


@pytest.mark.parametrize(
    ("sop_class", "bits"),
    [
        (ComputedRadiographyImageStorage, 8),
        (DigitalXRayImageStorageForPresentation, 12),
        (DigitalXRayImageStorageForProcessing, 16),
    ],
)
def test_monochrome1_twin_is_inverted(sop_class: str, bits: int) -> None:
    mono2 = make_dataset(sop_class=sop_class, bits=bits, seed=3)
    mono1 = copy.deepcopy(mono2)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(decode_image(mono1), 1.0 - decode_image(mono2), atol=1e-6)


@pytest.mark.parametrize("bits", [8, 12])
def test_monochrome1_phantom_displays_like_monochrome2(bits: int) -> None:
    mono1 = make_dataset(sop_class=ComputedRadiographyImageStorage, bits=bits, photometric="MONOCHROME1", seed=5)
    mono2 = make_dataset(sop_class=ComputedRadiographyImageStorage, bits=bits, photometric="MONOCHROME2", seed=5)
    assert mono1.PixelData != mono2.PixelData
    np.testing.assert_allclose(decode_image(mono1), decode_image(mono2), atol=1e-6)


@pytest.mark.parametrize(
    "sop_class",
    [
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,
        CTImageStorage,
        MRImageStorage,
    ],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_every_sop_class_decodes_lungs_dark(sop_class: str, photometric: str) -> None:
    image = decode_image(make_dataset(sop_class=sop_class, photometric=photometric, rows=96, columns=80))
    assert image.shape == (96, 80)
    assert image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0
    lung = image[35:50, 14:22].mean()
    mediastinum = image[35:50, 37:43].mean()
    assert lung < mediastinum - 0.2


@pytest.fixture(scope="module")
def real_cxr() -> tuple[pydicom.Dataset, pydicom.Dataset]:
    assert REAL_CXR.is_dir(), f"reference data not found at {REAL_CXR} - the suite expects ../shared beside the repo"
    (mono2_path,) = REAL_CXR.glob("siim-ptx-*.dcm")
    return pydicom.dcmread(mono2_path), pydicom.dcmread(REAL_CXR / "Fake_MONOHR1.dcm")


def test_real_radiographs_decode(real_cxr: tuple[pydicom.Dataset, pydicom.Dataset]) -> None:
    mono2, mono1 = real_cxr
    assert mono2.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    image2, image1 = decode_image(mono2), decode_image(mono1)
    assert image2.shape == image1.shape == (1024, 1024)
    assert image2.dtype == np.float32
    assert image2.min() == 0.0 and image2.max() == 1.0
    assert image2.std() > 0.1
    np.testing.assert_allclose(image1, 1.0 - image2, atol=1e-6)


def _known_pixels(**attributes: object) -> pydicom.Dataset:
    pixel = np.array([[0, 150, 200, 300], [149, 151, 250, 4095]], dtype=np.uint16)
    ds = make_dataset(sop_class=ComputedRadiographyImageStorage, bits=12, pixel=pixel)
    for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        delattr(ds, keyword)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_rescale_then_window_gives_standard_values() -> None:
    # modality values 2*s - 100; linear window c=300, w=401 (PS3.3 C.11.2.1.2.1): 0 at <= 99.5, 1 above 499.5
    ds = _known_pixels(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=401)
    expected = [
        [0.0, (200 - 299.5) / 400 + 0.5, (300 - 299.5) / 400 + 0.5, 1.0],
        [(198 - 299.5) / 400 + 0.5, (202 - 299.5) / 400 + 0.5, (400 - 299.5) / 400 + 0.5, 1.0],
    ]
    np.testing.assert_allclose(decode_image(ds), expected, atol=1e-6)


def test_first_of_multiple_windows_is_used() -> None:
    single = _known_pixels(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=401)
    multiple = _known_pixels(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=[300, 3000], WindowWidth=[401, 5])
    np.testing.assert_array_equal(decode_image(multiple), decode_image(single))


def test_monochrome1_is_inverted_after_the_window() -> None:
    ds = _known_pixels(
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=300,
        WindowWidth=401,
        PhotometricInterpretation="MONOCHROME1",
    )
    assert decode_image(ds)[0, 0] == 1.0
    assert decode_image(ds)[0, 3] == 0.0


def test_without_voi_the_data_range_is_used() -> None:
    ds = _known_pixels(RescaleSlope=2, RescaleIntercept=-100)
    stored = np.array([[0, 150, 200, 300], [149, 151, 250, 4095]], dtype=np.float64)
    np.testing.assert_allclose(decode_image(ds), stored / 4095, atol=1e-6)


def _voi_lut(descriptor: list[int], data: np.ndarray) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data.astype(np.uint16).tolist()
    return item


def test_voi_lut_sequence_takes_precedence_over_window() -> None:
    ds = _known_pixels(WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = [_voi_lut([4096, 0, 8], np.arange(4096) // 16)]
    stored = np.array([[0, 150, 200, 300], [149, 151, 250, 4095]])
    np.testing.assert_allclose(decode_image(ds), (stored // 16) / 255, atol=1e-6)


def test_voi_lut_declared_wider_than_its_data_is_scaled_by_used_bits() -> None:
    ds = _known_pixels()
    ds.VOILUTSequence = [_voi_lut([4096, 0, 16], np.arange(4096))]
    stored = np.array([[0, 150, 200, 300], [149, 151, 250, 4095]])
    np.testing.assert_allclose(decode_image(ds), stored / 4095, atol=1e-6)


def _without(keyword: str):
    def mutate(ds: pydicom.Dataset) -> None:
        delattr(ds, keyword)

    mutate.__qualname__ = f"without_{keyword}"
    return mutate


def _setting(**attributes: object):
    def mutate(ds: pydicom.Dataset) -> None:
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)

    mutate.__qualname__ = "set_" + "_".join(attributes)
    return mutate


def _corrupt_jpeg_ls(ds: pydicom.Dataset) -> None:
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    codestream = ds.PixelData
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(200)])
    assert ds.PixelData != codestream


def _cut_jpeg_ls_scan(ds: pydicom.Dataset) -> None:
    """A valid JPEG-LS frame header (so the size check passes) whose scan ends right after its SOS marker."""
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([codestream[: codestream.index(b"\xff\xda") + 2] + b"\xff\xd9"])


def _frames(ds: pydicom.Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _constant(ds: pydicom.Dataset) -> None:
    ds.PixelData = np.full((ds.Rows, ds.Columns), 700, dtype=np.uint16).tobytes()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_without("PixelData"), "PixelData is missing"),
        (_setting(Rows=0, PixelData=b""), "Rows is 0"),
        (_without("Columns"), "Columns is missing"),
        (_setting(PhotometricInterpretation="YBR_FULL"), "unsupported PhotometricInterpretation 'YBR_FULL'"),
        (_without("PhotometricInterpretation"), "unsupported PhotometricInterpretation None"),
        (_setting(SamplesPerPixel=3), "SamplesPerPixel is 3 - expected 1"),
        (_frames, "NumberOfFrames is 2 - only single-frame"),
        (_without("BitsStored"), "BitsStored is missing"),
        (_setting(PixelData=bytes(1000)), "pixel data truncated: expected 8192 bytes, got 1000"),
        (_constant, "constant image: every stored pixel value is 700"),
        (_setting(WindowCenter=100000, WindowWidth=10), "constant image after the VOI LUT"),
        (_setting(WindowWidth=0), "cannot apply the VOI LUT: .*Window Width"),
        (_setting(RescaleSlope=0), "constant image after the Modality LUT: every value is 0"),
        (_setting(RescaleSlope="1e308"), r"non-finite values after the Modality LUT \(RescaleSlope='1e308'"),
        (_corrupt_jpeg_ls, "JPEG codestream: frame header has 0 lines"),
        (_cut_jpeg_ls_scan, "cannot decode pixel data \\(JPEG-LS Lossless"),
    ],
    ids=lambda value: getattr(value, "__qualname__", None) if callable(value) else None,
)
def test_bad_input_raises_named_error(mutate, message: str) -> None:
    ds = make_dataset(bits=12)
    mutate(ds)
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_image(ds)
    assert isinstance(info.value, ModelError) and isinstance(info.value, ValueError)
    if "cannot" in message:
        assert info.value.__cause__ is not None


def test_missing_transfer_syntax_is_named() -> None:
    ds = make_dataset()
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(ImageDecodeError, match="TransferSyntaxUID"):
        decode_image(ds)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated", "pixel data truncated: expected 8192 bytes, got 1000"),
        ("cut", "pixel data truncated: expected 8192 bytes"),
        ("zero_rows", "Rows is 0"),
        ("rgb", "unsupported PhotometricInterpretation 'RGB'"),
    ],
)
def test_bad_files_fail_to_decode(tmp_path: Path, name: str, message: str) -> None:
    path = bad_files(tmp_path)[name]
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(pydicom.dcmread(path))


def test_garbage_file_is_not_dicom(tmp_path: Path) -> None:
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(bad_files(tmp_path)["garbage"])


def test_image_stats_match_numpy() -> None:
    ds = make_dataset(sop_class=ComputedRadiographyImageStorage, bits=12, photometric="MONOCHROME1", seed=9)
    image = decode_image(ds).astype(np.float64)
    stats = image_stats(ds)
    assert (stats.rows, stats.columns) == image.shape
    assert stats.minimum == pytest.approx(image.min(), abs=1e-12)
    assert stats.maximum == pytest.approx(image.max(), abs=1e-12)
    assert stats.mean == pytest.approx(np.mean(image), abs=1e-9)
    assert stats.std == pytest.approx(np.std(image), abs=1e-9)
    assert stats.photometric_interpretation == "MONOCHROME1"
    assert stats.bits_stored == 12
    assert json.loads(json.dumps(stats.to_dict())) == dataclasses.asdict(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.mean = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": 0}, "Invalid image size 0x64"),
        ({"mean": 1.5}, "Invalid mean 1.5"),
        ({"minimum": 0.9}, "minimum 0.9 > maximum"),
        ({"std": -0.1}, "Invalid std"),
        ({"photometric_interpretation": "RGB"}, "Invalid photometric_interpretation 'RGB'"),
    ],
)
def test_image_stats_rejects_invalid_values(change: dict[str, object], message: str) -> None:
    fields = dict(
        rows=64,
        columns=64,
        minimum=0.0,
        maximum=0.8,
        mean=0.4,
        std=0.2,
        photometric_interpretation="MONOCHROME2",
        bits_stored=12,
    )
    with pytest.raises(ValueError, match=message):
        ImageStats(**{**fields, **change})


def test_make_folder_writes_distinct_instances_of_one_series(tmp_path: Path) -> None:
    paths = make_folder(tmp_path / "study", 3, bits=12, seed=20)
    datasets = [pydicom.dcmread(path) for path in paths]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3]
    assert len({ds.PixelData for ds in datasets}) == 3


# ---------------------------------------------------------------------------------------- decode_file: PNG, JPEG, DICOM


def _png_with_sbit(png: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk (one grey sample) right after IHDR (PNG spec 11.3.3.4: before PLTE and IDAT)."""
    ihdr_end = 8 + 4 + 4 + 13 + 4
    body = b"sBIT" + bytes([bits])
    chunk = len(body[4:]).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


def test_decode_file_reads_real_8_bit_grey_pngs() -> None:
    paths = sorted((REAL_CXR / "nih").glob("*.png"))
    assert len(paths) == 29
    for path in paths[:6]:
        image = decode_file(path)
        expected = np.asarray(Image.open(path), dtype=np.float64) / 255.0
        assert image.dtype == np.float32 and image.shape == expected.shape
        np.testing.assert_allclose(image, expected, atol=1e-7)


@pytest.mark.parametrize("name", ["h0001.png", "tb0005.png", "16747_3_1.jpg"])
def test_decode_file_turns_real_rgb_radiographs_grey(name: str) -> None:
    path = REAL_CXR / name
    with Image.open(path) as im:
        assert im.mode == "RGB"  # these files are stored as RGB; the decoder must take their luminance
        rgb = np.asarray(im, dtype=np.float64)
    image = decode_file(path)
    assert image.dtype == np.float32 and image.shape == rgb.shape[:2]
    np.testing.assert_allclose(image, _luma(rgb), atol=1.01 / 255)  # Pillow's integer luma rounds
    rows, cols = image.shape
    band = image[rows // 3 : rows // 2]
    lungs = np.r_[band[:, cols // 5 : cols // 3].ravel(), band[:, -cols // 3 : -cols // 5].ravel()]
    spine = band[:, cols // 2 - cols // 40 : cols // 2 + cols // 40]
    assert lungs.mean() < spine.mean() - 0.1  # bright = dense: the spine is brighter than the lungs


def test_decode_file_reads_dicom_like_decode_image(tmp_path: Path) -> None:
    (siim,) = REAL_CXR.glob("siim-ptx-*.dcm")
    for path in (siim, REAL_CXR / "Fake_MONOHR1.dcm"):
        np.testing.assert_array_equal(decode_file(path), decode_image(pydicom.dcmread(path)))
    ds = make_dataset(sop_class=ComputedRadiographyImageStorage, bits=12, photometric="MONOCHROME1", seed=4)
    written = write_dataset(ds, tmp_path / "no-suffix")  # recognised by the DICM marker, not the name
    np.testing.assert_array_equal(decode_file(written), decode_image(ds))


def test_decode_file_scales_16_bit_png_by_its_bit_depth(tmp_path: Path) -> None:
    full = (np.arange(96 * 80).reshape(96, 80) * 9 % 65536).astype(np.uint16)
    Image.fromarray(full).save(tmp_path / "g16.png")
    image = decode_file(tmp_path / "g16.png")
    assert image.dtype == np.float32 and image.shape == (96, 80)
    np.testing.assert_allclose(image, full / 65535.0, atol=1e-7)

    twelve = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(twelve).save(tmp_path / "g12.png")
    np.testing.assert_allclose(decode_file(tmp_path / "g12.png"), twelve / 4095.0, atol=1e-7)

    dim = (np.arange(64 * 64).reshape(64, 64) % 1000).astype(np.uint16)  # 12-bit data that never reaches 4095
    Image.fromarray(dim).save(tmp_path / "dim.png")
    np.testing.assert_allclose(decode_file(tmp_path / "dim.png"), dim / 1023.0, atol=1e-7)  # guessed: 10 bits
    (tmp_path / "dim-sbit.png").write_bytes(_png_with_sbit((tmp_path / "dim.png").read_bytes(), 12))
    np.testing.assert_allclose(decode_file(tmp_path / "dim-sbit.png"), dim / 4095.0, atol=1e-7)  # declared: 12


def test_decode_file_converts_colour_palette_alpha_and_bilevel(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (64, 72, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):  # alpha is ignored
        np.testing.assert_allclose(decode_file(tmp_path / name), _luma(rgb.astype(np.float64)), atol=1.01 / 255)

    grey = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    palette = Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    assert palette.mode == "P"
    palette.save(tmp_path / "palette.png")
    np.testing.assert_allclose(decode_file(tmp_path / "palette.png"), grey / 255.0, atol=1.01 / 255)

    Image.fromarray(np.stack([grey, 255 - grey], axis=2), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(decode_file(tmp_path / "la.png"), grey / 255.0, atol=1e-7)

    Image.fromarray(grey >= 128).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(decode_file(tmp_path / "bilevel.png"), (grey >= 128).astype(np.float32))


def test_decode_file_applies_jpeg_exif_orientation(tmp_path: Path) -> None:
    grey = np.zeros((64, 96), np.uint8)
    grey[:, :48] = 255  # bright left half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(grey).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = decode_file(tmp_path / "rotated.jpg")
    assert image.shape == (96, 64)
    assert image[:40].mean() > 0.9 and image[-40:].mean() < 0.1  # the bright half is now on top


def _truncated_png(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(128 * 128).reshape(128, 128) % 251).astype(np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _animated_png(path: Path) -> None:
    frames = [Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (10, 200)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("missing.png", None, "cannot read the file"),
        ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
        ("garbage.png", lambda p: p.write_bytes(b"not an image at all" * 10), "cannot decode image file - not DICOM"),
        ("cut.png", _truncated_png, "corrupt or truncated"),
        ("flat.png", lambda p: Image.fromarray(np.full((64, 64), 7, np.uint8)).save(p), r"constant image"),
        ("scan.bmp", lambda p: Image.fromarray(np.eye(64, dtype=np.uint8) * 255).save(p),
         "unsupported image format BMP - expected DICOM, PNG or JPEG"),
        ("anim.png", _animated_png, "animated PNG with 2 frames"),
        ("broken.dcm", lambda p: p.write_bytes(b"\x00" * 64), r"broken.dcm: (cannot read as DICOM|PixelData)"),
    ],
)
def test_decode_file_rejects_bad_files_naming_the_path(tmp_path: Path, name: str, write, message: str) -> None:
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_file(path)
    assert str(info.value).startswith(str(path))


def test_decode_file_names_a_dicom_problem_with_the_path(tmp_path: Path) -> None:
    path = bad_files(tmp_path)["rgb"]
    with pytest.raises(ImageDecodeError, match=r"unsupported PhotometricInterpretation 'RGB'") as info:
        decode_file(path)
    assert str(info.value).startswith(str(path))
