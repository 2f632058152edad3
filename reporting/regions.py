"""Map a finding's class activation map to named anatomical zones of the lung fields found in the image itself.

Radiological convention throughout: the image is viewed as if facing the patient, so the **patient's right is on the
image left** (small column indices). "right upper zone" is the patient's right.

Lung fields (:func:`estimate_lung_fields`) are estimated from the decoded image (bright = dense) at a working
resolution of 128 px on the long side: the lungs are the two large dark regions inside the chest. Candidates are
dark components below a scan of intensity thresholds, eroded so that thin bridges to dark background break, kept
when they are plausibly a lung (size, height, side of the image, not touching the border, brighter chest wall
lateral to them, brighter mediastinum between the pair) and scored by their contrast with the ring around them; the
best per side is then grown through higher thresholds while it does not leak (a leak towards the border or across
the midline is cut at its narrowest neck with a watershed on the distance transform). When no plausible pair is
found (an inverted or non-chest image, a white-out) a fixed **grid** of two lung-shaped boxes is used instead and
:attr:`LungFields.method` says "grid" with the reason.

Zones per lung: its vertical extent (top to bottom of the field) is split into the apex (top 15%), upper, middle and
lower zones (thirds of the height; the apex is carved out of the upper third); the costophrenic angle is the
lateral half of the bottom 20%. Each lung's field is filled row by row between its medial and lateral edges,
widened by a margin of 4% of the image width and extended below its base by 15% of its height, so heat at the pleura,
in fluid layering at the base or in a blunted costophrenic angle (which the dark-region estimate misses) still
counts for that lung's lower zone or angle.
Between the two fields: the mediastinum above 55% of the lungs' height, the cardiac silhouette below it. Everything
else is "outside lungs".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from model.types import PreprocessRecipe
from reporting.errors import ReportError

__all__ = [
    "OUTSIDE",
    "ZONES",
    "OUTSIDE_TEXT",
    "LungFields",
    "MainRegion",
    "RegionShare",
    "cam_peak",
    "cam_to_image",
    "estimate_lung_fields",
    "main_region",
    "outside_share",
    "peak_zone",
    "region_shares",
]

ZONES: tuple[str, ...] = (
    "right apex",
    "right upper zone",
    "right middle zone",
    "right lower zone",
    "right costophrenic angle",
    "left apex",
    "left upper zone",
    "left middle zone",
    "left lower zone",
    "left costophrenic angle",
    "mediastinum",
    "cardiac silhouette",
)
OUTSIDE = "outside lungs"
OUTSIDE_TEXT = "outside the lung fields"  # how the documents name OUTSIDE
_Z = {name: i for i, name in enumerate(ZONES)}

WORKING_SIDE = 128  # px on the long side
_APEX, _CP_HEIGHT, _CP_LATERAL, _HEART_TOP, _MARGIN, _BELOW = 0.15, 0.2, 0.5, 0.55, 0.04, 0.15


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionShare:
    """The share of a finding's heat (ReLU of its CAM) that falls in one zone: ``share`` in [0, 1]."""

    zone: str
    share: float

    def __post_init__(self) -> None:
        if self.zone not in _Z:
            raise ReportError(f"Invalid zone {self.zone!r} - expected one of {list(ZONES)}")
        if not 0.0 <= self.share <= 1.0 + 1e-6:
            raise ReportError(f"Invalid share {self.share!r} for {self.zone!r} - must be in [0, 1]")


