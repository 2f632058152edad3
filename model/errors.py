"""Exceptions raised by the model package; all derive from :class:`ModelError`."""

from __future__ import annotations

__all__ = ["ImageDecodeError", "ImageTooLargeError", "ModelError"]


class ModelError(Exception):
    """Base class of every error the model package raises on purpose."""


class ImageDecodeError(ModelError, ValueError):
    """A DICOM image cannot be turned into model input.

    The message names the attribute, its value and the rule it breaks, e.g.
    ``"unsupported PhotometricInterpretation 'RGB' - expected MONOCHROME1 or MONOCHROME2"``.
    Errors from pydicom or a decoder plugin are chained as ``__cause__``.
    """


class ImageTooLargeError(ImageDecodeError):
    """An image (or a deflated dataset) is larger than the configured limits allow; nothing was decoded.

    The message names the dimensions, the size they imply and the limit, e.g. ``"image too large: Rows x Columns x
    NumberOfFrames x SamplesPerPixel = 60000 x 60000 x 1 x 1 = 3,600,000,000 pixels - the limit is 100,000,000
    (max_image_pixels)"``.
    """
