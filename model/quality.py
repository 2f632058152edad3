"""Input-quality checks on a decoded chest radiograph, before any resizing: is the image usable at all?

Each check returns a :class:`model.types.QualityIssue` with a sentence for the report that names the measured value
and the rule. The pixels are what :func:`model.preprocess.decode_image` returns: float [rows, columns] in [0, 1],
bright = dense, already in MONOCHROME2 orientation (a MONOCHROME1 image has been inverted), so an image whose
header's PhotometricInterpretation contradicts its pixels shows up here as an inverted chest film.

Checks (thresholds measured on the phantom and the real radiographs in ../shared/data/real-cxr, see bench/README.md):

- ``too_few_pixels``: the shorter side is below ``min_side`` (default 224, the network's input side): the model
  would see an upsampled image.
- ``constant``: the 1st..99th percentile range is below 0.05 of the display range (phantom >= 0.84, real >= 0.72).
- ``saturated``: more than 25% of pixels clipped white (phantom <= 6%, real <= 0.2%) or more than 60% clipped black
  (phantom <= 27%, real <= 12%).
- ``noisy``: the pixel noise (MAD of horizontal neighbour differences / sqrt(2), robust to edges) exceeds 0.06 of
  the image's 5th..95th percentile range (phantom <= 0.024, real <= 0.014; phantom + Gaussian noise sigma 0.1 >=
  0.076). The model sees the image downsampled, which averages noise away, so the applicability score alone misses
  heavy noise (bench/README.md); this check does not.
- ``inverted``: the chest's middle third (mediastinum, spine) is darker than the two lateral lung bands, by more
  than 0.15 of the image's 5th..95th percentile range. On the phantom the cue
  ``(median(centre) - median(lateral)) / range`` is >= 0.15 for 200 of 200 images (<= -0.15 inverted); on 33 real
  radiographs it is -0.03..0.60, and -0.46 for the real image relabelled MONOCHROME1 (Fake_MONOHR1.dcm). Values
  between -0.15 and 0 are not called (a white-out or a lateral view can flatten the relation).

Lungs not found / cut off is not checked here: the lung-field estimate lives in ``reporting.regions`` and ``model``
does not import ``reporting``; the reporting side turns its ``LungFields.method == "grid"`` into that issue.
"""

from __future__ import annotations

import numpy as np

from model.types import QualityIssue

__all__ = [
    "BLACK_SHARE",
    "INVERTED_CUE",
    "MIN_RANGE",
    "MIN_SIDE",
    "NOISE_SHARE",
    "WHITE_SHARE",
    "check_pixels",
    "inversion_cue",
    "noise_level",
]

MIN_SIDE = 224
MIN_RANGE = 0.05
WHITE_SHARE = 0.25
BLACK_SHARE = 0.60
INVERTED_CUE = -0.15
NOISE_SHARE = 0.06
_CLIP = 1.0 / 512.0
_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "")


def inversion_cue(pixels: np.ndarray) -> float:
    """``(median of the centre band - median of the two lateral bands) / (p95 - p5)`` over rows 30..70% of the
    height; centre = columns 42..58%, lateral = 15..35% and 65..85%. Positive on a chest film shown bright = dense
    (mediastinum brighter than the lungs), negative when inverted; 0.0 for an image with no spread."""
    rows, cols = pixels.shape
    band = pixels[int(0.3 * rows) : max(int(0.7 * rows), int(0.3 * rows) + 1)]
    centre = float(np.median(band[:, int(0.42 * cols) : max(int(0.58 * cols), int(0.42 * cols) + 1)]))
    lateral = np.concatenate(
        [
            band[:, int(0.15 * cols) : max(int(0.35 * cols), int(0.15 * cols) + 1)].ravel(),
            band[:, int(0.65 * cols) : max(int(0.85 * cols), int(0.65 * cols) + 1)].ravel(),
        ]
    )
    p5, p95 = np.percentile(pixels, [5, 95])
    spread = float(p95 - p5)
    if spread <= 1e-6:
        return 0.0
    return (centre - float(np.median(lateral))) / spread


