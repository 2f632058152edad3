"""One visual signature per finding (``_FINDINGS``: label -> function), each drawing its lesion into the rendering
context and its mask, with positions from the real NIH bounding boxes where a finding has them.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from model.phantom.anatomy import _Anatomy, _Ctx, _ellipse, _Side, _smoothstep, _soft
from model.phantom.sampling import _table
from model.phantom.values import _CM, _I, _MU_SOFT

# ------------------------------------------------------------------------------------------------------ findings


def _box(rng: np.random.Generator, label: int) -> np.ndarray:
    boxes = _table().boxes[label]
    return boxes[int(rng.integers(len(boxes)))]


def _side_of_box(anat: _Anatomy, cx: float) -> float:
    return 1.0 if cx < anat.xm else -1.0


def _place(anat: _Anatomy, x: float, y: float, sign: float | None, margin: float) -> tuple[float, float, float]:
    """Move canonical (x, y) into a lung, at least `margin` inside it; return (x, y, side sign)."""
    if sign is None:
        sign = _side_of_box(anat, x)
    sd = anat.side(sign)
    cs, cy = sd.centroid()
    cx = anat.xm - sign * cs
    margin = min(margin, 0.03)
    for _ in range(30):
        inside = sd.inside_at(sign * (anat.xm - x), y)
        if inside >= margin:
            break
        x, y = x + 0.15 * (cx - x), y + 0.15 * (cy - y)
    return x, y, sign


def _disc(ctx: _Ctx, label: int, x: float, y: float, diam_cm: float, solid: float) -> None:
    r = 0.5 * diam_cm * _CM
    w = ctx.window(x, y, r * 1.2)
    if w is None:
        return
    d2 = _ellipse(ctx, w, x, y, r, r, 0.0)
    chord = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)) * _soft(np.float32(1.0) - d2, 0.2)
    ctx.fill[w] += np.float32(solid * diam_cm) * chord
    ctx.masks[label][w] |= d2 <= 1.0


def _f_nodule(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    count = 1 if rng.random() < 0.75 else int(rng.integers(2, 5))
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        diam = float(np.exp(rng.uniform(math.log(0.8), math.log(2.8))))
        for _try in range(10):
            cx, cy, _, _ = _box(rng, label)
            x, y, _ = _place(ctx.anat, cx + rng.normal(0, 0.03), cy + rng.normal(0, 0.03), None,
                             0.5 * diam * _CM + 0.005)
            if all(math.hypot(x - px, y - py) > 0.5 * (diam * _CM + pd) + 0.02 for px, py, pd in placed):
                break
        else:
            continue
        placed.append((x, y, diam * _CM))
        _disc(ctx, label, x, y, diam, solid=0.9 * min(k, 1.1))


def _f_mass(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    diam = float(np.exp(rng.uniform(math.log(3.3), math.log(8.0))))
    cx, cy, _, _ = _box(rng, label)
    x, y, _ = _place(ctx.anat, cx + rng.normal(0, 0.02), cy + rng.normal(0, 0.02), None, 0.5 * diam * _CM)
    _disc(ctx, label, x, y, diam, solid=0.85 * min(k, 1.1))
    for _ in range(int(rng.integers(0, 3))):  # lobulation
        ang = rng.uniform(0, 2 * math.pi)
        off = 0.3 * diam * _CM
        _disc(ctx, label, x + off * math.cos(ang), y + off * math.sin(ang), diam * rng.uniform(0.45, 0.65),
              solid=0.6 * min(k, 1.1))


def _patch(ctx: _Ctx, x: float, y: float, rx: float, ry: float, rng: np.random.Generator, texture: float,
           sharp: tuple[float, float, float] | None = None) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """An ill-defined patch of opacity 0..1 around (x, y); optionally cut by a straight border (a fissure).

    Opacity only shows where there is lung air to replace; callers intersect masks with the lung.
    """
    w = ctx.window(x, y, rx * 1.6, ry * 1.6)
    if w is None:
        return None
    f = np.zeros(ctx.x[w].shape, np.float32)
    for _ in range(int(rng.integers(3, 6))):
        bx, by = x + rng.normal(0, rx * 0.35), y + rng.normal(0, ry * 0.35)
        d2 = _ellipse(ctx, w, bx, by, rx * rng.uniform(0.5, 0.8), ry * rng.uniform(0.5, 0.8), rng.uniform(0, math.pi))
        np.maximum(f, np.exp(-d2), out=f)
    f = np.clip(f * (np.float32(1.0) + np.float32(texture) * ctx.texture("blotch", w, rng)) * np.float32(1.4)
                - np.float32(0.2), 0.0, 1.0)
    if sharp is not None:
        nx, ny, off = sharp
        f *= _soft((ctx.x[w] - np.float32(x)) * np.float32(nx) + (ctx.y[w] - np.float32(y)) * np.float32(ny)
                   + np.float32(off), 1.5 * ctx.px)
    return w, f


def _bronchograms(ctx: _Ctx, w: tuple[slice, slice], fill: np.ndarray, which: int, amount: float) -> None:
    n = ctx.n
    tree = ctx.bank.trees[which][n // 2 + w[0].start: n // 2 + w[0].stop, n // 2 + w[1].start: n // 2 + w[1].stop]
    fill *= np.float32(1.0) - np.clip(tree * np.float32(amount), 0.0, 0.75)


def _airspace(ctx: _Ctx, label: int, rng: np.random.Generator, k: float, density: float, texture: float,
              size_factor: float) -> None:
    anat = ctx.anat
    cx, cy, bw, bh = _box(rng, label)
    bilateral = bw > 0.4 and abs(cx - anat.xm) < 0.12
    sides = [1.0, -1.0] if bilateral else [None]
    for sign in sides:
        if sign is None:
            x0 = cx
        else:
            sd = anat.side(sign)
            x0 = anat.xm - sign * (sd.s_c + 0.2 * sd.w_lat)
        rx = float(np.clip(bw * (0.25 if bilateral else 0.5) * size_factor, 0.035, 0.13))
        ry = float(np.clip(bh * 0.5 * size_factor, 0.035, 0.15))
        x, y, _ = _place(anat, x0 + rng.normal(0, 0.015), cy + rng.normal(0, 0.015), sign, 0.3 * min(rx, ry))
        got = _patch(ctx, x, y, rx, ry, rng, texture)
        if got is None:
            continue
        w, f = got
        ctx.fill[w] += f * np.float32(density * min(k, 1.15)) * ctx.air[w]
        ctx.masks[label][w] |= (f > 0.3) & (ctx.lung[w] > 0.5)


def _f_pneumonia(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    _airspace(ctx, label, rng, k, density=0.65, texture=0.45, size_factor=0.85)


def _f_infiltration(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    _airspace(ctx, label, rng, k, density=0.4, texture=0.8, size_factor=0.8)


def _f_consolidation(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """Lobar: dense, one straight fissure border, often air bronchograms (no NIH boxes: lung zones)."""
    anat = ctx.anat
    sign = 1.0 if rng.random() < 0.55 else -1.0
    sd = anat.side(sign)
    zone = int(rng.choice(3, p=[0.3, 0.25, 0.45]))
    y = sd.y_apex + (0.2, 0.45, 0.72)[zone] * (sd.y_dome - sd.y_apex) + rng.normal(0, 0.015)
    x = anat.xm - sign * (sd.s_c + sd.w_lat * rng.uniform(0.1, 0.5))
    rx, ry = rng.uniform(0.07, 0.13), rng.uniform(0.06, 0.1)
    x, y, _ = _place(anat, x, y, sign, 0.3 * min(rx, ry))
    ang = (math.pi / 2 if zone == 0 else -math.pi / 2) + rng.normal(0, 0.25)  # the fissure faces the other lobe
    got = _patch(ctx, x, y, rx, ry, rng, 0.35, (-math.cos(ang), -math.sin(ang), 0.35 * ry))
    if got is None:
        return
    w, f = got
    fill = f * np.float32(0.8 * min(k, 1.1))
    if rng.random() < 0.6:
        _bronchograms(ctx, w, fill, int(rng.integers(3)), 2.5)
    ctx.fill[w] += fill * ctx.air[w]
    ctx.masks[label][w] |= (f > 0.3) & (ctx.lung[w] > 0.5)


def _side_window(ctx: _Ctx, sd: _Side, y0: float, y1: float) -> tuple[slice, slice] | None:
    """Window over one hemithorax between canonical heights y0 and y1."""
    anat = ctx.anat
    s0, s1 = sd.s_c - sd.w_med - 0.02, sd.s_c + sd.w_lat + 0.02
    xa, xb = anat.xm - sd.sign * s0, anat.xm - sd.sign * s1
    return ctx.window(0.5 * (xa + xb), 0.5 * (y0 + y1), 0.5 * abs(xb - xa), 0.5 * (y1 - y0))


def _f_effusion(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """Fluid in the costophrenic recess: blunted angle, meniscus rising along the lateral wall."""
    anat = ctx.anat
    cx, _, _, bh = _box(rng, label)
    sides = [_side_of_box(anat, cx)]
    if rng.random() < 0.3:
        sides.append(-sides[0])
    for sign in sides:
        sd = anat.side(sign)
        height = float(np.clip(bh * rng.uniform(0.4, 0.9), 0.04, 0.25)) * min(1.0, 0.5 + 0.5 * k)
        meniscus = rng.uniform(0.04, 0.1)
        level = sd.y_cp + 0.01 - height
        w = _side_window(ctx, sd, level - meniscus - 0.02, sd.y_cp + 0.03)
        if w is None:
            continue
        s = ctx.s_of(sign, ctx.x[w])
        hemithorax, _, _, p = sd.fields(s, ctx.y[w])
        top = np.float32(level) - np.float32(meniscus) * np.clip(p, 0.0, 1.0) ** 2
        f = _soft(ctx.y[w] - top, 0.025 + 0.015 * (1 - min(k, 1.0)))
        ctx.fill[w] += f * np.float32(0.97) * ctx.air[w]
        # fluid layers posteriorly: thicker towards the base, hiding the diaphragm and the costophrenic angle
        layer = np.clip((ctx.y[w] - top) * np.float32(1.0 / 0.08), 0.0, 1.0)
        inside = _soft(hemithorax + np.float32(0.004), 3 * ctx.px)
        ctx.extra[w] += f * layer * inside * np.float32(_MU_SOFT * 2.5 * min(k, 1.2))
        ctx.markings[w] *= np.float32(1.0) - f
        ctx.masks[label][w] |= (f > 0.5) & (ctx.lung[w] > 0.5)


def _wall_distance(ctx: _Ctx, sd: _Side, w: tuple[slice, slice], apical: float) -> tuple[np.ndarray, ...]:
    """Distance to the chest wall (lateral, and apical weighted by `apical`) over window w; also (y, p)."""
    ys = ctx.y[w]
    _, d_lat, _, p = sd.fields(ctx.s_of(sd.sign, ctx.x[w]), ys)
    if apical > 0:
        d_lat = np.minimum(d_lat, (ys - np.float32(sd.y_apex)) * np.float32(apical))
    return d_lat, ys, p


def _f_pneumothorax(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """Air between the chest wall and a visceral pleural line; no lung markings peripheral to it.

    The collapsed lung is the lung shrunk towards its mediastinal base by a fraction that fades out below the
    pneumothorax's lower end, so the pleural line parallels the apical and lateral chest wall.
    """
    anat = ctx.anat
    cx, cy, bw, bh = _box(rng, label)
    sd = anat.side(_side_of_box(anat, cx))
    bottom = float(np.clip(cy + 0.5 * bh, sd.y_apex + 0.15, sd.y_cp - 0.02))
    collapse = float(np.clip(bw * rng.uniform(1.0, 2.0), 0.08, 0.45)) * (0.6 + 0.4 * min(k, 1.2))
    w = _side_window(ctx, sd, sd.y_apex - 0.01, bottom + 0.02)
    if w is None:
        return
    f32 = np.float32
    ys = ctx.y[w]
    c = np.clip((f32(bottom) - ys) * f32(1 / 0.12), 0.0, 1.0)
    np.sqrt(c, out=c)
    c *= f32(collapse)
    grow = f32(1.0) / (f32(1.0) - c)
    s_anchor, y_anchor = sd.medial(ys), bottom + 0.05
    s_rel = ctx.s_of(sd.sign, ctx.x[w]) - s_anchor
    s_map = s_rel * grow + s_anchor
    y_map = (ys - f32(y_anchor)) * grow + f32(y_anchor)
    inside = sd.fields(s_map, y_map)[0]
    lung = ctx.side_lung_at(sd.sign, w) * np.clip(s_rel * f32(1 / 0.04), 0.0, 1.0)  # spare the mediastinal side
    region = _soft(-inside, 1.5 * ctx.px) * (lung > 0.01)
    ctx.markings[w] *= f32(1.0) - region
    line_w = max(0.08 * _CM, 0.7 * ctx.px)
    line = np.clip(f32(1.0) - (inside * f32(1.0 / line_w)) ** 2, 0.0, 1.0) * (c > 0.02)
    ctx.extra[w] += line * f32(0.35 * min(k, 1.2)) * lung
    ctx.masks[label][w] |= (region > 0.5) & (lung > 0.3)


def _f_edema(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """Bilateral perihilar (bat-wing) haze and Kerley B lines at the lateral bases."""
    anat = ctx.anat
    dens = rng.uniform(0.3, 0.5) * min(k, 1.2)
    for sd in (anat.right, anat.left):
        hx, hy = sd.hilum(anat.xm, anat.carina_y)
        hx -= sd.sign * 0.03
        sx, sy = rng.uniform(0.08, 0.12), rng.uniform(0.11, 0.15)
        w = ctx.window(hx, hy, 2.2 * sx, 2.2 * sy)
        if w is None:
            continue
        d2 = _ellipse(ctx, w, hx, hy, sx, sy, 0.0)
        haze = np.exp(-d2) * (np.float32(1.0) + np.float32(0.45) * ctx.texture("blotch", w, rng))
        ctx.fill[w] += haze * np.float32(dens) * ctx.air[w]
        ctx.masks[label][w] |= (haze > 0.45) & (ctx.lung[w] > 0.5)
        # Kerley B: short horizontal septal lines reaching the lateral pleura
        w = _side_window(ctx, sd, sd.y_dome - 0.14, sd.y_cp)
        if w is None:
            continue
        dist, ys, _ = _wall_distance(ctx, sd, w, 0.0)
        thick = max(0.1 * _CM * 0.6, 0.6 * ctx.px)
        lines = np.zeros(ys.shape, np.float32)
        for _ in range(int(rng.integers(4, 10))):
            yl = rng.uniform(sd.y_dome - 0.12, sd.y_cp - 0.01)
            length = rng.uniform(1.0, 2.0) * _CM
            t = (ys - np.float32(yl)) * np.float32(1.0 / thick)
            seg = np.clip(np.float32(1.0) - t * t, 0.0, 1.0) * _soft(np.float32(length) - dist, 2 * ctx.px)
            np.maximum(lines, seg, out=lines)
        lines *= ctx.lung[w]
        ctx.fill[w] += lines * np.float32(1.2 * min(k, 1.2))
        ctx.masks[label][w] |= ndimage.binary_dilation(lines > 0.3, iterations=2)


def _f_emphysema(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, st: object) -> None:
    """Anatomy is already hyperinflated (_modify_anatomy); add bullae; the mask is the hyperlucent lung."""
    anat = ctx.anat
    for _ in range(int(rng.choice(3, p=[0.5, 0.3, 0.2]))):
        sd = anat.side(1.0 if rng.random() < 0.5 else -1.0)
        r = rng.uniform(1.5, 3.5) * _CM
        x, y, _ = _place(anat, anat.xm - sd.sign * (sd.s_c + rng.uniform(-0.02, 0.08)),
                         sd.y_apex + rng.uniform(0.06, 0.2), sd.sign, r)
        w = ctx.window(x, y, r * 1.3)
        if w is None:
            continue
        d2 = _ellipse(ctx, w, x, y, r, r * rng.uniform(0.8, 1.0), 0.0)
        inside = _soft(np.float32(1.0) - d2, 0.15)
        ctx.markings[w] *= np.float32(1.0) - inside * np.float32(0.95)
        rim = np.clip(np.float32(1.0) - ((d2 - np.float32(1.0)) * np.float32(8.0)) ** 2, 0.0, 1.0)
        ctx.fill[w] += rim * np.float32(0.4)
    ctx.masks[label] |= ctx.lung > 0.5


def _f_fibrosis(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """Reticular pattern, upper zones (or basal, subpleural), peripheral."""
    anat = ctx.anat
    upper = rng.random() < 0.65
    sides = [anat.right, anat.left] if rng.random() < 0.7 else [anat.side(1.0 if rng.random() < 0.5 else -1.0)]
    amp = np.float32(rng.uniform(0.7, 1.2) * min(k, 1.2))
    for sd in sides:
        if upper:
            y0, y1 = sd.y_apex, sd.y_apex + rng.uniform(0.2, 0.3)
        else:
            y1 = sd.y_cp
            y0 = y1 - rng.uniform(0.18, 0.28)
        w = _side_window(ctx, sd, y0, y1 + 0.04)
        if w is None:
            continue
        dist, ys, p = _wall_distance(ctx, sd, w, 0.6)
        zone = _smoothstep((np.float32(y1) - ys) * np.float32(1 / 0.06)) if upper else \
            _smoothstep((ys - np.float32(y0)) * np.float32(1 / 0.06))
        zone = zone * _smoothstep((p - np.float32(0.3)) * np.float32(4.0)) * ctx.lung[w]
        ret = ctx.texture("reticular", w, rng)
        ctx.fill[w] += zone * (ret * amp + np.float32(0.06 * min(k, 1.2)) * ctx.air[w])
        ctx.masks[label][w] |= zone > 0.5


def _f_pleural_thickening(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """A soft-tissue rind along the lateral chest wall or over the apex (an apical cap)."""
    anat = ctx.anat
    sides = [anat.right, anat.left] if rng.random() < 0.3 else [anat.side(1.0 if rng.random() < 0.5 else -1.0)]
    for sd in sides:
        apical = rng.random() < 0.35
        if apical:
            y0, y1 = sd.y_apex - 0.01, sd.y_apex + 0.14
        else:
            y0 = rng.uniform(sd.y_apex + 0.1, sd.y_cp - 0.25)
            y1 = min(y0 + rng.uniform(0.15, 0.35), sd.y_cp)
        thick = rng.uniform(0.4, 1.2) * _CM * (0.6 + 0.4 * min(k, 1.2))
        w = _side_window(ctx, sd, y0, y1)
        if w is None:
            continue
        dist, ys, _ = _wall_distance(ctx, sd, w, 0.8 if apical else 0.0)
        reach = np.float32(thick) * (np.float32(1.0) + np.float32(0.35) * ctx.texture("blotch", w, rng))
        rind = _soft(reach - dist, 1.5 * ctx.px)
        if not apical:
            rind *= _soft(ys - np.float32(y0), 0.03) * _soft(np.float32(y1) - ys, 0.03)
        ctx.fill[w] += rind * np.float32(0.9) * ctx.air[w]
        ctx.masks[label][w] |= (rind > 0.5) & (ctx.lung[w] > 0.5)


def _f_hernia(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """Hiatal hernia: a round retrocardiac opacity with an air-fluid level."""
    anat = ctx.anat
    r_cm = rng.uniform(1.5, 3.0)
    r = r_cm * _CM
    x = anat.xm + rng.uniform(0.0, 0.04)
    y = anat.left.diaphragm_y(anat.left.s_c - anat.left.w_med) - r * rng.uniform(1.0, 1.4)
    w = ctx.window(x, y, r * 1.2)
    if w is None:
        return
    d2 = _ellipse(ctx, w, x, y, r * rng.uniform(1.0, 1.25), r, 0.0)
    chord = np.float32(2 * r_cm) * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)) * _soft(np.float32(1.0) - d2, 0.15)
    level = y - r * rng.uniform(-0.1, 0.5)
    air = _soft(np.float32(level) - ctx.y[w], 1.0 * ctx.px)
    kk = np.float32(min(k, 1.2))
    ctx.extra[w] += chord * np.float32(_MU_SOFT) * kk * (np.float32(0.45) - np.float32(1.1) * air)
    ctx.masks[label][w] |= d2 <= 1.0


def _f_atelectasis(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, st: object) -> None:
    """Plate-like (discoid) linear opacity, or a basal wedge bounded by a displaced fissure (volume loss)."""
    x, y, sign, plate = st  # type: ignore[misc]
    kk = min(k, 1.2)
    if plate:
        length, thick = rng.uniform(1.5, 4.0) * _CM, rng.uniform(0.25, 0.6) * _CM
        ang = rng.normal(0, 0.25)
        w = ctx.window(x, y, length * 1.1, length * 1.1)
        if w is None:
            return
        d2 = _ellipse(ctx, w, x, y, length, thick, ang)
        f = _soft(np.float32(1.0) - d2, 0.3)
        ctx.fill[w] += f * np.float32(0.3 * kk) * ctx.air[w]
        ctx.masks[label][w] |= (f > 0.5) & (ctx.lung[w] > 0.5)
    else:
        rx, ry = rng.uniform(0.04, 0.07), rng.uniform(0.04, 0.07)
        ang = -math.pi / 2 - sign * rng.uniform(0.3, 0.8)  # fissure border facing up and out
        got = _patch(ctx, x, y, rx, ry, rng, 0.3, (-math.cos(ang), -math.sin(ang), 0.3 * ry))
        if got is None:
            return
        w, f = got
        ctx.fill[w] += f * np.float32(0.85 * kk) * ctx.air[w]
        ctx.masks[label][w] |= (f > 0.3) & (ctx.lung[w] > 0.5)


def _modify_anatomy(anat: _Anatomy, truth: np.ndarray, strength: np.ndarray,
                    rngs: list[np.random.Generator]) -> dict[int, object]:
    """Findings that change the anatomy (hyperinflation, volume loss, heart size); returns per-finding state."""
    state: dict[int, object] = {}
    i = _I["Emphysema"]
    if truth[i]:
        k = min(float(strength[i]), 1.2)
        for sd in (anat.right, anat.left):
            sd.y_dome += 0.035 * k
            sd.y_cp += 0.025 * k
            sd.h_dome *= 1.0 - 0.55 * min(k, 1.0)
            sd.depth_cm *= 1.0 + 0.12 * k
        anat.parenchyma *= 1.0 - 0.45 * min(k, 1.0)
        anat.vessels *= 1.0 - 0.35 * min(k, 1.0)
        anat.set_ctr(anat.ctr() * 0.92)
    i = _I["Atelectasis"]
    if truth[i]:
        rng = rngs[i]
        cx, cy, _, _ = _box(rng, i)
        sign = _side_of_box(anat, cx)
        sd = anat.side(sign)
        plate = rng.random() < 0.6
        if plate:
            x, y, _ = _place(anat, cx + rng.normal(0, 0.02), cy + rng.normal(0, 0.02), sign, 0.02)
        else:  # basal, medial
            x, y, _ = _place(anat, anat.xm - sign * (sd.s_c - 0.02), sd.y_dome - 0.02, sign, 0.03)
        k = min(float(strength[i]), 1.2)
        sd.y_dome -= 0.02 * k  # volume loss: the hemidiaphragm rises
        sd.y_cp -= 0.02 * k
        anat.xm -= sign * 0.006 * k  # and the mediastinum shifts towards it
        state[i] = (x, y, sign, plate)
    i = _I["Cardiomegaly"]
    if truth[i]:
        rng = rngs[i]
        _, _, bw, _ = _box(rng, i)
        target = float(np.clip(bw / 0.78, 0.53, 0.72))  # NIH box width over a typical thoracic width
        k = min(float(strength[i]), 1.0)
        anat.set_ctr(0.505 + (target - 0.505) * k)  # subtle ones are borderline (normal AP reaches 0.50)
    return state


def _f_cardiomegaly(ctx: _Ctx, rng: np.random.Generator, k: float, label: int, _st: object) -> None:
    """The enlarged heart itself is drawn by the anatomy (_modify_anatomy); the mask is its silhouette."""
    anat = ctx.anat
    hx, hy, a, b, ang, _ = anat.heart
    w = ctx.window(hx, hy, a * 1.05, a * 1.05)
    if w is None:
        return
    xs, ys = ctx.x[w], ctx.y[w]
    right = xs < np.float32(anat.xm)
    d_dia = np.where(right, anat.right.fields(ctx.s_of(1.0, xs), ys)[2], anat.left.fields(ctx.s_of(-1.0, xs), ys)[2])
    ctx.masks[label][w] |= (_ellipse(ctx, w, hx, hy, a, b, ang) <= 1.0) & (d_dia > 0)


_FINDINGS = {
    "Atelectasis": _f_atelectasis,
    "Cardiomegaly": _f_cardiomegaly,
    "Effusion": _f_effusion,
    "Infiltration": _f_infiltration,
    "Mass": _f_mass,
    "Nodule": _f_nodule,
    "Pneumonia": _f_pneumonia,
    "Pneumothorax": _f_pneumothorax,
    "Consolidation": _f_consolidation,
    "Edema": _f_edema,
    "Emphysema": _f_emphysema,
    "Fibrosis": _f_fibrosis,
    "Pleural_Thickening": _f_pleural_thickening,
    "Hernia": _f_hernia,
}
