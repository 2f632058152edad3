"""The phantom's constants, RNG streams and value types: :class:`PhantomConfig`, :class:`PhantomLabels`,
:class:`PhantomSample`.

Geometry: the canonical frame is the unit square (x to the image right = patient's left, y down), 1.0 = 350 mm at
acquisition scale 1. Attenuation is in "line integral" units: soft tissue 0.2 per cm, bone 0.45 per cm; air 0.
Every random quantity has its own stream, keyed ``(seed, stream, ...)`` (:func:`_rng`).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

from model.types import LABELS

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


# ------------------------------------------------------------------------------------------------ patients, labels


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(keys))))


def _check_seed_index(seed: int, index: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Invalid seed {seed!r} - must be an integer >= 0")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"Invalid index {index!r} - must be an integer >= 0")
