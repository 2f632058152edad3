"""A deterministic synthetic chest radiograph phantom with known lesion masks (the demo model's training data).

``generate(seed, index)`` draws one frontal chest radiograph: labels from the real NIH ChestX-ray14 label
combinations (prevalence, co-occurrence and view from ``model/data/nih_label_table.npz``), lesion positions from the
real NIH bounding boxes where a finding has them, an analytic anatomy (body, lungs, mediastinum, heart, diaphragm,
ribs, clavicles, spine, vessels) rendered as X-ray attenuation, one visual signature per finding, acquisition
variation (exposure, quantum noise, rotation, field of view, tone, MONOCHROME1/2, 12/14/16-bit storage) and label
noise like that of NLP-mined labels. Same (seed, index, size, config) -> the same sample: labels, patients and every
random draw are platform independent (numpy PCG64/SeedSequence); pixel values are bit-identical on one machine and
numpy/BLAS build, and may differ by a quantisation step across CPUs (vectorised exp, BLAS rounding).

Geometry: the canonical frame is the unit square (x to the image right = patient's left, y down), 1.0 = 350 mm at
acquisition scale 1; an image of ``size`` pixels therefore has ``350 / size / scale`` mm pixels. Attenuation is in
"line integral" units: soft tissue 0.2 per cm, bone 0.45 per cm; air 0.

The images are synthetic phantoms, NOT patient data and not for diagnosis; ``to_dicom`` says so in ImageComments.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

from model.types import LABELS

__all__ = [
    "DEFAULT_CONFIG",
    "FIELD_OF_VIEW_MM",
    "MANUFACTURER",
    "PHANTOM_COMMENT",
    "PhantomConfig",
    "PhantomLabels",
    "PhantomSample",
    "generate",
    "sample_labels",
    "to_dicom",
]

FIELD_OF_VIEW_MM = 350.0
MANUFACTURER = "chexd phantom"
PHANTOM_COMMENT = "SYNTHETIC PHANTOM - NOT A PATIENT"

_N = len(LABELS)
_I = {name: i for i, name in enumerate(LABELS)}
_CM = 10.0 / FIELD_OF_VIEW_MM  # canonical units per cm
_MU_SOFT = 0.2  # attenuation per cm of soft tissue
_MU_BONE = 0.45  # per cm of bone
_BLOCK = 512  # indices per patient block: patients never straddle blocks
_MIN_SIZE = 64

# RNG streams: every random quantity has its own stream, keyed (seed, stream, ...), so forcing one finding changes
# nothing else. The texture bank uses fixed keys that no seed can reach (its stream id is not a user stream).
_S_BLOCK, _S_PATIENT, _S_LABELS, _S_NOISE_LABELS, _S_ACQ, _S_ANATOMY, _S_PIXELS, _S_FINDING = range(1, 9)
_S_BANK = 99


# ---------------------------------------------------------------------------------------------------------- types


@dataclass(frozen=True, kw_only=True, slots=True)
class PhantomConfig:
    """Knobs of the phantom; the defaults give the demo model's task.

    - ``drop_rate``: probability that a drawn finding is missing from ``labels`` (NLP false negative), in [0, 1).
    - ``false_positive_rate``: probability that an image's ``labels`` gain one finding that was not drawn (chosen in
      proportion to NIH prevalence), in [0, 1).
    - ``follow_up_persistence``: probability that a patient's follow-up image repeats the patient's first label
      combination instead of a fresh draw (marginal prevalence is unchanged); None: the excess repeat rate of the NIH
      file over chance (0.083: 0.360 observed, 0.302 by chance).
    - ``max_images_per_patient``: the NIH images-per-patient distribution is truncated here (>= 1).
    - ``lesion_contrast``: multiplies every lesion's contrast (> 0; lower = subtler task).
    - ``noise``: multiplies the quantum noise (>= 0).
    - ``monochrome1_rate``: fraction of images stored as MONOCHROME1, in [0, 1].
    """

    drop_rate: float = 0.10
    false_positive_rate: float = 0.03
    follow_up_persistence: float | None = None
    max_images_per_patient: int = 24
    lesion_contrast: float = 1.0
    noise: float = 1.0
    monochrome1_rate: float = 0.3

    def __post_init__(self) -> None:
        for name in ("drop_rate", "false_positive_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Invalid {name} {value!r} - must be in [0, 1)")
        if self.follow_up_persistence is not None and not 0.0 <= self.follow_up_persistence <= 1.0:
            raise ValueError(f"Invalid follow_up_persistence {self.follow_up_persistence!r} - must be in [0, 1]")
        if self.max_images_per_patient < 1:
            raise ValueError(f"Invalid max_images_per_patient {self.max_images_per_patient!r} - must be >= 1")
        if not self.lesion_contrast > 0.0:
            raise ValueError(f"Invalid lesion_contrast {self.lesion_contrast!r} - must be > 0")
        if not self.noise >= 0.0:
            raise ValueError(f"Invalid noise {self.noise!r} - must be >= 0")
        if not 0.0 <= self.monochrome1_rate <= 1.0:
            raise ValueError(f"Invalid monochrome1_rate {self.monochrome1_rate!r} - must be in [0, 1]")


DEFAULT_CONFIG = PhantomConfig()


@dataclass(frozen=True, kw_only=True, slots=True)
class PhantomLabels:
    """The label draw of one phantom image (cheap: no pixels).

    ``labels``: uint8 [14] the noisy, NLP-like labels used for training and evaluation; ``true_labels``: uint8 [14]
    what is drawn in the image; both in ``model.types.LABELS`` order. ``patient_id`` is shared by the
    ``follow_up``-numbered images of one patient; ``view`` is "PA" or "AP"; ``age`` in years; ``sex`` "M" or "F".
    """

    labels: np.ndarray
    true_labels: np.ndarray
    patient_id: str
    follow_up: int
    view: str
    age: int
    sex: str


@dataclass(frozen=True, kw_only=True, slots=True)
class PhantomSample:
    """One synthetic frontal chest radiograph with its ground truth.

    - ``image``: float32 [size, size] in [0, 1], bright = dense (MONOCHROME2 display after the VOI window); equals
      what ``model.preprocess.decode_image(to_dicom(sample))`` returns (to float32 rounding).
    - ``stored``: uint16 [size, size] stored pixel values in [0, 2**bits_stored - 1] as they would be written, in
      ``photometric`` ("MONOCHROME1": bright = less dense) orientation; ``window_center``/``window_width`` are the
      linear VOI window in stored units (PS3.3 C.11.2.1.2) that yields ``image``.
    - ``labels``: uint8 [14] noisy training/evaluation labels; ``true_labels``: uint8 [14] the findings drawn;
      ``conspicuity``: float32 [14] each drawn finding's contrast factor (0 where absent; < 0.5 is subtle).
    - ``masks``: bool [14, size, size] lesion mask per finding, all False where the finding is not drawn.
    - ``thorax``: bool [size, size] the chest cavity (both hemithoraces and the mediastinum above the diaphragm,
      with a margin of about 1 cm); every mask lies inside it.
    - ``pixel_spacing_mm``: mm per pixel; ``ctr``: the drawn cardiothoracic ratio (> 0.5 with Cardiomegaly).
    - ``patient_id``, ``follow_up``, ``view``, ``age``, ``sex``, ``study_date``: the synthetic demographics;
      ``seed``, ``index``: what generated it.
    """

    image: np.ndarray
    stored: np.ndarray
    photometric: str
    bits_stored: int
    window_center: float
    window_width: float
    labels: np.ndarray
    true_labels: np.ndarray
    conspicuity: np.ndarray
    masks: np.ndarray
    thorax: np.ndarray
    pixel_spacing_mm: float
    ctr: float
    patient_id: str
    follow_up: int
    view: str
    age: int
    sex: str
    study_date: _dt.date
    seed: int
    index: int

    def __post_init__(self) -> None:
        size = self.image.shape[0] if self.image.ndim == 2 else -1
        if self.image.ndim != 2 or self.image.shape != (size, size) or self.image.dtype != np.float32:
            raise ValueError(f"Invalid image {self.image.shape} {self.image.dtype} - expected float32 [size, size]")
        if self.stored.shape != (size, size) or self.stored.dtype != np.uint16:
            raise ValueError(f"Invalid stored {self.stored.shape} {self.stored.dtype} - expected uint16 [size, size]")
        if self.masks.shape != (_N, size, size) or self.masks.dtype != np.bool_:
            raise ValueError(f"Invalid masks {self.masks.shape} {self.masks.dtype} - expected bool [{_N}, size, size]")
        if self.thorax.shape != (size, size) or self.thorax.dtype != np.bool_:
            raise ValueError(f"Invalid thorax {self.thorax.shape} - expected bool [{size}, {size}]")
        for name in ("labels", "true_labels"):
            arr = getattr(self, name)
            if arr.shape != (_N,) or arr.dtype != np.uint8 or arr.max(initial=0) > 1:
                raise ValueError(f"Invalid {name} {arr.shape} {arr.dtype} - expected uint8 0/1 [{_N}]")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f"Invalid photometric {self.photometric!r} - expected MONOCHROME1 or MONOCHROME2")
        if self.bits_stored not in (12, 14, 16):
            raise ValueError(f"Invalid bits_stored {self.bits_stored!r} - expected 12, 14 or 16")
        if self.view not in ("PA", "AP"):
            raise ValueError(f"Invalid view {self.view!r} - expected PA or AP")
        if self.sex not in ("M", "F"):
            raise ValueError(f"Invalid sex {self.sex!r} - expected M or F")
        if not self.window_width > 1:
            raise ValueError(f"Invalid window_width {self.window_width!r} - must be > 1")

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


# ---------------------------------------------------------------------------------------------------- NIH table


@dataclass(frozen=True, slots=True)
class _Table:
    combo_mask: np.ndarray  # uint16 [K]
    combo_bits: np.ndarray  # uint8 [K, 14]
    joint_cdf: np.ndarray  # float64 [2K] over (combo, view) pairs, view-major: [PA..., AP...]
    combo_cdf: np.ndarray  # float64 [K]
    combo_ap_fraction: np.ndarray  # float64 [K]
    prevalence: np.ndarray  # float64 [14]
    patient_counts: np.ndarray  # int64 [M + 1]
    male_fraction: float
    age_cdf: np.ndarray  # float64 [2, 101]
    persistence: float
    boxes: tuple[np.ndarray, ...]  # per label: float32 [n, 4] (cx, cy, w, h), empty for findings without boxes


@functools.cache
def _table() -> _Table:
    with resources.files("model.data").joinpath("nih_label_table.npz").open("rb") as fh:
        raw = np.load(fh, allow_pickle=False)
        data = {key: raw[key] for key in raw.files}
    if tuple(str(v) for v in data["labels"]) != LABELS:
        raise RuntimeError("model/data/nih_label_table.npz labels do not match model.types.LABELS - re-derive it")
    masks = data["combo_mask"].astype(np.int64)
    counts = data["combo_count"].astype(np.float64)
    bits = ((masks[:, None] >> np.arange(_N)) & 1).astype(np.uint8)
    total = counts.sum()
    joint = np.concatenate([counts[:, 0], counts[:, 1]]) / total
    per_combo = counts.sum(axis=1) / total
    prevalence = (bits * per_combo[:, None]).sum(axis=0)
    chance = float((per_combo**2).sum())
    persistence = max(0.0, (float(data["follow_up_same_combo"]) - chance) / (1.0 - chance))
    ages = data["age_hist"].astype(np.float64)
    boxes = []
    for i in range(_N):
        b = data["bbox"][data["bbox_label"] == i].astype(np.float64)
        boxes.append(np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2, b[:, 2], b[:, 3]], axis=1))
    return _Table(
        combo_mask=data["combo_mask"],
        combo_bits=bits,
        joint_cdf=np.cumsum(joint),
        combo_cdf=np.cumsum(per_combo),
        combo_ap_fraction=counts[:, 1] / counts.sum(axis=1),
        prevalence=prevalence,
        patient_counts=data["patient_image_counts"].astype(np.int64),
        male_fraction=float(ages[0].sum() / ages.sum()),
        age_cdf=np.cumsum(ages, axis=1) / ages.sum(axis=1, keepdims=True),
        persistence=persistence,
        boxes=tuple(boxes),
    )


def _draw(cdf: np.ndarray, u: float) -> int:
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(cdf) - 1)


# ------------------------------------------------------------------------------------------------ patients, labels


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(keys))))


def _check_seed_index(seed: int, index: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Invalid seed {seed!r} - must be an integer >= 0")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"Invalid index {index!r} - must be an integer >= 0")


@functools.lru_cache(maxsize=256)
def _block_starts(seed: int, block: int, max_images: int) -> np.ndarray:
    """First index (within the block) of each patient of a block of ``_BLOCK`` consecutive indices."""
    counts = _table().patient_counts[1 : max_images + 1].astype(np.float64)
    cdf = np.cumsum(counts)
    rng = _rng(seed, _S_BLOCK, block)
    n = np.searchsorted(cdf, rng.random(_BLOCK) * cdf[-1], side="right") + 1
    ends = np.cumsum(n)
    k = int(np.searchsorted(ends, _BLOCK))
    return np.concatenate([[0], ends[:k]]).astype(np.int64)


@dataclass(frozen=True, slots=True)
class _Patient:
    patient_id: str
    key: tuple[int, int, int]
    follow_up: int
    sex: str
    age0: int
    base_combo: int
    first_date: _dt.date


@functools.lru_cache(maxsize=4096)
def _patient_of(seed: int, index: int, max_images: int) -> _Patient:
    block, pos = divmod(index, _BLOCK)
    starts = _block_starts(seed, block, max_images)
    j = int(np.searchsorted(starts, pos, side="right")) - 1
    t = _table()
    rng = _rng(seed, _S_PATIENT, block, j)
    u = rng.random(4)
    sex = "M" if u[0] < t.male_fraction else "F"
    age0 = _draw(t.age_cdf[0 if sex == "M" else 1], u[1])
    base_combo = _draw(t.combo_cdf, u[2])
    first = _dt.date(2012, 1, 1) + _dt.timedelta(days=int(u[3] * 3650))
    follow_up = pos - int(starts[j])
    return _Patient(f"PH{seed}-{block:05d}{j:03d}", (seed, block, j), follow_up, sex, age0, base_combo, first)


def sample_labels(
    seed: int,
    index: int,
    *,
    config: PhantomConfig = DEFAULT_CONFIG,
    force: Mapping[str, bool] | None = None,
) -> PhantomLabels:
    """The labels, patient and view of ``generate(seed, index, config=config, force=force)`` without any pixels.

    ``force`` maps finding names (``model.types.LABELS``) to present (True) or absent (False) and overrides the
    drawn ``true_labels``; label noise is then applied to the forced truth with the same random draws.

    Raises:
        ValueError: a negative or non-integer seed/index, or an unknown finding name in ``force``.
    """
    _check_seed_index(seed, index)
    seed, index = int(seed), int(index)
    t = _table()
    patient = _patient_of(seed, index, config.max_images_per_patient)
    rng = _rng(seed, _S_LABELS, index)
    u_persist, u_combo, u_view = rng.random(3)
    rho = t.persistence if config.follow_up_persistence is None else config.follow_up_persistence
    if patient.follow_up == 0 or u_persist < rho:
        combo = patient.base_combo
        view = "AP" if u_view < t.combo_ap_fraction[combo] else "PA"
    else:
        k = _draw(t.joint_cdf, u_combo)
        combo, view = k % len(t.combo_mask), ("PA", "AP")[k // len(t.combo_mask)]
    truth = t.combo_bits[combo].copy()
    if force:
        for name, present in force.items():
            if name not in _I:
                raise ValueError(f"Invalid finding {name!r} in force - expected one of {list(LABELS)}")
            truth[_I[name]] = 1 if present else 0
    noise = _rng(seed, _S_NOISE_LABELS, index)
    u_drop = noise.random(_N)
    u_fp, u_fp_label = noise.random(2)
    labels = truth.copy()
    labels[(truth == 1) & (u_drop < config.drop_rate)] = 0
    if u_fp < config.false_positive_rate:
        labels[_draw(np.cumsum(t.prevalence), u_fp_label)] = 1
    age = min(100, patient.age0 + patient.follow_up // 3)
    return PhantomLabels(
        labels=labels,
        true_labels=truth,
        patient_id=patient.patient_id,
        follow_up=patient.follow_up,
        view=view,
        age=age,
        sex=patient.sex,
    )


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
    anat, n = ctx.anat, ctx.n
    x, y = ctx.x, ctx.y
    xm = np.float32(anat.xm)
    s_abs = np.abs(x - xm)
    y_apex = anat.right.y_apex

    # body: an elliptic cylinder; neck at the top, broad shoulders, narrowing slightly towards the abdomen
    neck = _smoothstep((y - np.float32(y_apex - 0.1)) * np.float32(1.0 / 0.11))
    half = np.float32(0.08) + (np.float32(anat.chest_half * 1.1 - 0.08) - np.float32(0.1 * anat.chest_half) *
                               np.clip(y - np.float32(y_apex), 0.0, 0.8)) * neck
    r = s_abs / half
    body = (np.float32(anat.body_cm * 0.6) + np.float32(anat.body_cm * 0.4) * neck) * np.sqrt(
        np.clip(1.0 - r * r, 0.0, 1.0))

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

    # breasts (soft tissue over the lower lungs)
    if anat.breast > 0:
        for sign in (1.0, -1.0):
            bx, by = anat.xm - sign * 0.25, anat.right.y_dome + 0.02
            w = ctx.window(bx, by, 0.2, 0.14)
            if w is not None:
                d2 = _ellipse(ctx, w, bx, by, 0.2, 0.13, sign * 0.3)
                body[w] += np.float32(anat.breast) * np.clip(1.0 - d2, 0.0, 1.0)

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
    return body, bone


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


# -------------------------------------------------------------------------------------------------- generate


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE or size > 4096:
        raise ValueError(f"Invalid size {size!r} - must be an integer in {_MIN_SIZE}..4096 pixels")


def generate(
    seed: int,
    index: int,
    *,
    size: int = 512,
    force: Mapping[str, bool] | None = None,
    config: PhantomConfig = DEFAULT_CONFIG,
) -> PhantomSample:
    """Draw phantom image ``index`` of the series ``seed`` at ``size`` x ``size`` pixels.

    Deterministic: the same arguments give a bit-identical sample in any process. ``force`` (finding name ->
    present/absent) overrides the drawn findings and leaves everything else (anatomy, acquisition, other lesions,
    noise) unchanged, so a forced pair differs only by that finding. See :class:`PhantomSample` for the fields.

    Raises:
        ValueError: seed or index not an integer >= 0, size outside 64..4096, an unknown name in ``force``.
    """
    _check_size(size)
    lab = sample_labels(seed, index, config=config, force=force)
    seed, index, size = int(seed), int(index), int(size)
    patient = _patient_of(seed, index, config.max_images_per_patient)
    bank = _bank(size)

    acq = _rng(seed, _S_ACQ, index)
    u = acq.random(12)
    anat = _anatomy(patient, lab.view, acq)
    rot = math.radians((u[0] - 0.5) * 8.0)
    scale = 0.9 + 0.2 * u[1]
    dx, dy = (u[2] - 0.5) * 0.06, (u[3] - 0.5) * 0.06 - 0.01

    truth = lab.true_labels
    rngs = [_rng(seed, _S_FINDING, index, i) for i in range(_N)]
    strength = np.zeros(_N, np.float32)
    for i in np.flatnonzero(truth):
        strength[i] = min(1.3, float(np.exp(rngs[i].normal(-0.1, 0.45)))) * config.lesion_contrast

    state = _modify_anatomy(anat, truth, strength, rngs)
    ctx = _Ctx(bank, anat, rot, scale, dx, dy)
    body, bone = _render_anatomy(ctx)
    for i in np.flatnonzero(truth):
        _FINDINGS[LABELS[i]](ctx, rngs[i], float(strength[i]), int(i), state.get(int(i)))
    _vessels(ctx)
    f32 = np.float32
    air = np.subtract(ctx.air, ctx.fill, out=ctx.air)
    np.maximum(air, 0.0, out=air)
    tissue = ctx.markings  # lung parenchyma is ~13% tissue; none in a pneumothorax
    tissue *= f32(-anat.parenchyma)
    tissue += f32(1.0)
    air *= tissue
    atten = np.subtract(body, air, out=body)
    atten *= f32(_MU_SOFT)
    bone *= f32(_MU_BONE)
    atten += bone
    atten += ctx.extra

    # acquisition: quantum noise (more where fewer photons arrive), unsharp-mask processing, tone curve,
    # quantisation to the stored bit depth, and a linear VOI window
    sigma = 0.009 * math.exp(u[4] * math.log(3.0)) * config.noise * (size / 512.0)
    if sigma > 0:
        z = _rng(seed, _S_PIXELS, index).standard_normal((size, size), dtype=np.float32)
        gain = atten * f32(0.22)
        np.exp(gain, out=gain)
        gain *= f32(sigma)
        z *= gain
        atten += z
    alpha = 1.5 + 2.0 * u[10]  # local contrast gain: lifts vessels, edges, lesions (and noise) alike
    low = bank.lowpass(atten)
    low *= f32(alpha)
    atten *= f32(1.0 + alpha)
    atten -= low
    gamma, a_ref = 0.6 + 1.2 * u[5], 7.0
    norm = 1.0 / (1.0 - math.exp(-gamma))
    bits = (12, 14, 16)[int(u[6] * 3)]
    vmax = 2**bits - 1

    def tone(a: float) -> float:  # attenuation -> fraction of the stored range
        return (1.0 - math.exp(-gamma * a / a_ref)) * norm

    atten *= f32(-gamma / a_ref)
    np.exp(atten, out=atten)
    atten *= f32(-norm * vmax)
    atten += f32(norm * vmax)
    np.rint(atten, out=atten)
    np.clip(atten, 0, vmax, out=atten)
    stored2 = atten.astype(np.uint16)
    lo = round(tone(0.5 * u[7]) * vmax)
    hi = round(tone(6.0 + 1.0 * u[8]) * vmax)
    atten -= f32(lo)
    atten *= f32(1.0 / (hi - lo))
    image = np.clip(atten, 0.0, 1.0, out=atten)
    photometric = "MONOCHROME1" if u[9] < config.monochrome1_rate else "MONOCHROME2"
    if photometric == "MONOCHROME1":
        stored = np.subtract(np.uint16(vmax), stored2, out=stored2)
        s_lo, s_hi = vmax - hi, vmax - lo
    else:
        stored, s_lo, s_hi = stored2, lo, hi
    ctx.masks &= ctx.thorax
    return PhantomSample(
        image=image,
        stored=stored,
        photometric=photometric,
        bits_stored=bits,
        window_center=(s_lo + s_hi) / 2 + 0.5,
        window_width=float(s_hi - s_lo + 1),
        labels=lab.labels,
        true_labels=truth,
        conspicuity=strength,
        masks=ctx.masks,
        thorax=ctx.thorax,
        pixel_spacing_mm=FIELD_OF_VIEW_MM / size / scale,
        ctr=anat.ctr(),
        patient_id=lab.patient_id,
        follow_up=lab.follow_up,
        view=lab.view,
        age=lab.age,
        sex=lab.sex,
        study_date=patient.first_date + _dt.timedelta(days=45 * lab.follow_up),
        seed=seed,
        index=index,
    )


# ---------------------------------------------------------------------------------------------------- DICOM


def to_dicom(
    sample: PhantomSample,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "DX",
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Return ``sample`` as a DX (Digital X-Ray For Presentation, PS3.3 A.26) or CR (PS3.3 A.2) image dataset.

    Explicit VR Little Endian with file meta; UIDs not given are derived deterministically from the sample's
    seed and index. ``model.preprocess.decode_image`` of the result equals ``sample.image`` (float32 rounding).

    Raises:
        ValueError: modality other than "DX" or "CR".
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"Invalid modality {modality!r} - expected 'DX' or 'CR'")
    key = [f"chexd-phantom:{sample.seed}:{sample.index}"]
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    study_uid = study_uid or generate_uid(entropy_srcs=[*key, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[*key, "series", modality])
    sop_uid = sop_uid or generate_uid(entropy_srcs=[*key, "instance", modality])
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CHEXD_PHANTOM"

    date = sample.study_date.strftime("%Y%m%d")
    minutes = 8 * 60 + (sample.index * 7) % 600
    time = f"{minutes // 60:02d}{minutes % 60:02d}00"
    birth = sample.study_date.replace(year=sample.study_date.year - sample.age, month=1, day=1) \
        if sample.study_date.year - sample.age > 1 else _dt.date(1900, 1, 1)
    spacing = f"{sample.pixel_spacing_mm:.4f}"

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] + ([""] if modality == "DX" else [])
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AccessionNumber = f"PH{sample.seed % 10000:04d}{sample.index:08d}"[:16]
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "chexd synthetic chest phantom"
    ds.InstitutionName = "chexd synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"{modality} CHEST {sample.view}"
    ds.SeriesDescription = f"CHEST {sample.view}"
    ds.PatientName = f"PHANTOM^{sample.patient_id}"
    ds.PatientID = sample.patient_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sample.sex
    ds.PatientAge = f"{sample.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{sample.follow_up + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.ViewPosition = sample.view
    ds.ImageComments = PHANTOM_COMMENT
    ds.BurnedInAnnotation = "NO"
    ds.KVP = 120 if sample.view == "PA" else 90
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = sample.photometric
    ds.Rows = ds.Columns = sample.size
    ds.BitsAllocated = 16
    ds.BitsStored = sample.bits_stored
    ds.HighBit = sample.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = f"{sample.window_center:g}"
    ds.WindowWidth = f"{sample.window_width:g}"
    ds.WindowCenterWidthExplanation = "PHANTOM"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        # PS3.3 C.8.11.3.1.2: -1 = higher values are less beam intensity (denser), as in our MONOCHROME2 data
        ds.PixelIntensityRelationshipSign = -1 if sample.photometric == "MONOCHROME2" else 1
        ds.PresentationLUTShape = "INVERSE" if sample.photometric == "MONOCHROME1" else "IDENTITY"
        ds.ImageLaterality = "U"
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
        view = ("399348003", "SCT", "postero-anterior") if sample.view == "PA" else \
            ("399067008", "SCT", "antero-posterior")
        ds.ViewCodeSequence = [_code(*view)]
    ds.PixelData = sample.stored.astype("<u2").tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