def noise_level(pixels: np.ndarray) -> float:
    """Noise standard deviation as a share of the image's 5th..95th percentile range: the median absolute deviation
    of horizontal neighbour differences / 0.6745 / sqrt(2) (edges are rare, so the median ignores them)."""
    d = np.diff(pixels.astype(np.float64), axis=1)
    if d.size == 0:
        return 0.0
    sigma = float(np.median(np.abs(d - np.median(d)))) / 0.6745 / np.sqrt(2.0)
    p5, p95 = np.percentile(pixels, [5, 95])
    return sigma / max(float(p95 - p5), 1e-6)


def check_pixels(pixels: np.ndarray, *, photometric: str, min_side: int = MIN_SIDE) -> tuple[QualityIssue, ...]:
    """Quality issues of one decoded image (float [rows, columns] in [0, 1], bright = dense, before resizing).

    ``photometric``: the header's PhotometricInterpretation ("MONOCHROME1" / "MONOCHROME2"; "" for PNG/JPEG), named
    in the inverted-image reason. Returns an empty tuple for a usable image. A constant image is reported as
    ``constant`` only (the other checks would be meaningless). Raises ValueError for a non-2-D array, values outside
    [0, 1] or NaN, or an unknown ``photometric``."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"Invalid pixels shape {pixels.shape} - expected a 2-D grey image [rows, columns]")
    if photometric not in _PHOTOMETRIC:
        raise ValueError(f"Invalid photometric {photometric!r} - expected MONOCHROME1, MONOCHROME2 or ''")
    if min_side < 1:
        raise ValueError(f"Invalid min_side {min_side} - must be >= 1")
    pixels = pixels.astype(np.float32, copy=False)
    if not np.all(np.isfinite(pixels)) or float(pixels.min()) < 0.0 or float(pixels.max()) > 1.0:
        raise ValueError("Invalid pixels - expected finite values in [0, 1] (decoded, bright = dense)")
    issues: list[QualityIssue] = []
    rows, cols = pixels.shape
    if min(rows, cols) < min_side:
        issues.append(
            QualityIssue(
                code="too_few_pixels",
                reason=f"the image is {rows}x{cols} px; at least {min_side} px a side are needed (the model's input "
                "side), so it would be upsampled",
            )
        )
    p1, p99 = (float(v) for v in np.percentile(pixels, [1, 99]))
    if p99 - p1 < MIN_RANGE:
        issues.append(
            QualityIssue(
                code="constant",
                reason=f"the image is nearly constant: 98% of its pixels lie within {p99 - p1:.3f} of the display "
                f"range (a usable radiograph spans at least {MIN_RANGE})",
            )
        )
        return tuple(issues)
    white = float((pixels >= 1.0 - _CLIP).mean())
    black = float((pixels <= _CLIP).mean())
    if white > WHITE_SHARE or black > BLACK_SHARE:
        which = f"{white:.0%} of pixels clipped white" if white > WHITE_SHARE else f"{black:.0%} clipped black"
        issues.append(
            QualityIssue(
                code="saturated",
                reason=f"the image is saturated: {which} (limits {WHITE_SHARE:.0%} white, {BLACK_SHARE:.0%} black); "
                "detail there is lost",
            )
        )
    noise = noise_level(pixels)
    if noise > NOISE_SHARE:
        issues.append(
            QualityIssue(
                code="noisy",
                reason=f"the image is very noisy: pixel noise {noise:.3f} of the image's range (rule: at most "
                f"{NOISE_SHARE}; radiographs measured <= 0.024)",
            )
        )
    cue = inversion_cue(pixels)
    if cue < INVERTED_CUE:
        told = f"for {photometric}" if photometric else "as stored (PNG/JPEG: bright = dense)"
        issues.append(
            QualityIssue(
                code="inverted",
                reason=f"the image looks inverted {told}: the mediastinum is darker than the lungs (contrast "
                f"{cue:.2f} of the image's range; a chest film shown bright = dense has > 0, rule < {INVERTED_CUE})",
            )
        )
    return tuple(issues)
