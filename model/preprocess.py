"""Decode a chest radiograph (DICOM, PNG or JPEG) into a normalised grey-scale image.

DICOM follows the grey-scale pipeline of PS3.4 N.2.1.1: stored values -> Modality LUT (PS3.3 C.11.1) -> VOI LUT
or window (PS3.3 C.11.2) -> MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2), scaled to [0, 1] with bright = dense.
PNG and JPEG files (:func:`decode_file`) are read with Pillow and scaled by their bit depth; they carry no
photometric interpretation, so they are taken as stored (bright = dense, as every public CXR PNG/JPEG set is).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import apply_modality_lut, apply_windowing, pixel_array
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from model.errors import ImageDecodeError, ImageTooLargeError

__all__ = [
    "DEFAULT_LIMITS",
    "ImageStats",
    "PixelLimits",
    "check_pixel_limits",
    "codestream_geometry",
    "decode_file",
    "decode_image",
    "image_stats",
    "inflate",
    "read_deflated_dataset",
    "read_dicom",
]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_BITS_ALLOCATED = (8, 16, 32)


@dataclass(frozen=True, kw_only=True, slots=True)
class PixelLimits:
    """The largest image chexd decodes, checked from the header (and the codestream) before any decoding.

    max_pixels: Rows x Columns x NumberOfFrames x SamplesPerPixel. max_bytes: those pixels x BitsAllocated / 8, the
    decoded pixel data in bytes; also the most a Deflated Explicit VR Little Endian dataset may inflate to.
    """

    max_pixels: int = 100_000_000
    max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"Invalid max_pixels {self.max_pixels} - must be >= 1")
        if self.max_bytes < 1:
            raise ValueError(f"Invalid max_bytes {self.max_bytes} - must be >= 1")


DEFAULT_LIMITS = PixelLimits()


def decode_image(ds: pydicom.Dataset, *, limits: PixelLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Return the single frame of `ds` as float32 ``[Rows, Columns]`` in [0, 1], bright = dense.

    Stored values pass through the Modality LUT (RescaleSlope/RescaleIntercept or ModalityLUTSequence,
    PS3.3 C.11.1), then the first VOI transform (VOILUTSequence item 0, else the first WindowCenter/
    WindowWidth pair with its VOILUTFunction, PS3.3 C.11.2); the VOI output range is mapped to [0, 1].
    Without a VOI transform the image's own minimum..maximum is used. MONOCHROME1 is inverted after the
    VOI step so the result is in MONOCHROME2 orientation (PS3.3 C.7.6.3.1.2). Any transfer syntax with an
    installed pydicom decoder works (native, deflated, RLE, JPEG, JPEG-LS, JPEG 2000).

    Before decoding, the header is checked against ``limits`` and, for JPEG, JPEG-LS and JPEG 2000, the codestream's
    own frame header (SOF / SOF55 / SIZ) must agree with Rows, Columns and SamplesPerPixel, so a small header cannot
    hide a huge codestream.

    Raises:
        ImageTooLargeError: the header or the codestream claims more than ``limits`` allow.
        ImageDecodeError: PixelData missing; Rows or Columns missing or 0; PhotometricInterpretation not
            MONOCHROME1/MONOCHROME2; SamplesPerPixel != 1; more than one frame; BitsAllocated not 8, 16 or 32;
            BitsStored not in 1..BitsAllocated; HighBit not BitsStored - 1; PixelRepresentation not 0 or 1;
            native pixel data shorter than Rows x Columns x BitsAllocated; a codestream header that is missing
            or disagrees with the DICOM header; a decoder or LUT failure (chained); non-finite values; or a
            constant image at any step.
    """
    stored = _decode_stored(ds, limits)
    values = _modality_values(stored, ds)
    return _voi_to_unit(values, ds)


def _decode_stored(ds: pydicom.Dataset, limits: PixelLimits) -> np.ndarray:
    """The stored pixel values [Rows, Columns] after the header, limit and codestream checks (see
    :func:`decode_image`)."""
    _check_image_pixel(ds)
    check_pixel_limits(ds, limits)
    transfer_syntax = _transfer_syntax(ds)
    if transfer_syntax.is_encapsulated:
        _check_codestream(ds, transfer_syntax, limits)
    else:
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
    return stored