@dataclass(frozen=True, kw_only=True, slots=True)
class LungFields:
    """Lung fields and the zone map of one image, at the working resolution.

    - ``method``: "image" (estimated from the pixels) or "grid" (the fixed fallback; ``note`` says why).
    - ``zones``: int8 [h, w], index into :data:`ZONES`, -1 outside every zone.
    - ``right_lung``, ``left_lung``: bool [h, w], the patient's right (image left) and left lung fields.
    - ``image_shape``: (rows, columns) of the source image the working grid covers.
    """

    method: Literal["image", "grid"]
    note: str
    zones: np.ndarray
    right_lung: np.ndarray
    left_lung: np.ndarray
    image_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.zones.shape[0]), int(self.zones.shape[1]))

    def zone_at(self, row: float, col: float) -> str:
        """Zone name at source-image pixel (row, col); :data:`OUTSIDE` when in none."""
        h, w = self.shape
        r = min(max(int(row * h / self.image_shape[0]), 0), h - 1)
        c = min(max(int(col * w / self.image_shape[1]), 0), w - 1)
        z = int(self.zones[r, c])
        return OUTSIDE if z < 0 else ZONES[z]

    def lungs_at(self, shape: tuple[int, int]) -> np.ndarray:
        """Both lung fields resampled (nearest) to ``shape``: bool [rows, columns]."""
        lungs = self.right_lung | self.left_lung
        rows = np.minimum((np.arange(shape[0]) + 0.5) * lungs.shape[0] / shape[0], lungs.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(shape[1]) + 0.5) * lungs.shape[1] / shape[1], lungs.shape[1] - 1).astype(int)
        return lungs[np.ix_(rows, cols)]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as plain arrays (for an .npz archive: no pickling); :meth:`from_arrays` reads them back."""
        return {"method": np.array(self.method), "note": np.array(self.note), "zones": self.zones,
                "right_lung": self.right_lung, "left_lung": self.left_lung,
                "image_shape": np.array(self.image_shape, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LungFields:
        """Fields written by :meth:`to_arrays`. Raises ReportError when the arrays do not describe lung fields."""
        try:
            method = str(arrays["method"])
            zones = np.asarray(arrays["zones"], dtype=np.int8)
            right, left = np.asarray(arrays["right_lung"], dtype=bool), np.asarray(arrays["left_lung"], dtype=bool)
            rows, columns = (int(v) for v in np.asarray(arrays["image_shape"]).ravel())
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"Invalid archived lung fields - {exc}") from None
        if method not in ("image", "grid") or zones.ndim != 2 or not right.shape == left.shape == zones.shape:
            raise ReportError(f"Invalid archived lung fields - method {method!r}, zones {zones.shape}, lungs "
                              f"{right.shape}/{left.shape}")
        return cls(method=method, note=str(arrays.get("note", "")), zones=zones, right_lung=right,  # type: ignore[arg-type]
                   left_lung=left, image_shape=(rows, columns))


# ------------------------------------------------------------------------------------------- CAM -> image geometry


def _axis_taps(
    n_out: int, n_src: int, full: int, n_cells: int, recipe: PreprocessRecipe | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps from CAM cells to output pixels along one axis: (i0, i1, w0, w1), each [n_out]; output pixel
    k = w0[k] * cell i0[k] + w1[k] * cell i1[k].

    Inverts model.engine.prepare: the source axis of ``n_src`` px is zero-padded (centred) to ``full`` (the square
    side), resized to ``side`` and centre-cropped to ``input_size``; CAM cell k covers the crop's k-th 1/n_cells.
    Pixels outside the crop get no heat (both weights 0)."""
    side = (recipe.resize or recipe.input_size) if recipe else full
    input_size = recipe.input_size if recipe else full
    top = (side - input_size) // 2
    pad = (full - n_src) // 2
    src = (np.arange(n_out) + 0.5) * n_src / n_out  # source coordinate of each output pixel centre
    v = (src + pad) * side / full - top
    q = np.clip(v * n_cells / input_size - 0.5, 0.0, n_cells - 1)
    i0 = np.floor(q).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_cells - 1)
    frac = q - i0
    inside = (v >= 0) & (v <= input_size)
    return i0, i1, np.where(inside, 1.0 - frac, 0.0), np.where(inside, frac, 0.0)


def _axis_weights(n_out: int, n_src: int, full: int, n_cells: int, recipe: PreprocessRecipe | None) -> np.ndarray:
    """The taps of :func:`_axis_taps` as a dense matrix [n_out, n_cells] (float64)."""
    i0, i1, w0, w1 = _axis_taps(n_out, n_src, full, n_cells, recipe)
    weights = np.zeros((n_out, n_cells), dtype=np.float64)
    np.add.at(weights, (np.arange(n_out), i0), w0)
    np.add.at(weights, (np.arange(n_out), i1), w1)
    return weights


