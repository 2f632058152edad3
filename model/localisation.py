"""How well a class activation map points at a known lesion: pointing game and IoU against a mask (numpy only).

A CAM ``[h, w]`` (logit units, e.g. ``Prediction.cams[c]``) is compared with a boolean lesion mask ``[H, W]`` on
the mask's pixel grid. The CAM is assumed to span the mask's whole extent (a square image fed to the network
without a crop, as the chest phantom is); when preprocessing padded or cropped the image, map the mask to the
network's field of view first.

- :func:`upsample_cam`: bilinear upsampling with half-pixel centres and clamped edges (the convention of
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` and OpenCV's ``INTER_LINEAR``).
- :func:`cam_peak`: where the upsampled CAM is maximal. Bilinear interpolation peaks at a cell centre, so this is
  the hottest pixel next to the centre of the CAM's largest cell (the first largest cell in row-major order on a
  tie). Looking only there matters: with clamped edges, a border cell's value fills a plateau out to the image edge,
  and a plain argmax of the upsampled map would point at the image corner.
- :func:`pointing_game`: hit when that peak lies in the mask, or within ``tolerance_px`` of it (Zhang et al.,
  "Top-down neural attention by excitation backprop", ECCV 2016, used 15 px at the original resolution).
- :func:`cam_iou`: the ReLU'd, upsampled CAM binarised at ``threshold_fraction`` of its maximum, IoU with the mask.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cam_iou", "cam_peak", "point_hits", "pointing_game", "region_iou", "upsample_cam"]


def _check_cam(cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam)
    if cam.ndim != 2 or min(cam.shape) < 1:
        raise ValueError(f"Invalid cam shape {cam.shape} - expected a 2-D map [h, w]")
    if not np.issubdtype(cam.dtype, np.number) or not np.all(np.isfinite(cam)):
        raise ValueError("Invalid cam - expected finite numbers")
    return cam.astype(np.float64, copy=False)


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(int(shape[0]), int(shape[1])) < 1:
        raise ValueError(f"Invalid shape {tuple(shape)} - expected (rows, columns) >= 1")
    return int(shape[0]), int(shape[1])


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"Invalid mask {mask.shape} {mask.dtype} - expected bool [H, W]")
    if not mask.any():
        raise ValueError("Invalid mask: empty - localisation is defined only for a finding present in the image")
    return mask


def _axis_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear weights [n_out, n_in] along one axis: half-pixel centres, source coordinate clamped to the edges."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), i1), frac)
    return weights


def upsample_cam(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (or downsampling, without antialiasing) of ``cam`` [h, w] to ``shape`` (rows, columns).

    Float64 [rows, columns], same units as ``cam``; no ReLU. Raises ValueError for a non-2-D or non-finite CAM or
    a non-positive shape."""
    cam = _check_cam(cam)
    rows, cols = _check_shape(shape)
    return _axis_matrix(rows, cam.shape[0]) @ cam @ _axis_matrix(cols, cam.shape[1]).T


def cam_peak(cam: np.ndarray, shape: tuple[int, int]) -> tuple[int, int] | None:
    """(row, column) on a ``shape`` grid where the upsampled ``cam`` peaks: next to the centre of its largest cell.

    None for a constant CAM (no peak to point with). Raises ValueError like :func:`upsample_cam`."""
    cam = _check_cam(cam)
    rows, cols = _check_shape(shape)
    if cam.max() == cam.min():
        return None
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    h, w = cam.shape
    # the cell centre usually falls between pixels: of the (up to) 2x2 pixels nearest to it, take the hottest
    r0, c0 = _nearest(i, h, rows), _nearest(j, w, cols)
    wr, wc = _axis_matrix(rows, h)[r0], _axis_matrix(cols, w)[c0]
    k, m = np.unravel_index(int(np.argmax(wr @ cam @ wc.T)), (len(r0), len(c0)))
    return int(r0[k]), int(c0[m])


def _nearest(cell: int, n_cells: int, n_px: int) -> np.ndarray:
    """Pixel indices (1 or 2) whose centres are nearest to the centre of CAM cell ``cell`` on an ``n_px`` axis."""
    u = (cell + 0.5) * n_px / n_cells - 0.5  # the cell centre in pixel-index coordinates
    return np.unique(np.clip([np.floor(u), np.ceil(u)], 0, n_px - 1).astype(np.intp))


def point_hits(point: tuple[int, int] | None, mask: np.ndarray, *, tolerance_px: float = 0.0) -> bool:
    """True when ``point`` (row, column) is a mask pixel or within ``tolerance_px`` (Euclidean, in mask pixels) of
    one. None (no peak) is a miss. Raises ValueError for an empty or non-bool mask, a point outside the mask's grid
    or a negative tolerance."""
    mask = _check_mask(mask)
    if tolerance_px < 0:
        raise ValueError(f"Invalid tolerance_px {tolerance_px!r} - must be >= 0")
    if point is None:
        return False
    r, c = int(point[0]), int(point[1])
    if not (0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]):
        raise ValueError(f"Invalid point ({r}, {c}) - outside the {mask.shape[0]}x{mask.shape[1]} mask")
    if mask[r, c]:
        return True
    if tolerance_px == 0:
        return False
    rr, cc = np.nonzero(mask)
    return bool(((rr - r) ** 2 + (cc - c) ** 2).min() <= tolerance_px**2)


def pointing_game(cam: np.ndarray, mask: np.ndarray, *, tolerance_px: float = 0.0) -> bool:
    """Pointing-game hit: the peak of ``cam`` [h, w] upsampled to the mask's grid lies within ``tolerance_px``
    (Euclidean distance in mask pixels; 0 = strictly inside) of the lesion ``mask`` [H, W] (bool).

    A constant CAM points nowhere and misses. Raises ValueError for an empty or non-bool mask, a bad CAM or a
    negative tolerance."""
    mask = _check_mask(mask)
    return point_hits(cam_peak(cam, mask.shape), mask, tolerance_px=tolerance_px)


def region_iou(region: np.ndarray, mask: np.ndarray) -> float:
    """Intersection over union of two bool maps of the same shape, in [0, 1]; ``mask`` must not be empty."""
    mask = _check_mask(mask)
    region = np.asarray(region)
    if region.shape != mask.shape or region.dtype != np.bool_:
        raise ValueError(f"Invalid region {region.shape} {region.dtype} - expected bool {mask.shape}")
    return float(np.logical_and(region, mask).sum() / np.logical_or(region, mask).sum())


def cam_iou(cam: np.ndarray, mask: np.ndarray, *, threshold_fraction: float = 0.5) -> float:
    """IoU of the CAM's hot region with ``mask`` [H, W] (bool), in [0, 1].

    The hot region is ``upsample_cam(max(cam, 0), mask.shape) >= threshold_fraction * its maximum`` (ReLU at the
    CAM's resolution, as Grad-CAM does, then bilinear upsampling). A CAM with no positive value has an empty hot
    region (IoU 0). Raises ValueError for ``threshold_fraction`` outside (0, 1], an empty or non-bool mask, or a
    bad CAM."""
    if not 0.0 < threshold_fraction <= 1.0:
        raise ValueError(f"Invalid threshold_fraction {threshold_fraction!r} - must be in (0, 1]")
    mask = _check_mask(mask)
    heat = upsample_cam(np.maximum(_check_cam(cam), 0.0), mask.shape)
    top = float(heat.max())
    if top <= 0.0:
        return 0.0
    return region_iou(heat >= threshold_fraction * top, mask)
