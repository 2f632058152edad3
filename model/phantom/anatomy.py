"""The analytic chest anatomy: per-image geometry (:class:`_Anatomy`), the texture bank, the rendering context
(:class:`_Ctx`: canonical coordinates and tissue thickness that findings modify in place), and the rendering of body,
lungs, mediastinum, heart, diaphragm, ribs, clavicles, spine and vessels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.phantom.sampling import _Patient
from model.phantom.values import _N, _S_ANATOMY, _S_BANK, FIELD_OF_VIEW_MM, _rng

# -------------------------------------------------------------------------------------------- texture bank, grid


def _smoothstep(v: np.ndarray | float) -> np.ndarray | float:
    v = np.clip(v, 0.0, 1.0)
    return v * v * (3.0 - 2.0 * v)


def _draw_tree(rng: np.random.Generator, n: int) -> np.ndarray:
    """A pulmonary vessel tree radiating from the centre of a (2n, 2n) canvas; values are tissue thickness in cm.

    Segments are rasterised as points every half pixel, weighted by a vessel's projected cross-section
    (pi/4 d^2), and blurred per diameter class with sigma = 0.35 d, so a vessel of diameter d peaks at ~0.9 d cm.
    """
    canvas = 2 * n
    px_per_cm = n / (FIELD_OF_VIEW_MM / 10.0)
    segments: list[tuple[float, float, float, float, float]] = []  # x0, y0, x1, y1, diameter cm
    stack = []
    for k in range(12):
        angle = 2 * math.pi * k / 12 + rng.uniform(-0.2, 0.2)
        r0 = 0.025 * n * rng.uniform(0.5, 1.5)
        stack.append((n + r0 * math.cos(angle), n + r0 * math.sin(angle), angle, 0.1 * n * rng.uniform(0.8, 1.2),
                      rng.uniform(0.45, 0.7), 0))
    while stack:
        x0, y0, angle, length, diam, depth = stack.pop()
        xm = x0 + 0.5 * length * math.cos(angle)
        ym = y0 + 0.5 * length * math.sin(angle)
        bend = angle + rng.uniform(-0.3, 0.3)
        x1 = xm + 0.5 * length * math.cos(bend)
        y1 = ym + 0.5 * length * math.sin(bend)
        segments.append((x0, y0, xm, ym, diam))
        segments.append((xm, ym, x1, y1, diam * 0.93))
        if depth < 8 and diam > 0.07:
            spread = rng.uniform(0.3, 0.65)
            for sign in (-1.0, 1.0):
                stack.append((x1, y1, bend + sign * spread * rng.uniform(0.5, 1.2), length * rng.uniform(0.7, 0.85),
                              diam * rng.uniform(0.68, 0.8), depth + 1))
    seg = np.array(segments)
    out = np.zeros((canvas, canvas), np.float32)
    edges = [0.0, 0.1, 0.16, 0.25, 0.4, 0.6, 9.0]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = seg[(seg[:, 4] >= lo) & (seg[:, 4] < hi)]
        if len(sel) == 0:
            continue
        sigma = max(0.35 * np.median(sel[:, 4]) * px_per_cm, 0.55)
        lengths = np.hypot(sel[:, 2] - sel[:, 0], sel[:, 3] - sel[:, 1])
        steps = np.maximum(np.ceil(lengths / 0.5).astype(np.int64), 1)
        idx = np.repeat(np.arange(len(sel)), steps)
        frac = (np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps) + 0.5) / np.repeat(steps, steps)
        px = sel[idx, 0] + frac * (sel[idx, 2] - sel[idx, 0])
        py = sel[idx, 1] + frac * (sel[idx, 3] - sel[idx, 1])
        d_cm = sel[idx, 4]
        weight = (math.pi / 4.0) * d_cm * d_cm * px_per_cm * np.repeat(lengths / steps, steps)
        ok = (px >= 0) & (px < canvas - 1) & (py >= 0) & (py < canvas - 1)
        # bilinear splat keeps thin vessels continuous at sub-pixel widths
        x0, y0 = np.floor(px[ok]).astype(np.int64), np.floor(py[ok]).astype(np.int64)
        fx, fy, wt = px[ok] - x0, py[ok] - y0, weight[ok]
        layer = np.zeros(canvas * canvas)
        for ddy, ddx, ww in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy),
                             (1, 1, fx * fy)):
            layer += np.bincount((y0 + ddy) * canvas + x0 + ddx, weights=wt * ww, minlength=canvas * canvas)
        out += ndimage.gaussian_filter(layer.reshape(canvas, canvas), sigma).astype(np.float32)
    return out


class _Bank:
    """Per-size precomputed coordinate vectors and textures (built once per process and size, fixed seeds)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.coord = ((np.arange(n, dtype=np.float64) + 0.5) / n).astype(np.float32)
        rng = _rng(0, _S_BANK, 0)
        self.trees = [_draw_tree(_rng(0, _S_BANK, 1, k), n) for k in range(3)]
        canvas = 2 * n
        white = rng.standard_normal((canvas, canvas)).astype(np.float32)
        blotch = ndimage.gaussian_filter(white, n / 45.0)
        self.blotch = ((blotch - blotch.mean()) / blotch.std()).astype(np.float32)
        fine_a = ndimage.gaussian_filter(white, max(n / 200.0, 0.7))
        fine_b = ndimage.gaussian_filter(white, max(n / 100.0, 1.2))
        band = fine_a - fine_b
        band /= band.std()
        self.reticular = np.exp(-((band / 0.35) ** 2)).astype(np.float32)  # thin lines along zero crossings
        # a separable low-pass (4x down, Gaussian sigma 3.5% of the width, linear up) for unsharp-mask processing:
        # blurred = up @ (down @ image @ down.T) @ up.T
        m = max(n // 4, 16)
        pos = np.clip((np.arange(n) + 0.5) / n * m - 0.5, 0.0, m - 1.0)
        i0 = np.minimum(np.floor(pos).astype(np.int64), m - 2)
        frac = pos - i0
        up = np.zeros((n, m))
        up[np.arange(n), i0] += 1.0 - frac
        up[np.arange(n), i0 + 1] += frac
        down = up.T / up.T.sum(axis=1, keepdims=True)
        j = np.arange(m)
        gauss = np.exp(-0.5 * ((j[:, None] - j[None, :]) / (0.035 * m)) ** 2)
        gauss /= gauss.sum(axis=1, keepdims=True)
        self.down = (gauss @ down).astype(np.float32)
        self.up = up.astype(np.float32)

    def lowpass(self, image: np.ndarray) -> np.ndarray:
        return (self.up @ ((self.down @ image) @ self.down.T)) @ self.up.T


@functools.lru_cache(maxsize=4)
def _bank(n: int) -> _Bank:
    return _Bank(n)


# ---------------------------------------------------------------------------------------------------- anatomy


@dataclass(slots=True)
class _Side:
    """One hemithorax in side coordinates: s = distance from the midline towards this side's chest wall."""

    sign: float  # +1: patient's right = image left (s = xm - x); -1: patient's left
    s_c: float  # apex centre
    w_lat: float  # apex centre -> lateral wall at the base
    w_med: float  # apex centre -> medial (mediastinal) border at the base
    y_apex: float
    y_cp: float  # costophrenic level (where the lateral wall reaches full width)
    y_dome: float  # top of the hemidiaphragm
    s_dome: float
    w_dome: float
    h_dome: float  # dome depth between its top and the lateral end
    depth_cm: float  # maximal antero-posterior lung thickness

    def fields(self, s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inside distance, lateral-wall distance, diaphragm distance, lateral fraction p) at side coords (s, y).

        float32 arrays of one shape; distances in canonical units, positive inside; p is 0 at the mediastinal
        border and 1 at the lateral wall.
        """
        f32 = np.float32
        t = y - f32(self.y_apex)
        inside = t * f32(0.5)  # apical distance, reused below
        t *= f32(1.0 / (self.y_cp - self.y_apex))
        np.clip(t, 0.0, 1.0, out=t)
        f = f32(2.0) - t
        f *= t
        np.sqrt(f, out=f)
        f *= f32(1.35) - f32(0.35) * f  # a broad, rounded apex
        d_lat = f * f32(self.w_lat)
        d_lat += f32(self.s_c)
        d_lat -= s
        d_med = f * f32(self.w_med)
        d_med += s - f32(self.s_c)
        ds = np.maximum(s, f32(self.s_c - self.w_med))
        ds -= f32(self.s_dome)
        ds *= f32(1.0 / self.w_dome)
        ds *= ds
        ds *= f32(self.h_dome)
        d_dia = ds
        d_dia += f32(self.y_dome)
        d_dia -= y
        np.minimum(inside, d_lat, out=inside)
        np.minimum(inside, d_med, out=inside)
        np.minimum(inside, d_dia, out=inside)
        width = d_lat + d_med
        np.maximum(width, f32(1e-3), out=width)
        p = np.divide(d_med, width, out=d_med)
        return inside, d_lat, d_dia, p

    def medial(self, y: np.ndarray) -> np.ndarray:
        """s of the mediastinal border at heights y."""
        t = np.clip((y - np.float32(self.y_apex)) * np.float32(1.0 / (self.y_cp - self.y_apex)), 0.0, 1.0)
        f = np.sqrt(t * (np.float32(2.0) - t))
        f *= np.float32(1.35) - np.float32(0.35) * f
        return np.float32(self.s_c) - np.float32(self.w_med) * f

    def inside_at(self, s: float, y: float) -> float:
        """The inside distance of :meth:`fields` at one point."""
        return float(self.fields(np.array([s], np.float32), np.array([y], np.float32))[0][0])

    def diaphragm_y(self, s: float) -> float:
        return self.y_dome + self.h_dome * ((max(s, self.s_c - self.w_med) - self.s_dome) / self.w_dome) ** 2

    def centroid(self) -> tuple[float, float]:
        return self.s_c + 0.3 * (self.w_lat - self.w_med), 0.55 * self.y_apex + 0.45 * self.y_dome + 0.04

    def hilum(self, xm: float, carina_y: float) -> tuple[float, float]:
        return xm - self.sign * (self.s_c - 0.055), carina_y + 0.08


@dataclass(slots=True)
class _Anatomy:
    xm: float
    right: _Side
    left: _Side
    heart: list[float]  # cx, cy, a, b, angle(rad), depth_cm
    body_cm: float
    chest_half: float
    carina_y: float
    parenchyma: float  # tissue fraction of lung (the rest is air)
    vessels: float  # vessel amplitude factor
    breast: float  # cm of breast tissue (0 for men)
    trees: tuple[int, int]
    tree_jitter: tuple[int, ...]
    clavicle_y: float
    rib_period: float

    def side(self, sign: float) -> _Side:
        return self.right if sign > 0 else self.left

    def thoracic_width(self) -> float:
        return self.right.s_c + self.right.w_lat + self.left.s_c + self.left.w_lat

    def heart_width(self) -> float:
        _, _, a, b, ang, _ = self.heart
        return 2.0 * math.sqrt((a * math.cos(ang)) ** 2 + (b * math.sin(ang)) ** 2)

    def ctr(self) -> float:
        return self.heart_width() / self.thoracic_width()

    def set_ctr(self, ctr: float) -> None:
        f = ctr / self.ctr()
        hx, hy, a, b, ang, depth = self.heart
        self.heart = [self.xm + (hx - self.xm) * f, hy - 0.3 * b * (f - 1.0), a * f, b * (1 + 0.7 * (f - 1)), ang,
                      depth]
        self.heart[2] *= ctr / self.ctr()  # exact after the aspect change


def _anatomy(patient: _Patient, view: str, acq: np.random.Generator) -> _Anatomy:
    """Normal anatomy: habitus from the patient's own stream, inspiration and view from the image's."""
    seed, block, j = patient.key
    p = _rng(seed, _S_ANATOMY, block, j).random(16)
    u = acq.random(4)
    width = 0.94 + 0.12 * p[0]
    height = 0.93 + 0.12 * p[1]
    inspiration = (u[0] - 0.5) * 0.05 + (0.025 if view == "AP" else 0.0)  # AP: often shallower
    y_apex = 0.095 + 0.02 * p[2]

    def side(sign: float, k: int) -> _Side:
        right = sign > 0
        s_c = (0.185 if right else 0.175) * width
        w_lat = (0.2 if right else 0.198) * width * (0.97 + 0.06 * p[3 + k])
        w_med = (0.13 if right else 0.1) * width
        y_dome = y_apex + (0.5 if right else 0.525) * height + inspiration
        return _Side(
            sign=sign, s_c=s_c, w_lat=w_lat, w_med=w_med, y_apex=y_apex,
            y_cp=y_dome + 0.09, y_dome=y_dome, s_dome=s_c + 0.025, w_dome=w_lat - 0.015,
            h_dome=0.10 * (0.9 + 0.2 * p[5 + k]), depth_cm=13.0 + 3.0 * p[7],
        )

    right, left = side(1.0, 0), side(-1.0, 1)
    xm = 0.5 + (u[1] - 0.5) * 0.02
    anat = _Anatomy(
        xm=xm, right=right, left=left, heart=[0.0] * 6, body_cm=19.0 + 8.0 * p[12], chest_half=0.455 * width,
        carina_y=y_apex + 0.235 * height, parenchyma=0.13, vessels=3.0,
        breast=0.0 if patient.sex == "M" or patient.age0 < 15 else 1.0 + 2.0 * p[11],
        trees=(int(p[13] * 3), int(p[14] * 3)),
        tree_jitter=tuple(int(v) for v in acq.integers(-3, 4, size=4)),
        clavicle_y=y_apex + 0.075 + (0.0 if view == "PA" else -0.035) + 0.02 * u[2],
        rib_period=0.062 * height * (0.95 + 0.1 * p[15]),
    )
    ctr = 0.38 + 0.09 * p[8] + (0.03 if view == "AP" else 0.0)  # AP magnifies the heart
    a = 0.5 * ctr * anat.thoracic_width()
    heart_y = 0.5 * (right.y_dome + left.y_dome) - 0.055
    anat.heart = [xm + 0.3 * a, heart_y, a, 0.62 * a, math.radians(25 + 15 * p[9]), 16.0 + 3.0 * p[10]]
    anat.set_ctr(ctr)
    return anat


# ---------------------------------------------------------------------------------------------- rendering context


class _Ctx:
    """Per-image arrays (canonical coordinates, tissue thickness) that findings modify in place."""

    def __init__(self, bank: _Bank, anat: _Anatomy, rot: float, scale: float, dx: float, dy: float) -> None:
        n = bank.n
        self.n, self.bank, self.anat = n, bank, anat
        self.scale = scale
        c, s = math.cos(rot) / scale, math.sin(rot) / scale
        self.fwd = (c, s, dx, dy)
        v = bank.coord - np.float32(0.5)
        # canonical x = c*(px-.5) - s*(py-.5) + .5 + dx ; y = s*(px-.5) + c*(py-.5) + .5 + dy
        self.x = (np.float32(c) * v)[None, :] + (np.float32(-s) * v + np.float32(0.5 + dx))[:, None]
        self.y = (np.float32(s) * v)[None, :] + (np.float32(c) * v + np.float32(0.5 + dy))[:, None]
        self.px = 1.0 / (n * scale)  # one pixel in canonical units
        self.air = np.zeros((n, n), np.float32)  # cm of air along each ray (lungs, trachea, stomach)
        self.fill = np.zeros((n, n), np.float32)  # cm of that air replaced by tissue or fluid (clipped at air)
        self.extra = np.zeros((n, n), np.float32)  # attenuation not bounded by the air (hernia, pleural line)
        self.markings = np.ones((n, n), np.float32)  # lung parenchyma and vessel factor (pneumothorax: 0)
        self.lung = np.zeros((n, n), np.float32)  # soft lung mask 0..1
        self.masks = np.zeros((_N, n, n), np.bool_)
        self.thorax = np.zeros((n, n), np.bool_)
        self.side_win: dict[float, tuple[slice, slice]] = {}  # each lung's bounding window
        self.side_lung: dict[float, np.ndarray] = {}  # that lung's own soft mask over its window

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        """Canonical point -> pixel (row, column) as floats."""
        c, s, dx, dy = self.fwd
        det = c * c + s * s
        a, b = x - 0.5 - dx, y - 0.5 - dy
        return ((-s * a + c * b) / det + 0.5) * self.n, ((c * a + s * b) / det + 0.5) * self.n

    def window(self, x: float, y: float, rx: float, ry: float | None = None) -> tuple[slice, slice] | None:
        """Pixel slices covering the canonical box centre (x, y), half sizes (rx, ry), rotation included."""
        ry = rx if ry is None else ry
        row, col = self.to_px(x, y)
        c, s, _, _ = self.fwd
        det = math.sqrt(c * c + s * s)
        ca, sa = abs(c) / det, abs(s) / det
        hr = (ca * ry + sa * rx) * self.scale * self.n + 2
        hc = (ca * rx + sa * ry) * self.scale * self.n + 2
        r0, r1 = max(int(row - hr), 0), min(int(row + hr) + 2, self.n)
        c0, c1 = max(int(col - hc), 0), min(int(col + hc) + 2, self.n)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def s_of(self, sign: float, x: np.ndarray) -> np.ndarray:
        return (np.float32(self.anat.xm) - x) if sign > 0 else (x - np.float32(self.anat.xm))

    def side_lung_at(self, sign: float, w: tuple[slice, slice]) -> np.ndarray:
        """One lung's soft mask over window w (zero outside that lung's own window)."""
        out = np.zeros((w[0].stop - w[0].start, w[1].stop - w[1].start), np.float32)
        sw = self.side_win[sign]
        r0, r1 = max(w[0].start, sw[0].start), min(w[0].stop, sw[0].stop)
        c0, c1 = max(w[1].start, sw[1].start), min(w[1].stop, sw[1].stop)
        if r0 < r1 and c0 < c1:
            out[r0 - w[0].start: r1 - w[0].start, c0 - w[1].start: c1 - w[1].start] = \
                self.side_lung[sign][r0 - sw[0].start: r1 - sw[0].start, c0 - sw[1].start: c1 - sw[1].start]
        return out

    def texture(self, name: str, w: tuple[slice, slice], rng: np.random.Generator) -> np.ndarray:
        tex = getattr(self.bank, name)
        oy, ox = (int(v) for v in rng.integers(0, self.n, size=2))
        return tex[oy + w[0].start: oy + w[0].stop, ox + w[1].start: ox + w[1].stop]


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 ramp of `width` canonical units centred on d = 0."""
    return np.clip(d * np.float32(1.0 / width) + np.float32(0.5), 0.0, 1.0)