def cam_to_image(
    cam: np.ndarray,
    shape: tuple[int, int],
    recipe: PreprocessRecipe | None = None,
    *,
    source_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """A finding's heat on an image grid: ReLU of ``cam`` (float [h, w], logit units), upsampled bilinearly.

    ``shape``: (rows, columns) of the output grid, which covers the source image of ``source_shape`` (default
    ``shape``). ``recipe``: the model's preprocessing (square padding, resize, centre crop are inverted); None means
    the CAM spans the whole zero-padded square image. Returns float32 [rows, columns] >= 0, in logit units.

    Raises ReportError for a CAM that is not 2-D or a non-positive shape."""
    if cam.ndim != 2:
        raise ReportError(f"Invalid cam shape {cam.shape} - expected [h, w]")
    rows, cols = int(shape[0]), int(shape[1])
    src_rows, src_cols = source_shape or (rows, cols)
    if min(rows, cols, src_rows, src_cols) < 1:
        raise ReportError(f"Invalid shape {shape} / source_shape {source_shape} - sides must be >= 1")
    full = max(src_rows, src_cols)
    # Separable and sparse (two taps per output pixel and axis): interpolate the columns of the small CAM first, then
    # combine two of its rows per output row. No BLAS: a threaded matrix product of these shapes cost 5-15 ms of CPU
    # on a busy 2-core machine, this costs about 0.5 ms for a 256 x 256 grid.
    r0, r1, a0, a1 = _axis_taps(rows, src_rows, full, cam.shape[0], recipe)
    c0, c1, b0, b1 = _axis_taps(cols, src_cols, full, cam.shape[1], recipe)
    relu = np.maximum(cam.astype(np.float64), 0.0)
    across = (relu[:, c0] * b0 + relu[:, c1] * b1).astype(np.float32)  # [h, cols]
    heat = across[r0] * a0[:, None].astype(np.float32) + across[r1] * a1[:, None].astype(np.float32)
    return heat.astype(np.float32, copy=False)


def cam_peak(cam: np.ndarray, shape: tuple[int, int], recipe: PreprocessRecipe | None = None) -> tuple[int, int]:
    """(row, column) in source pixels of the CAM's maximum (a cell centre, where the bilinear heat peaks).

    ``shape``: the source image (rows, columns); the peak is clipped into the image."""
    h, w = cam.shape
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    full = max(shape)

    def back(k: int, n_cells: int, n_src: int) -> int:
        side = (recipe.resize or recipe.input_size) if recipe else full
        input_size = recipe.input_size if recipe else full
        u = (k + 0.5) * input_size / n_cells + (side - input_size) // 2
        src = u * full / side - (full - n_src) // 2
        return min(max(int(math.floor(src)), 0), n_src - 1)

    return back(int(i), h, shape[0]), back(int(j), w, shape[1])


# ------------------------------------------------------------------------------------------------- lung fields


@functools.lru_cache(maxsize=32)
def _disk(radius: int) -> np.ndarray:
    """A read-only disk structuring element (built once: the segmentation asks for one ~100 times per image)."""
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = x * x + y * y <= radius * radius
    disk.flags.writeable = False
    return disk


def _working(image: np.ndarray) -> np.ndarray:
    """The image area-averaged down to WORKING_SIDE px on the long side (float32)."""
    img = np.asarray(image, dtype=np.float32)
    f = WORKING_SIDE / max(img.shape)
    if f < 1.0:
        size = (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f)))
        img = np.asarray(Image.fromarray(img, mode="F").resize(size, Image.Resampling.BOX), dtype=np.float32)
    return img


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


@dataclass(slots=True)
class _Candidate:
    side: str  # "R" (image left) or "L"
    mask: np.ndarray
    threshold: float
    score: float


_RADII = (1, 3)  # erosion radii of the candidate search


def _local_max(g: np.ndarray) -> dict[int, np.ndarray]:
    """Per erosion radius, the maximum of ``g`` over each pixel's disk (pixels outside the image ignored).

    ``binary_erosion(g < t, disk, border_value=1)`` is exactly ``local_max < t``: a pixel survives when every
    pixel of its disk inside the image is below t. One grey filter per radius replaces an erosion per radius and
    threshold (28 per image)."""
    return {r: ndi.maximum_filter(g, footprint=_disk(r), mode="constant", cval=-np.inf) for r in _RADII}