def _modality_values(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values through the Modality LUT (PS3.3 C.11.1), float64; refuses non-finite or constant results."""
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
    return values


def _voi_to_unit(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality values through the first VOI transform (PS3.3 C.11.2), its output range mapped to [0, 1] float32 in
    MONOCHROME2 orientation; refuses non-finite or constant results."""
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
    allocated, stored, high_bit = ds.BitsAllocated, ds.BitsStored, ds.get("HighBit")
    if allocated not in _BITS_ALLOCATED:
        raise ImageDecodeError(f"unsupported BitsAllocated {allocated!r} - expected 8, 16 or 32")
    if not isinstance(stored, int) or not 1 <= stored <= allocated:
        raise ImageDecodeError(f"BitsStored {stored!r} - must be in 1..BitsAllocated ({allocated})")
    if high_bit is not None and high_bit != stored - 1:
        raise ImageDecodeError(f"HighBit {high_bit!r} - must be BitsStored - 1 ({stored - 1}, PS3.3 C.7.6.3.1)")
    if ds.PixelRepresentation not in (0, 1):
        raise ImageDecodeError(f"PixelRepresentation {ds.PixelRepresentation!r} - must be 0 (unsigned) or 1 (signed)")


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


# ------------------------------------------------------------------------------ limits before decoding (PS3.5 8, A.4)


def _count(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """A non-negative integer attribute (Rows, NumberOfFrames …); ImageDecodeError naming it when it is not one."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ImageDecodeError(f"{keyword} is {str(value)[:32]!r} - must be an integer") from None
    if number < 0:
        raise ImageDecodeError(f"{keyword} is {number} - must not be negative")
    return number


def _check_size(rows: int, columns: int, frames: int, samples: int, bits: int, limits: PixelLimits, what: str) -> None:
    pixels = rows * columns * frames * samples
    if pixels > limits.max_pixels:
        raise ImageTooLargeError(
            f"{what} too large: Rows x Columns x NumberOfFrames x SamplesPerPixel = {rows} x {columns} x {frames} x "
            f"{samples} = {pixels:,} pixels - the limit is {limits.max_pixels:,} (max_image_pixels)"
        )
    decoded = (pixels * bits + 7) // 8
    if decoded > limits.max_bytes:
        raise ImageTooLargeError(
            f"{what} too large: {pixels:,} pixels x BitsAllocated {bits} decode to {decoded / 2**20:,.1f} MiB - the "
            f"limit is {limits.max_bytes / 2**20:,.0f} MiB (max_decompressed_mb)"
        )


def check_pixel_limits(ds: pydicom.Dataset, limits: PixelLimits = DEFAULT_LIMITS) -> None:
    """Refuse an image whose header claims more than ``limits``: Rows x Columns x NumberOfFrames x SamplesPerPixel
    pixels above ``max_pixels``, or those pixels x BitsAllocated / 8 bytes above ``max_bytes``. Reads the header
    only; missing attributes count as 1 frame, 1 sample, 0 rows.

    Raises:
        ImageTooLargeError: over a limit.
        ImageDecodeError: one of those attributes is negative or not an integer; NumberOfFrames is 0.
    """
    rows, columns = _count(ds, "Rows", 0), _count(ds, "Columns", 0)
    frames = _count(ds, "NumberOfFrames", 1)
    if frames == 0:
        raise ImageDecodeError("NumberOfFrames is 0 - an image has at least one frame")
    samples, bits = _count(ds, "SamplesPerPixel", 1), _count(ds, "BitsAllocated", 8)
    _check_size(rows, columns, frames, max(samples, 1), max(bits, 1), limits, "image")


_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI (ITU T.81 B.1.1.3)
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ (ISO 15444-1 A.5.1)
_JPEG_FAMILY = ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.6", "1.2.840.10008.1.2.4.7", "1.2.840.10008.1.2.4.8")
_J2K_FAMILY = ("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")


def codestream_geometry(frame: bytes, transfer_syntax: str) -> tuple[int, int, int] | None:
    """(rows, columns, components) that a frame's codestream header claims, read without decoding.

    JPEG (ITU T.81 SOFn) and JPEG-LS (ITU T.87 SOF55): the first frame header before the first scan. JPEG 2000
    (ISO 15444-1 SIZ, bare or inside a JP2 wrapper): Ysiz - YOsiz, Xsiz - XOsiz, Csiz. Returns None for a transfer
    syntax without such a header (RLE: its decoder writes into a buffer of the header's size).

    Raises:
        ImageDecodeError: the codestream has no frame header where the syntax requires one, or it is cut short.
    """
    uid = str(transfer_syntax)
    data = bytes(frame[:65536])
    if uid.startswith(_J2K_FAMILY):
        at = data.find(_J2K_SIZ)
        if at < 0 or len(data) < at + 42:
            raise ImageDecodeError("JPEG 2000 codestream has no SIZ marker segment (SOC FF4F, SIZ FF51)")
        x, y, x0, y0 = struct.unpack(">4I", data[at + 8 : at + 24])
        (components,) = struct.unpack(">H", data[at + 40 : at + 42])
        if x <= x0 or y <= y0:
            raise ImageDecodeError(f"JPEG 2000 SIZ claims an empty image ({x - x0} x {y - y0})")
        return y - y0, x - x0, components
    if uid.startswith(_JPEG_FAMILY):
        return _jpeg_frame_header(data)
    return None


def _jpeg_frame_header(data: bytes) -> tuple[int, int, int]:
    name = "JPEG codestream"
    if data[:2] != b"\xff\xd8":
        raise ImageDecodeError(f"{name} does not start with SOI (FFD8)")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise ImageDecodeError(f"{name}: no marker at byte {at} before the frame header")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in _JPEG_SOF:
            if at + 10 > len(data):
                break
            lines, samples_per_line, components = struct.unpack(">HHB", data[at + 5 : at + 10])
            if lines == 0:
                raise ImageDecodeError(f"{name}: frame header has 0 lines (DNL marker) - not supported")
            return lines, samples_per_line, components
        if marker in (0xDA, 0xD9):  # SOS or EOI before any frame header
            break
        at += 2 + length
    raise ImageDecodeError(f"{name} has no frame header (SOFn) before its first scan")


def _check_codestream(ds: pydicom.Dataset, transfer_syntax: UID, limits: PixelLimits) -> None:
    """Compare the first frame's codestream header with the DICOM header and the limits before any decoder runs."""
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as exc:
        raise ImageDecodeError(f"encapsulated pixel data cannot be read ({transfer_syntax.name}): {exc}") from exc
    geometry = codestream_geometry(frame, transfer_syntax)
    if geometry is None:
        return
    rows, columns, components = geometry
    _check_size(rows, columns, 1, components, int(ds.BitsAllocated), limits, f"{transfer_syntax.name} codestream")
    if (rows, columns, components) != (ds.Rows, ds.Columns, ds.SamplesPerPixel):
        raise ImageDecodeError(
            f"{transfer_syntax.name} codestream claims {rows} x {columns} x {components} (rows x columns x "
            f"components) - the DICOM header says Rows x Columns x SamplesPerPixel = {ds.Rows} x {ds.Columns} x "
            f"{ds.SamplesPerPixel}"
        )


_INFLATE_CHUNK = 1 << 20
_INFLATE_INPUT = 1 << 18
_PIXEL_DATA = 0x7FE00010
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


def _inflater(data: bytes | bytearray | memoryview) -> Callable[[int], tuple[bytes, bool]]:
    """Raw-deflate reader: ``more(n)`` returns up to n further bytes and whether the stream has ended. Input is fed
    in 256 KiB pieces (zlib copies the unconsumed input on every call)."""
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(data).cast("B")
    position = 0
    pending: bytes | memoryview = b""

    def more(n: int) -> tuple[bytes, bool]:
        nonlocal position, pending
        parts, size = [], 0
        while size < n and not z.eof:
            if not pending:
                pending = view[position : position + _INFLATE_INPUT]
                position += len(pending)
            try:
                chunk = z.decompress(pending, min(_INFLATE_CHUNK, n - size))
            except zlib.error as exc:
                raise ImageDecodeError(f"deflated dataset is corrupt: {exc}") from exc
            pending = z.unconsumed_tail
            if not chunk and not pending and position >= len(view):
                raise ImageDecodeError("deflated dataset is truncated: the deflate stream has no end")
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts), z.eof

    return more


def inflate(data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    """Inflate a raw deflate stream (no zlib header; PS3.5 A.5), never producing more than ``max_bytes``.

    Output is produced in chunks of at most 1 MiB, so a bomb costs at most ``max_bytes`` of memory, never its
    claimed size. Raises ImageTooLargeError beyond ``max_bytes``; ImageDecodeError for a corrupt or truncated stream.
    """
    body, ended = _inflater(data)(max_bytes + 1)
    if len(body) > max_bytes or not ended:
        raise ImageTooLargeError(
            f"deflated dataset inflates to more than {max_bytes / 2**20:,.0f} MiB (max_decompressed_mb) from "
            f"{len(data):,} bytes"
        )
    return body


def read_deflated_dataset(
    data: bytes | bytearray | memoryview, limits: PixelLimits = DEFAULT_LIMITS, *, head_bytes: int = 1 << 20
) -> pydicom.Dataset:
    """Parse a Deflated Explicit VR Little Endian dataset (the bytes after the file meta) within ``limits``.

    The first ``head_bytes`` are inflated and parsed first: when they hold every element before PixelData, the
    header is checked with :func:`check_pixel_limits` and PixelData's value length against ``max_bytes`` before
    the rest is inflated; the whole stream is capped at ``limits.max_bytes`` either way (pydicom and pynetdicom
    inflate without a cap).

    Raises:
        ImageTooLargeError: the header, the PixelData length or the inflated size exceeds ``limits``.
        ImageDecodeError: a corrupt or truncated deflate stream; a header attribute that is not a valid count.
    """
    more = _inflater(data)
    head, ended = more(min(head_bytes, limits.max_bytes + 1))
    fp = io.BytesIO(head)
    header = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag == _PIXEL_DATA)
    at = fp.tell()
    if head[at : at + 4] == _PIXEL_DATA_TAG:
        check_pixel_limits(header, limits)
        if len(head) >= at + 12:
            (length,) = struct.unpack("<I", head[at + 8 : at + 12])
            if length != 0xFFFFFFFF and at + 12 + length > limits.max_bytes:
                raise ImageTooLargeError(
                    f"deflated dataset too large: PixelData claims {length:,} bytes - the limit is "
                    f"{limits.max_bytes / 2**20:,.0f} MiB (max_decompressed_mb)"
                )
    del header, fp
    if ended:
        body = head
    else:
        rest, ended = more(limits.max_bytes + 1 - len(head))
        if not ended or len(head) + len(rest) > limits.max_bytes:
            raise ImageTooLargeError(
                f"deflated dataset inflates to more than {limits.max_bytes / 2**20:,.0f} MiB (max_decompressed_mb) "
                f"from {len(data):,} bytes"
            )
        body = head + rest
        del rest
    return read_dataset(io.BytesIO(body), False, True)


def read_dicom(path: str | os.PathLike[str], limits: PixelLimits = DEFAULT_LIMITS, *, force: bool = False
               ) -> pydicom.FileDataset:
    """``pydicom.dcmread`` for a Part 10 file, except that a deflated dataset is inflated with a cap
    (:func:`read_deflated_dataset`). Raises what dcmread raises, plus ImageTooLargeError and ImageDecodeError."""
    with open(path, "rb") as fp:
        preamble = read_preamble(fp, force)
        meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: BaseTag(tag).group != 2)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        data = fp.read() if deflated else b""
    if not deflated:
        return pydicom.dcmread(path, force=force)
    ds = pydicom.FileDataset(
        str(path),
        read_deflated_dataset(data, limits),
        preamble=preamble,
        file_meta=pydicom.dataset.FileMetaDataset(meta),
        is_implicit_VR=False,
        is_little_endian=True,
    )
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


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


# ---------------------------------------------------------------------------------------- files: DICOM, PNG, JPEG

_DICOM_SUFFIXES = (".dcm", ".dicom")
_PICTURE_FORMATS = ("PNG", "JPEG")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one image file into float32 ``[rows, columns]`` in [0, 1], bright = dense.

    - DICOM (the ``DICM`` marker at byte 128, or a ``.dcm``/``.dicom`` name): :func:`decode_image`.
    - PNG and JPEG, via Pillow: 8-bit grey is divided by 255. 16-bit grey is divided by ``2**b - 1``, where b is
      the PNG ``sBIT`` significant-bit count when the file has one, else the bits its largest value needs (at least
      8), so 12-bit data in a 16-bit PNG is not left dark. RGB, RGBA, CMYK, grey+alpha, palette and bilevel images
      become grey by ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``, Pillow's ``convert("L")``); alpha is
      ignored. The EXIF orientation of a JPEG is applied. 16-bit colour PNGs are read at 8 bits per sample.

    Raises:
        ImageDecodeError: the file cannot be read, is empty, is neither DICOM, PNG nor JPEG (another format
            Pillow knows is named), is truncated or corrupt, is an animated PNG, is larger than Pillow's
            decompression-bomb limit, or is a constant image; every DICOM failure of :func:`decode_image`.
            Messages start with the path.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if not head:
        raise ImageDecodeError(f"{path}: empty file")
    if head[128:132] == b"DICM" or path.suffix.lower() in _DICOM_SUFFIXES:
        return _decode_dicom_file(path, has_preamble=head[128:132] == b"DICM")
    return _decode_picture(path, significant_bits=_png_significant_bits(path) if head[:8] == _PNG_SIGNATURE else None)


def _decode_dicom_file(path: Path, *, has_preamble: bool) -> np.ndarray:
    try:
        ds = read_dicom(path, force=not has_preamble)
    except MemoryError:
        raise
    except ImageDecodeError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    except Exception as exc:
        raise ImageDecodeError(f"{path}: cannot read as DICOM ({exc})") from exc
    try:
        return decode_image(ds)
    except ImageDecodeError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def _png_significant_bits(path: Path) -> int | None:
    """The grey sample's significant bits from a PNG's sBIT chunk (PNG spec 11.3.3.4), None without one.

    Pillow does not read sBIT; it precedes the first IDAT chunk, so only the chunk headers are scanned."""
    try:
        with path.open("rb") as fh:
            fh.seek(8)
            while header := fh.read(8):
                if len(header) < 8:
                    return None
                length, kind = struct.unpack(">I4s", header)
                if kind == b"sBIT":
                    data = fh.read(length)
                    return data[0] if len(data) in (1, 2) and data[0] else None  # grey or grey+alpha only
                if kind in (b"IDAT", b"IEND"):
                    return None
                fh.seek(length + 4, os.SEEK_CUR)  # data and CRC
    except OSError:
        return None
    return None


def _decode_picture(path: Path, *, significant_bits: int | None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format not in _PICTURE_FORMATS:
                raise ImageDecodeError(
                    f"{path}: unsupported image format {im.format} - expected DICOM, PNG or JPEG"
                )
            frames = getattr(im, "n_frames", 1)
            if frames != 1:
                raise ImageDecodeError(f"{path}: animated {im.format} with {frames} frames - expected one image")
            im.load()
            fmt, mode = im.format, im.mode
            if fmt == "JPEG":
                im = ImageOps.exif_transpose(im)
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                raw = np.asarray(im, dtype=np.float64)
                if raw.size and raw.min() < 0:
                    raise ImageDecodeError(f"{path}: negative pixel values in a {mode} image")
                bits = significant_bits or max(int(raw.max(initial=0)).bit_length(), 8)
                image = raw / float(2**bits - 1)
            else:
                if mode in ("P", "PA"):
                    im = im.convert("RGBA")
                try:
                    grey = im.convert("L")
                except ValueError as exc:
                    raise ImageDecodeError(f"{path}: unsupported {fmt} pixel mode {mode!r} ({exc})") from exc
                image = np.asarray(grey, dtype=np.float64) / 255.0
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{path}: cannot decode image file - not DICOM, PNG or JPEG ({exc})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{path}: image too large to decode safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{path}: cannot decode image file - corrupt or truncated ({exc})") from exc
    if image.ndim != 2 or min(image.shape) < 1:
        raise ImageDecodeError(f"{path}: decoded to shape {image.shape} - expected a 2-D grey image")
    if image.min() == image.max():
        raise ImageDecodeError(f"{path}: constant image (every pixel {float(image.flat[0]):.3g})")
    return np.clip(image, 0.0, 1.0).astype(np.float32)
