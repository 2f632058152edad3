"""model.preprocess: decoding every transfer syntax, LUTs, photometric handling, rejects, statistics."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
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
        (_corrupt_jpeg_ls, "cannot decode pixel data \\(JPEG-LS Lossless"),
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
