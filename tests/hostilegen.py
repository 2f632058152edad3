"""Hostile DICOM inputs, built in memory: deflate bombs, codestreams whose headers lie, raw element surgery.

Used by tests/integration/test_hostile_datasets.py, tests/unit/test_limits.py and bench/bomb.py. Every builder
returns the dataset bytes exactly as a peer would send them in a C-STORE (what follows the file meta), so a sender can
ship them unchanged; nothing here is patient data (images from tests.dicomgen).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from tests.dicomgen import make_dataset

__all__ = [
    "deflate",
    "deflate_bomb",
    "encode",
    "encode_compressed",
    "noise_image",
    "patch_j2k_size",
    "patch_jpeg_size",
    "with_pixel_element",
    "write_part10",
]

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_SIZ = b"\xff\x4f\xff\x51"


def encode(ds: Dataset, *, implicit: bool = False, little_endian: bool = True) -> bytes:
    """The dataset (without file meta) encoded as-is in explicit (or implicit) VR, little (or big) endian."""
    fp = DicomBytesIO()
    fp.is_little_endian = little_endian
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate(raw: bytes, level: int = 6) -> bytes:
    """Raw deflate (no zlib header), as Deflated Explicit VR Little Endian carries a dataset (PS3.5 A.5)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(raw) + c.flush()


def with_pixel_element(ds: Dataset, value_length: int) -> bytes:
    """Explicit VR LE bytes of ``ds`` up to, and including, a PixelData (OW) element header that declares
    ``value_length`` bytes; the value itself is not included (append it, or a stream of it)."""
    raw = encode(ds)
    at = raw.index(_PIXEL_DATA_TAG)
    return raw[:at] + _PIXEL_DATA_TAG + b"OW\x00\x00" + struct.pack("<I", value_length)


def deflate_bomb(
    rows: int, columns: int, *, pixel_bytes: int | None = None, header_padding: int = 0, seed: int = 0,
    sop_uid: str | None = None, level: int = 9,
) -> tuple[Dataset, bytes]:
    """A Deflated Explicit VR Little Endian dataset whose header says ``rows`` x ``columns`` (16-bit) and whose
    PixelData declares and holds ``pixel_bytes`` zero bytes (default: what the header implies), compressed as it
    is streamed (a 256 MiB bomb is ~255 KiB). ``header_padding`` bytes of a private OB element come before PixelData
    (a header longer than a receiver's look-ahead). Returns the (pixel-less) dataset and the deflated bytes."""
    ds = make_dataset(rows=8, columns=8, seed=seed, sop_uid=sop_uid)
    ds.Rows, ds.Columns = rows, columns
    if header_padding:
        ds.add_new(0x7FD10010, "LO", "CHEXD HOSTILE")
        ds.add_new(0x7FD11000, "OB", bytes(header_padding))
    size = rows * columns * 2 if pixel_bytes is None else pixel_bytes
    c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(with_pixel_element(ds, size))]
    zeros = bytes(1 << 20)
    left = size
    while left:
        step = min(left, len(zeros))
        parts.append(c.compress(zeros[:step]))
        left -= step
    parts.append(c.flush())
    del ds.PixelData
    return ds, b"".join(parts)


def encode_compressed(ds: Dataset, transfer_syntax: str = JPEG2000Lossless) -> tuple[Dataset, bytes]:
    """``ds`` compressed by pydicom's encoders (JPEG 2000 Lossless or JPEG-LS Lossless) and its explicit VR LE
    bytes, the encapsulated PixelData included."""
    if transfer_syntax not in (JPEG2000Lossless, JPEGLSLossless):
        raise ValueError(f"Unsupported transfer_syntax {transfer_syntax!r} - expected JPEG 2000 or JPEG-LS Lossless")
    ds = ds.copy()
    ds.compress(transfer_syntax, generate_instance_uid=False)
    return ds, encode(ds)


def patch_j2k_size(raw: bytes, rows: int, columns: int) -> bytes:
    """Make the first JPEG 2000 SIZ marker segment in ``raw`` claim ``rows`` x ``columns`` (image and one tile);
    every byte count stays the same, so the DICOM encapsulation stays valid."""
    at = raw.index(_SIZ)
    siz = bytearray(raw[at : at + 40])
    struct.pack_into(">4I", siz, 8, columns, rows, 0, 0)  # Xsiz, Ysiz, XOsiz, YOsiz
    struct.pack_into(">4I", siz, 24, columns, rows, 0, 0)  # XTsiz, YTsiz, XTOsiz, YTOsiz
    return raw[:at] + bytes(siz) + raw[at + 40 :]


def patch_jpeg_size(raw: bytes, rows: int, columns: int, marker: int = 0xF7) -> bytes:
    """Make the first JPEG frame header with ``marker`` (0xF7 JPEG-LS SOF55, 0xC0/0xC1/0xC3 JPEG SOFn) in ``raw``
    claim ``rows`` x ``columns``."""
    at = raw.index(bytes([0xFF, marker]))
    return raw[: at + 5] + struct.pack(">HH", rows, columns) + raw[at + 9 :]


def noise_image(rows: int = 64, columns: int = 64, seed: int = 0) -> np.ndarray:
    """Random 12-bit grey values (a decodable, non-constant image)."""
    return np.random.default_rng(seed).integers(0, 4096, size=(rows, columns), dtype=np.uint16)


def write_part10(path: Path, sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes) -> Path:
    """A Part 10 file: preamble, file meta naming ``sop_class``/``sop_instance``/``transfer_syntax``, then
    ``dataset`` exactly (whatever it holds). pynetdicom's chunked sender ships those bytes unchanged."""
    from tests.integration.peers import write_raw

    return write_raw(path, sop_class, sop_instance, dataset, transfer_syntax)