def _candidates(g: np.ndarray, t: float, local_max: dict[int, np.ndarray] | None = None) -> list[_Candidate]:
    """Plausible single-lung components of ``g < t`` (``local_max``: :func:`_local_max` of ``g``, if known)."""
    h, w = g.shape
    raw = g < t
    out = []
    band_width = max(2, w // 20)
    local_max = local_max or _local_max(g)
    for radius in _RADII:
        lab, n = ndi.label(local_max[radius] < t)
        for k, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w:
                continue
            if (sl[0].stop - sl[0].start) < 0.2 * h or (sl[1].stop - sl[1].start) > 0.45 * w:
                continue
            # work in a window around the component: its dilation, the ring and the chest-wall band fit inside
            pad = radius + band_width + 4
            r0, r1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
            c0, c1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
            sub_g, sub_raw = g[r0:r1, c0:c1], raw[r0:r1, c0:c1]
            part = lab[r0:r1, c0:c1] == k
            if part.sum() < 0.005 * h * w:
                continue
            sub = ndi.binary_dilation(part, _disk(1), iterations=radius, mask=sub_raw)
            area = int(sub.sum())
            if not 0.02 * h * w <= area <= 0.3 * h * w:
                continue
            rows, cols = np.nonzero(sub)
            top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            if bottom - top < 0.25 * h or c0 + left < 0.03 * w or c0 + right > 0.97 * w:
                continue
            cy, cx = r0 + rows.mean(), c0 + cols.mean()
            side = "R" if cx < 0.5 * w else "L"
            if not 0.2 * h <= cy <= 0.7 * h:
                continue
            if side == "R" and not (0.12 * w <= cx <= 0.48 * w and c0 + right <= 0.6 * w):
                continue
            if side == "L" and not (0.52 * w <= cx <= 0.88 * w and c0 + left >= 0.4 * w):
                continue
            inside = float(sub_g[sub].mean())
            if side == "R":
                band = sub_g[top:bottom, max(0, left - band_width) : left]
            else:
                band = sub_g[top:bottom, right : right + band_width]
            if band.size == 0 or float(band.mean()) < inside + 0.08:  # no brighter chest wall lateral to it
                continue
            ring = ndi.binary_dilation(sub, _disk(1), iterations=3) & ~sub
            contrast = float(sub_g[ring].mean()) - inside
            if contrast < 0.05:
                continue
            mask = np.zeros_like(raw)
            mask[r0:r1, c0:c1] = sub
            out.append(_Candidate(side, mask, t, contrast * math.sqrt(area)))
    return out


def _cut_leak(comp: np.ndarray, seed: np.ndarray, radius: int) -> np.ndarray | None:
    """The part of ``comp`` geodesically nearer ``seed`` than its other cores (watershed on the distance map)."""
    dist = ndi.distance_transform_edt(comp)
    core = ndi.binary_erosion(comp, _disk(radius))
    lab, _ = ndi.label(core)
    seeds = np.unique(lab[seed & core])
    seeds = seeds[seeds > 0]
    if len(seeds) == 0:
        return None
    markers = np.where(core, 2, 0).astype(np.int16)
    markers[np.isin(lab, seeds)] = 1
    markers[~comp] = 3
    cost = np.clip(255.0 - dist * 8.0, 0, 255).astype(np.uint8)
    cost[~comp] = 255
    return (ndi.watershed_ift(cost, markers) == 1) & comp


def _grow(g: np.ndarray, seed: np.ndarray, levels: np.ndarray, side: str) -> np.ndarray:
    h, w = g.shape
    current = seed
    for t in levels:
        lab, _ = ndi.label(g < t)
        ids = np.unique(lab[current])
        comp = np.isin(lab, ids[ids > 0])
        crosses = comp[:, int(0.6 * w) :].any() if side == "R" else comp[:, : int(0.4 * w)].any()
        if _touches_border(comp) or crosses:
            cut = _cut_leak(comp, current, radius=3)
            if cut is None or _touches_border(cut) or cut.sum() > 1.5 * current.sum() + 0.02 * h * w:
                break
            comp = cut
        if comp.sum() > 0.3 * h * w:
            break
        current = comp | current
    return current


def _pair_problem(right: np.ndarray, left: np.ndarray, g: np.ndarray) -> str | None:
    """Why two lung candidates are not a plausible pair (None when they are)."""
    h, w = g.shape
    r_rows, l_rows = np.flatnonzero(right.any(axis=1)), np.flatnonzero(left.any(axis=1))
    top, bottom = max(r_rows[0], l_rows[0]), min(r_rows[-1], l_rows[-1])
    if bottom - top < 0.5 * min(len(r_rows), len(l_rows)):
        return "the two dark regions do not overlap vertically"
    gaps = []
    gap_mask = np.zeros_like(right)
    for y in range(top, bottom + 1):
        rc, lc = np.flatnonzero(right[y]), np.flatnonzero(left[y])
        gaps.append(lc[0] - rc[-1])
        gap_mask[y, rc[-1] + 1 : lc[0]] = True
    if min(gaps) > 0.3 * w or min(gaps) < 1:
        return f"implausible mediastinum width ({min(gaps) / w:.0%} of the image)"
    if float(g[gap_mask].mean()) < max(float(g[right].mean()), float(g[left].mean())) + 0.08:
        return "the region between the dark regions is not brighter (no mediastinum)"
    span = np.flatnonzero(left.any(axis=0))[-1] - np.flatnonzero(right.any(axis=0))[0]
    if span < 0.45 * w:
        return "the dark regions span less than 45% of the image width"
    return None


def _segment(g0: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    g = ndi.gaussian_filter(g0, 0.75)
    h, w = g.shape
    centre = g[int(0.1 * h) : int(0.9 * h), int(0.1 * w) : int(0.9 * w)]
    best: dict[str, _Candidate] = {}
    local_max = _local_max(g)
    for t in np.quantile(centre, np.linspace(0.05, 0.65, 14)):
        for c in _candidates(g, float(t), local_max):
            if c.side not in best or c.score > best[c.side].score:
                best[c.side] = c
    missing = [name for key, name in (("R", "right"), ("L", "left")) if key not in best]
    if missing:
        return f"no plausible {' or '.join(missing)} lung field (dark region inside the chest) in the image"
    levels = np.quantile(centre, np.linspace(0.05, 0.8, 31))
    lungs = []
    for side in ("R", "L"):
        c = best[side]
        grown = _grow(g, c.mask, levels[levels > c.threshold], side)
        grown = ndi.binary_opening(ndi.binary_closing(grown, _disk(2)), _disk(1))
        lab, n = ndi.label(grown)
        if n > 1:
            grown = lab == 1 + int(np.argmax(ndi.sum(grown, lab, range(1, n + 1))))
        lungs.append(ndi.binary_fill_holes(grown))
    problem = _pair_problem(lungs[0], lungs[1], g)
    return problem if problem else (lungs[0], lungs[1])


def _grid_lungs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The fallback: two rounded lung boxes at typical PA positions (fractions of the image)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    yn, xn = (y + 0.5) / h, (x + 0.5) / w

    def lung(x0: float, x1: float) -> np.ndarray:
        cx, rx = (x0 + x1) / 2, (x1 - x0) / 2
        top = 0.12 + 0.1 * ((xn - cx) / rx) ** 2  # a dome: the apex is highest mid-lung
        return (np.abs(xn - cx) <= rx) & (yn >= top) & (yn <= 0.78)

    return lung(0.12, 0.44), lung(0.56, 0.88)


def _zone_map(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    h, w = right.shape
    zones = np.full((h, w), -1, dtype=np.int8)
    fields, dilated = [], []
    extents = [np.flatnonzero(lung.any(axis=1)) for lung in (right, left)]
    tallest = max(e[-1] for e in extents)
    for lung, rows in zip((right, left), extents, strict=True):
        filled = np.zeros_like(lung)
        for y in rows:
            cols = np.flatnonzero(lung[y])
            filled[y, cols[0] : cols[-1] + 1] = True
        # A base hidden under fluid or collapse is not dark: when a field is much shorter than the other one or than
        # 1.3x its width, continue its lowest full-width row down (the zones then cover the hidden base).
        width = np.flatnonzero(lung.any(axis=0))
        height = rows[-1] - rows[0] + 1
        bottom = rows[-1]
        if tallest - bottom > 0.15 * height:
            bottom = tallest
        bottom = min(h - 1, max(bottom, rows[0] + round(1.3 * (width[-1] - width[0] + 1))))
        if bottom > rows[-1]:
            row_width = filled.sum(axis=1)
            base = rows[row_width[rows] >= 0.5 * row_width.max()][-1]
            filled[rows[-1] + 1 : bottom + 1] = filled[base]
        fields.append(filled)
        grown = ndi.binary_dilation(filled, _disk(max(1, round(_MARGIN * w))))
        rows = np.flatnonzero(filled.any(axis=1))
        for k in range(1, max(1, round(_BELOW * (rows[-1] - rows[0]))) + 1):  # fluid or collapse under the base
            grown[k:] |= filled[:-k]
        dilated.append(grown)
    y, x = np.mgrid[0:h, 0:w]

    def lung_zones(filled: np.ndarray, region: np.ndarray, prefix: str, lateral_is_left: bool) -> None:
        rows, cols = np.flatnonzero(filled.any(axis=1)), np.flatnonzero(filled.any(axis=0))
        y0, y1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        v = (y + 0.5 - y0) / (y1 - y0)
        lat = (c1 - x - 0.5) / (c1 - c0) if lateral_is_left else (x + 0.5 - c0) / (c1 - c0)
        z = np.where(v < 1 / 3, _Z[f"{prefix} upper zone"],
                     np.where(v < 2 / 3, _Z[f"{prefix} middle zone"], _Z[f"{prefix} lower zone"]))
        z = np.where(v < _APEX, _Z[f"{prefix} apex"], z)
        z = np.where((v >= 1 - _CP_HEIGHT) & (lat >= _CP_LATERAL), _Z[f"{prefix} costophrenic angle"], z)
        zones[region] = z[region]

    # lowest priority first: the widened margins, then the space between the lungs, then the fields themselves
    lung_zones(fields[0], dilated[0] & ~dilated[1], "right", True)
    lung_zones(fields[1], dilated[1] & ~dilated[0], "left", False)
    # the medial edge of each field per row; rows near a field's base that hold only a sliver of lung (the dome of
    # the diaphragm, the costophrenic tip) do not count, so the heart stops at the diaphragm
    medial = []
    for k, filled in enumerate(fields):
        width = filled.sum(axis=1)
        rows = np.flatnonzero(width)
        mid = (rows[0] + rows[-1]) / 2
        valid = (width > 0) & ((width >= 0.25 * width.max()) | (np.arange(h) <= mid))
        edge = np.full(h, -1)
        for yy in np.flatnonzero(valid):
            cols = np.flatnonzero(filled[yy])
            edge[yy] = cols[-1] if k == 0 else cols[0]
        medial.append(edge)
    both = np.flatnonzero((medial[0] >= 0) | (medial[1] >= 0))
    r_valid, l_valid = np.flatnonzero(medial[0] >= 0), np.flatnonzero(medial[1] >= 0)
    top, bottom = both[0], min(r_valid[-1], l_valid[-1])
    heart_top = top + _HEART_TOP * (max(r_valid[-1], l_valid[-1]) - top)
    last_r = last_l = None
    for yy in range(top, bottom + 1):
        last_r = medial[0][yy] if medial[0][yy] >= 0 else last_r
        last_l = medial[1][yy] if medial[1][yy] >= 0 else last_l
        if last_r is None or last_l is None or last_l - last_r < 2:
            continue
        zones[yy, last_r + 1 : last_l] = _Z["cardiac silhouette"] if yy >= heart_top else _Z["mediastinum"]
    lung_zones(fields[0], fields[0], "right", True)
    lung_zones(fields[1], fields[1], "left", False)
    return zones


def estimate_lung_fields(image: np.ndarray) -> LungFields:
    """Lung fields and zone map of a decoded image (float [rows, columns] in [0, 1], bright = dense).

    Never fails on a valid image: when the lungs cannot be found, the fixed grid is used and ``method`` is "grid"
    with the reason in ``note``. Raises ReportError for an array that is not 2-D."""
    if image.ndim != 2:
        raise ReportError(f"Invalid image shape {image.shape} - expected [rows, columns]")
    g = _working(image)
    found = _segment(g)
    if isinstance(found, str):
        right, left = _grid_lungs(g.shape)
        method, note = "grid", f"lung fields not found ({found}); zones from a fixed grid"
    else:
        (right, left), method, note = found, "image", "lung fields estimated from the image"
    return LungFields(
        method=method,  # type: ignore[arg-type]
        note=note,
        zones=_zone_map(right, left),
        right_lung=right,
        left_lung=left,
        image_shape=(int(image.shape[0]), int(image.shape[1])),
    )


# ---------------------------------------------------------------------------------------------------- heat shares


def region_shares(
    cam: np.ndarray, fields: LungFields, recipe: PreprocessRecipe | None = None
) -> tuple[RegionShare, ...]:
    """Share of the finding's heat (ReLU of ``cam`` upsampled to the image) in each zone, largest first.

    Zones with no heat are left out; the shares sum to <= 1, the rest of the heat is :data:`OUTSIDE`. A CAM with
    no positive value has no heat: the result is empty."""
    heat = cam_to_image(cam, fields.shape, recipe, source_shape=fields.image_shape).astype(np.float64)
    total = heat.sum()
    if total <= 0:
        return ()
    sums = np.bincount(fields.zones.ravel() + 1, weights=heat.ravel(), minlength=len(ZONES) + 1)[1:] / total
    order = np.argsort(-sums, kind="stable")
    return tuple(RegionShare(zone=ZONES[i], share=float(sums[i])) for i in order if sums[i] > 0)


def outside_share(shares: Sequence[RegionShare]) -> float:
    """The share of heat outside every zone: 1 - sum of ``shares`` (0 when there is no heat at all)."""
    return max(0.0, 1.0 - sum(s.share for s in shares)) if shares else 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class MainRegion:
    """Where most of a finding's heat lies, as every document states it (PDF table, SC label, SR text).

    ``zone``: the zone (a :data:`ZONES` name) or :data:`OUTSIDE` holding the largest share of the heat; ``share``
    its share of the finding's total heat (ReLU of the CAM over the whole image), in [0, 1]; ``outside`` the share
    outside every zone; ``lung_zone``: the zone with most heat among :data:`ZONES` (None when no zone has any), so a
    reader still learns which lung zone leads when most heat lies outside."""

    zone: str
    share: float
    outside: float
    lung_zone: RegionShare | None

    @property
    def is_outside(self) -> bool:
        return self.zone == OUTSIDE

    @property
    def name(self) -> str:
        """The zone as the documents name it ("outside the lung fields" for :data:`OUTSIDE`)."""
        return OUTSIDE_TEXT if self.is_outside else self.zone

    @property
    def text(self) -> str:
        """E.g. "left lower zone (34% of heat)" or "outside the lung fields (58% of heat)" (at most 64 characters)."""
        return f"{self.name} ({self.share:.0%} of heat)"


def main_region(shares: Sequence[RegionShare]) -> MainRegion | None:
    """The zone or :data:`OUTSIDE`, whichever holds the largest share of the heat (``shares`` from
    :func:`region_shares`); None when there is no heat. A tie goes to the lung zone."""
    if not shares:
        return None
    top = max(shares, key=lambda s: s.share)
    outside = outside_share(shares)
    if outside > top.share:
        return MainRegion(zone=OUTSIDE, share=outside, outside=outside, lung_zone=top)
    return MainRegion(zone=top.zone, share=top.share, outside=outside, lung_zone=top)


def peak_zone(
    cam: np.ndarray, image: np.ndarray, recipe: PreprocessRecipe | None = None, *, fields: LungFields | None = None
) -> str:
    """Zone name (or :data:`OUTSIDE`) at the CAM's peak on ``image`` (the pointing game's answer).

    ``fields``: reuse lung fields already estimated for ``image``."""
    fields = fields or estimate_lung_fields(image)
    row, col = cam_peak(cam, image.shape, recipe)
    return fields.zone_at(row, col)
