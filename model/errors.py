"""Exceptions raised by the model package; all derive from :class:`ModelError`."""

from __future__ import annotations

__all__ = ["ImageDecodeError", "ModelError"]


class ModelError(Exception):
    """Base class of every error the model package raises on purpose."""


class ImageDecodeError(ModelError, ValueError):
    """A DICOM image cannot be turned into model input.

    The message names the attribute, its value and the rule it breaks, e.g.
    ``"unsupported PhotometricInterpretation 'RGB' - expected MONOCHROME1 or MONOCHROME2"``.
    Errors from pydicom or a decoder plugin are chained as ``__cause__``.
    """
