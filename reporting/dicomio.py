"""Writing the documents' DICOM files: the bytes pydicom's ``dcmwrite(..., enforce_file_format=True)`` writes, faster.

The SR of one single-image study holds ~400 nested items and ~1,500 elements; pydicom's writer spends ~25 µs of
Python per element (VR look-ups, character-set handling and a buffer per element), ~35 ms per SR on a 2-core VM. The
documents chexd builds are new datasets in Explicit VR Little Endian with a handful of value kinds, so
:func:`encode` encodes those kinds itself (~2-3 µs an element) and hands every other element to pydicom's own
``write_data_element`` (person names, dates given as objects, numbers in numpy arrays, ...). Whatever it cannot
reproduce exactly - another transfer syntax, an element whose VR is still ambiguous ("US or SS"), a nested dataset
read from a file (pydicom may copy its raw bytes), a value too long for its VR's length field - makes it write the
whole file with pydicom instead. ``tests/unit/test_dicomio.py`` checks byte equality with pydicom on every kind of
object chexd writes.
"""

from __future__ import annotations

import codecs
import functools
import os
import struct
from copy import deepcopy
from pathlib import Path

import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

__all__ = ["encode", "save"]

_ITEM = b"\xfe\xff\x00\xe0"
_LONG = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)  # 2 reserved bytes and a 4-byte length
_NUMBERS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_PLAIN = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UR"})  # pydicom's write_string (DA/DT/TM: str values)
_TEXT = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})  # pydicom's write_text: the character set applies
_DEFAULT = "iso8859"  # pydicom's default_encoding for the plain VRs


class _Fallback(Exception):
    """The dataset holds something :func:`encode` does not reproduce byte for byte: let pydicom write it all."""


def _tag(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def _header(tag: int, vr: str, length: int) -> bytes:
    if vr in _LONG:
        return _tag(tag) + vr.encode() + b"\0\0" + struct.pack("<L", length)
    if length > 0xFFFF:
        raise _Fallback  # pydicom writes it as UN with a warning
    return _tag(tag) + vr.encode() + struct.pack("<H", length)


@functools.cache
def _is_utf8(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def _strings(value: object) -> str | None:
    """A str or a multi-value of str joined by backslashes (pydicom's multi_string); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, MultiValue | list | tuple) and all(isinstance(v, str) for v in value):
        return "\\".join(value)
    return None


def _value(elem: DataElement, vr: str, encodings: list[str]) -> bytes | None:
    """The encoded value of the usual kinds (as pydicom encodes them, padded to even length), None for others."""
    value = elem.value
    if vr == "UI" or vr in _PLAIN:
        text = _strings(value)
        if text is None:
            return None
        if len(text) % 2:
            text += "\0" if vr == "UI" else " "
        return text.encode(_DEFAULT)
    if vr in _TEXT:
        text = _strings(value)
        if text is None or len(encodings) != 1:
            return None
        if _is_utf8(encodings[0]):
            data = text.encode("utf-8")
        elif text.isascii() and not encodings[0].startswith("iso2022"):
            data = text.encode("ascii")  # what every other single character set makes of ASCII
        else:
            return None
        return data + b" " if len(data) % 2 else data
    if vr in ("DS", "IS"):
        values = value if isinstance(value, MultiValue | list | tuple) else (value,)
        if not all(isinstance(v, str | int | float) for v in values):
            return None
        text = "\\".join(v.original_string if hasattr(v, "original_string") else str(v) for v in values)
        return (text + " " if len(text) % 2 else text).encode(_DEFAULT)
    if vr in _NUMBERS:
        if value == "":
            return b""
        kinds = int | float
        if isinstance(value, kinds) and not isinstance(value, bool):
            return struct.pack("<" + _NUMBERS[vr], value)
        if isinstance(value, MultiValue | list) and vr != "SS" and all(isinstance(v, kinds) for v in value):
            return struct.pack(f"<{len(value)}{_NUMBERS[vr]}", *value)
        return None
    if vr in ("OB", "OW", "UN") and isinstance(value, bytes) and not elem.is_undefined_length:
        return value + b"\0" if len(value) % 2 else value
    return None


def _element(elem: DataElement, encodings: list[str], ancestors: list[Dataset]) -> bytes:
    vr = elem.VR
    if vr is not None and len(vr) != 2:  # "US or SS", "OB or OW" ...: resolved in place, as dcmwrite does
        elem = correct_ambiguous_vr_element(elem, ancestors[0], True, ancestors)
        vr = elem.VR
    if vr is None or len(vr) != 2:
        raise _Fallback
    if vr == "SQ":
        if elem.is_undefined_length:
            raise _Fallback
        body = b"".join(_item(item, encodings, ancestors) for item in elem.value)
        return _header(elem.tag, vr, len(body)) + body
    data = b"" if elem.is_empty else _value(elem, vr, encodings)
    if data is None:  # another kind of value: pydicom's own element writer
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        return fp.getvalue()
    return _header(elem.tag, vr, len(data)) + data


def _item(ds: Dataset, encodings: list[str], ancestors: list[Dataset]) -> bytes:
    if getattr(ds, "is_undefined_length_sequence_item", False):
        raise _Fallback
    body = _body(ds, encodings, [ds, *ancestors])
    return _ITEM + struct.pack("<L", len(body)) + body


def _body(ds: Dataset, parent: list[str], ancestors: list[Dataset]) -> bytes:
    """The encoded elements of ``ds``; ``ancestors``: ``ds`` and the datasets holding it, nearest first."""
    if ds.original_encoding != (None, None):
        raise _Fallback  # read from a file: pydicom may write some of it as read
    charset = ds.get("SpecificCharacterSet")
    encodings = parent if charset is None else convert_encodings(charset)
    parts = []
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group lengths are not written
            continue
        parts.append(_element(ds[tag], encodings, ancestors))
    return b"".join(parts)


def encode(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file: the bytes ``ds.save_as(f, enforce_file_format=True)`` writes (see the module
    docstring). Raises what pydicom raises for an invalid file meta or value."""
    meta = getattr(ds, "file_meta", None)
    if not isinstance(meta, FileMetaDataset) or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian \
            or any(tag >> 16 in (0, 2) for tag in ds.keys()):
        return _pydicom(ds)
    if "PixelData" in ds:  # as dcmwrite: native pixel data has a defined length
        ds["PixelData"].is_undefined_length = False
    try:
        body = _body(ds, convert_encodings(["iso8859"]), [ds])
    except _Fallback:
        return _pydicom(ds)
    meta = deepcopy(meta)
    # as dcmwrite(enforce_file_format=True): the media storage UIDs follow the dataset, the meta is validated
    for meta_keyword, keyword in (("MediaStorageSOPClassUID", "SOPClassUID"),
                                  ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        value = ds.get(keyword)
        if meta.get(meta_keyword) is None or (value and value != meta.get(meta_keyword)):
            setattr(meta, meta_keyword, value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    preamble = getattr(ds, "preamble", None) or b"\0" * 128
    fp.write(preamble + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + body


def _pydicom(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    pydicom.dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


def save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` (:func:`encode`) to ``path`` atomically: a temporary file beside it, then renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode(ds))
    os.replace(tmp, path)
