"""Decode a DICOM chest radiograph into a normalised grey-scale image.

The grey-scale pipeline of PS3.4 N.2.1.1: stored values -> Modality LUT (PS3.3 C.11.1) -> VOI LUT or
window (PS3.3 C.11.2) -> MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2), scaled to [0, 1] with bright = dense.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_windowing, pixel_array
from pydicom.uid import UID

from model.errors import ImageDecodeError

__all__ = ["ImageStats", "decode_image", "image_stats"]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def decode_image(ds: pydicom.Dataset) -> np.ndarray:
    """Return the single frame of `ds` as float32 ``[Rows, Columns]`` in [0, 1], bright = dense.

    Stored values pass through the Modality LUT (RescaleSlope/RescaleIntercept or ModalityLUTSequence,
    PS3.3 C.11.1), then the first VOI transform (VOILUTSequence item 0, else the first WindowCenter/
    WindowWidth pair with its VOILUTFunction, PS3.3 C.11.2); the VOI output range is mapped to [0, 1].
    Without a VOI transform the image's own minimum..maximum is used. MONOCHROME1 is inverted after the
    VOI step so the result is in MONOCHROME2 orientation (PS3.3 C.7.6.3.1.2). Any transfer syntax with an
    installed pydicom decoder works (native, deflated, RLE, JPEG, JPEG-LS, JPEG 2000).

    Raises:
        ImageDecodeError: PixelData missing; Rows or Columns missing or 0; PhotometricInterpretation not
            MONOCHROME1/MONOCHROME2; SamplesPerPixel != 1; more than one frame; native pixel data shorter
            than Rows x Columns x BitsAllocated; a decoder or LUT failure (chained); non-finite values;
            or a constant image at any step.
    """
    _check_image_pixel(ds)
    transfer_syntax = _transfer_syntax(ds)
    if not transfer_syntax.is_encapsulated:
        _check_native_length(ds)
    try:
        stored = pixel_array(ds)
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode pixel data ({transfer_syntax.name}): {exc}") from exc
    if stored.shape != (ds.Rows, ds.Columns):
        raise ImageDecodeError(
            f"decoded pixel data has shape {stored.shape} - expected (Rows, Columns) = ({ds.Rows}, {ds.Columns})"
        )
    if stored.min() == stored.max():
        raise ImageDecodeError(f"constant image: every stored pixel value is {stored.flat[0]}")

    try:
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except Exception as exc:
        raise ImageDecodeError(f"cannot apply the Modality LUT: {exc}") from exc
    if not np.isfinite(values).all():
        raise ImageDecodeError(
            "non-finite values after the Modality LUT "
            f"(RescaleSlope={ds.get('RescaleSlope')!r}, RescaleIntercept={ds.get('RescaleIntercept')!r})"
        )
    if values.min() == values.max():
        raise ImageDecodeError(
            f"constant image after the Modality LUT: every value is {values.flat[0]:g} "
            f"(RescaleSlope={ds.get('RescaleSlope')!r})"
        )

    try:
        if _has_voi_lut(ds):
            out, high = _apply_voi_lut(values, ds)
            low = 0.0
        elif _has_window(ds):
            out = apply_windowing(values, ds, index=0)
            low, high = _window_output_range(ds)
        else:
            out, low, high = values, float(values.min()), float(values.max())
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot apply the VOI LUT: {exc}") from exc

    image = np.clip((np.asarray(out, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = 1.0 - image
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise ImageDecodeError("non-finite values after the VOI LUT")
    if image.min() == image.max():
        raise ImageDecodeError(
            f"constant image after the VOI LUT: every pixel maps to {float(image.flat[0]):.3g} - check "
            f"WindowCenter={ds.get('WindowCenter')!r}, WindowWidth={ds.get('WindowWidth')!r}"
        )
    return image


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageStats:
    """Size in pixels and intensity statistics of an image normalised by :func:`decode_image`.

    minimum, maximum, mean and std (population, ddof=0) are in the unitless [0, 1] range of the
    normalised image; bits_stored and photometric_interpretation are copied from the dataset.
    """

    rows: int
    columns: int
    minimum: float
    maximum: float
    mean: float
    std: float
    photometric_interpretation: str
    bits_stored: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.columns < 1:
            raise ValueError(f"Invalid image size {self.rows}x{self.columns} - rows and columns must be >= 1")
        for name in ("minimum", "maximum", "mean"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Invalid {name} {value!r} - must be in [0, 1]")
        if self.minimum > self.maximum:
            raise ValueError(f"Invalid range: minimum {self.minimum} > maximum {self.maximum}")
        if not 0.0 <= self.std <= 0.5:
            raise ValueError(f"Invalid std {self.std!r} - must be in [0, 0.5] for values in [0, 1]")
        if self.photometric_interpretation not in _MONOCHROME:
            raise ValueError(
                f"Invalid photometric_interpretation {self.photometric_interpretation!r} - "
                "expected MONOCHROME1 or MONOCHROME2"
            )
        if not 1 <= self.bits_stored <= 32:
            raise ValueError(f"Invalid bits_stored {self.bits_stored!r} - must be in [1, 32]")

    def to_dict(self) -> dict[str, int | float | str]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


def image_stats(ds: pydicom.Dataset) -> ImageStats:
    """Decode `ds` with :func:`decode_image` and summarise it; raises ImageDecodeError like it."""
    return stats_of(ds, decode_image(ds))


def stats_of(ds: pydicom.Dataset, decoded: np.ndarray) -> ImageStats:
    """Summarise an image already decoded from `ds` (float [rows, columns] in [0, 1])."""
    image = decoded.astype(np.float64)
    return ImageStats(
        rows=image.shape[0],
        columns=image.shape[1],
        minimum=float(image.min()),
        maximum=float(image.max()),
        mean=float(image.mean()),
        std=float(image.std()),
        photometric_interpretation=str(ds.PhotometricInterpretation),
        bits_stored=int(ds.BitsStored),
    )


def _check_image_pixel(ds: pydicom.Dataset) -> None:
    if "PixelData" not in ds:
        raise ImageDecodeError("PixelData is missing")
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        if value is None:
            raise ImageDecodeError(f"{keyword} is missing")
        if value < 1:
            raise ImageDecodeError(f"{keyword} is {value}")
    photometric = ds.get("PhotometricInterpretation")
    if photometric not in _MONOCHROME:
        raise ImageDecodeError(
            f"unsupported PhotometricInterpretation {photometric!r} - expected MONOCHROME1 or MONOCHROME2"
        )
    samples = ds.get("SamplesPerPixel")
    if samples != 1:
        raise ImageDecodeError(f"SamplesPerPixel is {samples!r} - expected 1")
    frames = ds.get("NumberOfFrames") or 1
    if int(frames) != 1:
        raise ImageDecodeError(f"NumberOfFrames is {frames} - only single-frame images are supported")
    for keyword in ("BitsAllocated", "BitsStored", "PixelRepresentation"):
        if ds.get(keyword) is None:
            raise ImageDecodeError(f"{keyword} is missing")


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not uid:
        raise ImageDecodeError("TransferSyntaxUID (0002,0010) is missing from the file meta information")
    uid = UID(uid)
    if not uid.is_transfer_syntax:
        raise ImageDecodeError(f"TransferSyntaxUID {str(uid)!r} is not a known transfer syntax")
    return uid


def _check_native_length(ds: pydicom.Dataset) -> None:
    pixels = ds.Rows * ds.Columns
    expected = (pixels + 7) // 8 if ds.BitsAllocated == 1 else pixels * (ds.BitsAllocated // 8)
    actual = len(ds.PixelData or b"")
    if actual < expected:
        raise ImageDecodeError(f"pixel data truncated: expected {expected} bytes, got {actual}")


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    items = ds.get("VOILUTSequence")
    return bool(items) and items[0].get("LUTDescriptor") is not None and items[0].get("LUTData") is not None


def _has_window(ds: pydicom.Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _apply_voi_lut(values: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, float]:
    """Map `values` through VOILUTSequence item 0 (PS3.3 C.11.2.1.1); return them and the output maximum.

    Values below the first mapped value take the first entry, values beyond the table the last. The
    maximum is 2**n - 1 for n bits per entry, but a LUT whose entries all fit in fewer bits than its
    LUTDescriptor declares (a known vendor error, e.g. 12-bit data declared as 16) is scaled by the bits
    its entries use. (pydicom 3.0's apply_voi wraps inputs above 255 for 8-bit LUTs, so it is not used.)
    """
    item = ds.VOILUTSequence[0]
    first_map, entries, declared_bits = _lut_descriptor(item)
    element = item["LUTData"]
    if isinstance(element.value, bytes):
        little_endian = ds.file_meta.TransferSyntaxUID.is_little_endian
        table = np.frombuffer(element.value, dtype="<u2" if little_endian else ">u2").astype(np.int64)
    else:
        table = np.asarray(element.value, dtype=np.int64).ravel()
    if table.size < entries:
        raise ImageDecodeError(f"VOILUTSequence LUTData has {table.size} entries - LUTDescriptor declares {entries}")
    index = np.clip(np.rint(values) - first_map, 0, entries - 1).astype(np.intp)
    used_bits = max(int(table[:entries].max()).bit_length(), 1)
    return table[index].astype(np.float64), float(2 ** min(declared_bits, used_bits) - 1)


def _lut_descriptor(item: pydicom.Dataset) -> tuple[int, int, int]:
    entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
    return first_map, entries or 2**16, bits


def _window_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Output range pydicom's apply_windowing maps the window onto (PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** _lut_descriptor(ds.ModalityLUTSequence[0])[2] - 1)
    elif ds.PixelRepresentation == 0:
        low, high = 0.0, float(2**ds.BitsStored - 1)
    else:
        low, high = float(-(2 ** (ds.BitsStored - 1))), float(2 ** (ds.BitsStored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high
