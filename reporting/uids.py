"""Deterministic UIDs for result objects, so that re-sending a result never creates a duplicate in a PACS.

A UID is ``2.25.<n>`` (PS3.5 B.2: a UUID as a decimal integer) where the UUID is a name-based (SHA-1, RFC 4122
version 5) UUID of the inputs under a chexd namespace. The same inputs always give the same UID; any change gives
another one:

- :func:`instance_uid` — a result's SOP Instance UID, from its content ``kind`` ("sr", "pdf", "sc:Effusion", ...),
  the source SOP Instance UID(s) it is about (order-independent), the model version and the report revision.
- :func:`content_uid` — a result that does not depend on the report revision (a heatmap SC or Parametric Map of one
  source image and finding): from its ``kind``, the source SOP Instance UID, the model version and a digest of its
  pixels. An unchanged object keeps its UID in every revision, so a revision need not send it again.
- :func:`series_uid` — one series per study and kind ("sr", "pdf", "sc"), whatever the model version or revision, so
  every revision lands in the same series and a predecessor's series is known.
- :func:`derived_uid` — any other identifier derived from a name (tracking identifiers, device UIDs).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

import numpy as np
from pydicom.uid import UID

from reporting.errors import ReportError

__all__ = ["content_digest", "content_uid", "derived_uid", "instance_uid", "series_uid"]

_NAMESPACE = uuid.UUID("6f3c1a52-2d5e-5b8e-9c1f-6368657864a1")  # fixed forever: changing it changes every UID


def derived_uid(*parts: str) -> UID:
    """``2.25.<uuid5 of the parts>``; raises ReportError for no parts or an empty part."""
    if not parts or any(not p for p in parts):
        raise ReportError(f"Invalid UID parts {parts!r} - need at least one non-empty part")
    name = "\x1f".join(parts)  # unit separator: ("a", "bc") and ("ab", "c") differ
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


def instance_uid(kind: str, sources: Iterable[str], model_version: str, revision: int) -> UID:
    """SOP Instance UID of a result of ``kind`` about the ``sources`` (SOP Instance UIDs), by ``model_version``,
    for report ``revision`` (>= 1). Raises ReportError for no sources or revision < 1."""
    uids = sorted(set(sources))
    if not uids:
        raise ReportError("Invalid sources - a result needs at least one source SOP Instance UID")
    if revision < 1:
        raise ReportError(f"Invalid revision {revision} - must be >= 1")
    return derived_uid("instance", kind, model_version, str(revision), *uids)


def series_uid(kind: str, study_instance_uid: str) -> UID:
    """Series Instance UID of the ``kind`` results ("sr", "pdf", "sc") in a study."""
    return derived_uid("series", kind, study_instance_uid)


def content_digest(pixels: np.ndarray) -> str:
    """SHA-256 (hex) of an array's dtype, shape and bytes (C order): equal digests mean equal pixels."""
    array = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.data)
    return digest.hexdigest()


def content_uid(kind: str, source: str, model_version: str, pixels: np.ndarray) -> UID:
    """SOP Instance UID of a per-image result of ``kind`` ("sc:Effusion", "pm:Effusion") about ``source`` (one SOP
    Instance UID) by ``model_version``, showing ``pixels``; independent of the report revision, so the same content
    keeps its UID across revisions. Raises ReportError for an empty kind, source or model version."""
    return derived_uid("content", kind, source, model_version, content_digest(pixels))
