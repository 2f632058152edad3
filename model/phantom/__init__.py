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

Modules, in dependency order: :mod:`~model.phantom.values` (constants, RNG streams, the config and sample types),
:mod:`~model.phantom.sampling` (labels, patients and views from the NIH table), :mod:`~model.phantom.anatomy` (the
analytic anatomy and its rendering context), :mod:`~model.phantom.lesions` (one signature per finding),
:mod:`~model.phantom.render` (:func:`generate`) and :mod:`~model.phantom.dicom` (:func:`to_dicom`).
"""

from model.phantom.anatomy import _bank as _bank  # the texture bank's cache: tests clear it to check the rebuild
from model.phantom.dicom import to_dicom
from model.phantom.render import generate
from model.phantom.sampling import sample_labels
from model.phantom.values import (
    DEFAULT_CONFIG,
    FIELD_OF_VIEW_MM,
    MANUFACTURER,
    PHANTOM_COMMENT,
    PhantomConfig,
    PhantomLabels,
    PhantomSample,
)

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