def _ellipse(ctx: _Ctx, w: tuple[slice, slice], x: float, y: float, a: float, b: float, ang: float) -> np.ndarray:
    """Normalised squared radius of the ellipse (semi-axes a along `ang`, b across) over window w."""
    xs, ys = ctx.x[w] - np.float32(x), ctx.y[w] - np.float32(y)
    ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
    u = (ca * xs + sa * ys) * np.float32(1.0 / a)
    v = (ca * ys - sa * xs) * np.float32(1.0 / b)
    return u * u + v * v


def _render_anatomy(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Fill ctx.air / ctx.lung / ctx.thorax; return (body thickness cm, bone thickness cm)."""
    s_abs = np.abs(ctx.x - np.float32(ctx.anat.xm))
    body = _body(ctx, s_abs)
    _lungs(ctx)
    _mediastinum(ctx)
    _breasts(ctx, body)
    return body, _bones(ctx, s_abs)


def _body(ctx: _Ctx, s_abs: np.ndarray) -> np.ndarray:
    """Body thickness (cm) [n, n]; ``s_abs``: |x - midline| in canonical units."""
    anat, y = ctx.anat, ctx.y
    y_apex = anat.right.y_apex
    # body: an elliptic cylinder; neck at the top, broad shoulders, narrowing slightly towards the abdomen
    neck = _smoothstep((y - np.float32(y_apex - 0.1)) * np.float32(1.0 / 0.11))
    half = np.float32(0.08) + (np.float32(anat.chest_half * 1.1 - 0.08) - np.float32(0.1 * anat.chest_half) *
                               np.clip(y - np.float32(y_apex), 0.0, 0.8)) * neck
    r = s_abs / half
    return (np.float32(anat.body_cm * 0.6) + np.float32(anat.body_cm * 0.4) * neck) * np.sqrt(
        np.clip(1.0 - r * r, 0.0, 1.0))


def _lungs(ctx: _Ctx) -> None:
    """Lung air (cm) into ctx.air, the soft lung masks (ctx.lung, ctx.side_win, ctx.side_lung) and ctx.thorax."""
    anat, x, y = ctx.anat, ctx.x, ctx.y
    # lungs, per side over its bounding box (with a margin for the thorax mask)
    for sd in (anat.right, anat.left):
        y0, y1 = sd.y_apex - 0.035, max(sd.y_cp, sd.y_dome + sd.h_dome) + 0.035
        s0, s1 = -0.01, sd.s_c + sd.w_lat + 0.035  # from just past the midline (the mediastinum is thorax too)
        xa, xb = anat.xm - sd.sign * s0, anat.xm - sd.sign * s1
        w = ctx.window(0.5 * (xa + xb), 0.5 * (y0 + y1), 0.5 * abs(xb - xa), 0.5 * (y1 - y0))
        if w is None:
            raise RuntimeError("phantom lung outside the image - geometry parameters out of range")
        ys = y[w]
        inside, d_lat, d_dia, p = sd.fields(ctx.s_of(sd.sign, x[w]), ys)
        soft = _soft(inside, 2.0 * ctx.px)
        p -= np.float32(0.55)
        p *= np.float32(1.7)
        p *= p
        np.subtract(np.float32(1.0), p, out=p)
        np.clip(p, 0.0, 1.0, out=p)
        prof = np.sqrt(p, out=p)
        vert = np.clip(d_dia * np.float32(1 / 0.06), 0.0, 1.0)
        np.sqrt(vert, out=vert)
        vert *= np.float32(0.6) + np.float32(0.4) * _smoothstep((ys - np.float32(sd.y_apex)) * np.float32(1 / 0.2))
        prof *= vert
        prof *= soft
        prof *= np.float32(sd.depth_cm)
        ctx.air[w] += prof
        np.maximum(ctx.lung[w], soft, out=ctx.lung[w])
        ctx.side_win[sd.sign] = w
        ctx.side_lung[sd.sign] = soft
        ctx.thorax[w] |= (d_lat > -0.03) & (ys > sd.y_apex - 0.03) & (d_dia > -0.03)


def _mediastinum(ctx: _Ctx) -> None:
    """Heart, great vessels and hila replace lung air; trachea and gastric bubble add air (ctx.air, cm)."""
    anat, x, y = ctx.anat, ctx.x, ctx.y
    xm = np.float32(anat.xm)
    # heart (and the great vessels above it) replace lung air
    hx, hy, a, b, ang, hd = anat.heart
    win = ctx.window(hx, hy, a * 1.05, a * 1.05)
    if win is not None:
        rr = _ellipse(ctx, win, hx, hy, a, b, ang)
        heart = np.float32(hd) * np.sqrt(np.clip(1.0 - rr, 0.0, 1.0)) + np.float32(4.0) * _soft(1.0 - rr, 0.1)
        ctx.air[win] = np.maximum(ctx.air[win] - heart, 0.0)
    for cx, cy, rad, dens in ((anat.xm + 0.065, anat.carina_y - 0.035, 0.03, 10.0),  # aortic knob
                              (anat.xm - 0.045, anat.carina_y + 0.0, 0.045, 8.0),  # SVC / right mediastinum
                              (anat.xm + 0.07, anat.carina_y + 0.045, 0.03, 8.0),  # pulmonary trunk
                              *((*anat.right.hilum(anat.xm, anat.carina_y), 0.022, 1.5),
                                (*anat.left.hilum(anat.xm, anat.carina_y), 0.02, 1.5))):
        w = ctx.window(cx, cy, rad * 1.2)
        if w is not None:
            d2 = _ellipse(ctx, w, cx, cy, rad, rad * 1.3, 0.0)
            ctx.air[w] = np.maximum(ctx.air[w] - np.float32(dens) * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)), 0.0)
    # trachea to the carina, and the gastric air bubble under the left hemidiaphragm
    tw = 0.02
    w = ctx.window(anat.xm, anat.carina_y / 2, tw * 2, anat.carina_y / 2 + 0.02)
    if w is not None:
        d = (x[w] - xm) * np.float32(1 / tw)
        ctx.air[w] += np.float32(2.2) * np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0)) * _soft(
            np.float32(anat.carina_y) - y[w], 0.02)
    gx, gy = anat.xm + 0.17, anat.left.diaphragm_y(0.17) + 0.05
    w = ctx.window(gx, gy, 0.06, 0.04)
    if w is not None:
        d2 = _ellipse(ctx, w, gx, gy, 0.055, 0.03, 0.1)
        ctx.air[w] += np.float32(4.0) * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))


def _breasts(ctx: _Ctx, body: np.ndarray) -> None:
    """Breast soft tissue (cm) added to ``body`` in place (anat.breast > 0 only)."""
    anat = ctx.anat
    # breasts (soft tissue over the lower lungs)
    if anat.breast > 0:
        for sign in (1.0, -1.0):
            bx, by = anat.xm - sign * 0.25, anat.right.y_dome + 0.02
            w = ctx.window(bx, by, 0.2, 0.14)
            if w is not None:
                d2 = _ellipse(ctx, w, bx, by, 0.2, 0.13, sign * 0.3)
                body[w] += np.float32(anat.breast) * np.clip(1.0 - d2, 0.0, 1.0)


def _bones(ctx: _Ctx, s_abs: np.ndarray) -> np.ndarray:
    """Bone thickness (cm) [n, n]: spine, ribs, clavicles, humeral heads."""
    anat, n, x, y = ctx.anat, ctx.n, ctx.x, ctx.y
    xm = np.float32(anat.xm)
    y_apex = anat.right.y_apex
    # bones: spine, ribs, clavicles, humeral heads
    bone = np.zeros((n, n), np.float32)
    y0, y1 = y_apex - 0.08, max(anat.right.y_cp, anat.left.y_cp) + 0.06
    w = ctx.window(anat.xm, 0.5 * (y0 + y1), anat.chest_half * 1.1, 0.5 * (y1 - y0))
    if w is not None:
        bone[w] = _ribs(ctx, w, s_abs[w])
    w = ctx.window(anat.xm, 0.5, 0.06, 0.6)
    if w is not None:
        d = (x[w] - xm) * np.float32(1 / 0.04)
        vb = np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))
        disc = np.float32(0.85) + np.float32(0.15) * np.cos(y[w] * np.float32(2 * math.pi / 0.055))
        ped = np.clip(np.float32(1.0) - (np.abs(d) - np.float32(0.8)) ** 2 * np.float32(40.0), 0.0, 1.0)
        bone[w] += np.float32(0.6) * vb * disc + np.float32(0.3) * ped * disc
    _clavicles(ctx, bone, s_abs)
    for sign in (1.0, -1.0):
        hx_, hy_ = anat.xm - sign * anat.chest_half * 1.08, y_apex + 0.02
        w = ctx.window(hx_, hy_, 0.07)
        if w is not None:
            d2 = _ellipse(ctx, w, hx_, hy_, 0.065, 0.065, 0.0)
            bone[w] += np.float32(2.0) * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
    return bone


def _ribs(ctx: _Ctx, w: tuple[slice, slice], s_abs: np.ndarray) -> np.ndarray:
    anat = ctx.anat
    y = ctx.y[w]
    sn = s_abs * np.float32(1.0 / anat.chest_half)
    # posterior ribs: arched, highest a third of the way out, curving down laterally
    g = np.float32(0.3) * (sn - np.float32(0.3)) ** 2
    u = (y - g - np.float32(anat.right.y_apex - 0.045)) * np.float32(1.0 / anat.rib_period)
    u = u + np.float32(0.025) * u * u  # ribs spread slightly lower down
    k = np.floor(u)
    t = (u - k - np.float32(0.26)) * np.float32(1 / 0.26)  # a rib fills 52% of the period
    post = np.clip(1.0 - t * t, 0.0, 1.0) * (np.float32(0.4) + np.float32(0.9) * t * t)
    post *= (k >= 0) & (k < 10)
    # anterior ribs: faint, sloping down towards the midline
    ua = (y + np.float32(0.3) * sn - np.float32(anat.right.y_apex + 0.1)) * np.float32(1.0 / (anat.rib_period * 1.15))
    ka = np.floor(ua)
    ta = (ua - ka - np.float32(0.2)) * np.float32(1 / 0.2)
    ant = np.clip(1.0 - ta * ta, 0.0, 1.0) * np.float32(0.3)
    ant *= (ka >= 1) & (ka < 7)
    ant *= _smoothstep((sn - np.float32(0.3)) * 5)
    lateral = _smoothstep((np.float32(1.04) - sn) * np.float32(12)) * _smoothstep((sn - np.float32(0.06)) * 12)
    return (post + ant) * lateral * np.float32(0.7)


def _clavicles(ctx: _Ctx, bone: np.ndarray, s_abs: np.ndarray) -> None:
    anat = ctx.anat
    w = ctx.window(anat.xm, anat.clavicle_y - 0.04, 0.5, 0.09)
    if w is None:
        return
    s, y = s_abs[w] * np.float32(1.0 / anat.chest_half), ctx.y[w]
    yc = np.float32(anat.clavicle_y) - np.float32(0.13) * s + np.float32(0.1) * (s - np.float32(0.4)) ** 2
    t = (y - yc) * np.float32(1 / 0.017)
    clav = np.clip(1.0 - t * t, 0.0, 1.0) * (np.float32(0.7) + np.float32(0.8) * t * t)
    clav *= _smoothstep((s - np.float32(0.08)) * 20) * _smoothstep((np.float32(0.95) - s) * 12)
    bone[w] += np.float32(1.5) * clav


def _vessels(ctx: _Ctx) -> None:
    anat, n = ctx.anat, ctx.n
    for sd, tree_i, (jy, jx) in ((anat.right, anat.trees[0], anat.tree_jitter[:2]),
                                 (anat.left, anat.trees[1], anat.tree_jitter[2:])):
        row, col = ctx.to_px(*sd.hilum(anat.xm, anat.carina_y))
        r, c = min(max(int(round(row)) + jy, 0), n), min(max(int(round(col)) + jx, 0), n)
        tree = ctx.bank.trees[tree_i]
        if sd.sign < 0:
            tree = tree[:, ::-1]
        w = ctx.side_win[sd.sign]
        vessels = tree[n - r + w[0].start: n - r + w[0].stop, n - c + w[1].start: n - c + w[1].stop] * \
            np.float32(anat.vessels)
        vessels *= ctx.side_lung[sd.sign]
        vessels *= ctx.markings[w]
        ctx.fill[w] += vessels
