"""Tensors and weights of chexd: image preprocessing today; what other packages may use is listed here."""

from model.errors import ImageDecodeError, ModelError
from model.preprocess import ImageStats, decode_image, image_stats

__all__ = ["ImageDecodeError", "ImageStats", "ModelError", "decode_image", "image_stats"]
