"""``generate(seed, index)``: one phantom radiograph from its labels, anatomy, findings and acquisition variation.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping

import numpy as np

from model.phantom.anatomy import _anatomy, _Bank, _bank, _Ctx, _render_anatomy, _vessels
from model.phantom.lesions import _FINDINGS, _modify_anatomy
from model.phantom.sampling import _patient_of, sample_labels
from model.phantom.values import (
    _MIN_SIZE,
    _MU_BONE,
    _MU_SOFT,
    _N,
    _S_ACQ,
    _S_FINDING,
    _S_PIXELS,
    DEFAULT_CONFIG,
    FIELD_OF_VIEW_MM,
    PhantomConfig,
    PhantomSample,
    _rng,
)
from model.types import LABELS

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
    # acquisition: attenuation, quantum noise and unsharp masking, tone curve, stored bits and the VOI window
    atten = _attenuation(ctx, body, bone)
    _noise_and_sharpen(atten, bank, u, seed, index, size, config)
    image, stored, photometric, bits, s_lo, s_hi = _tone_and_store(atten, u, config)
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


def _attenuation(ctx: _Ctx, body: np.ndarray, bone: np.ndarray) -> np.ndarray:
    """Total attenuation [n, n] (line-integral units) from the rendered body, air, bone and finding thicknesses (cm).
    Reuses ``body``'s buffer and ``ctx.air`` / ``ctx.markings`` in place."""
    anat = ctx.anat
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
    return atten


def _noise_and_sharpen(
    atten: np.ndarray, bank: _Bank, u: np.ndarray, seed: int, index: int, size: int, config: PhantomConfig
) -> None:
    """Acquisition, in place on ``atten``: quantum noise (more where fewer photons arrive; its own RNG stream), then
    unsharp-mask processing. ``u``: the image's acquisition draws."""
    f32 = np.float32
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


def _tone_and_store(
    atten: np.ndarray, u: np.ndarray, config: PhantomConfig
) -> tuple[np.ndarray, np.ndarray, str, int, int, int]:
    """Tone curve, quantisation to the stored bit depth (12/14/16) and a linear VOI window, reusing ``atten``'s buffer.

    Returns (image float32 in [0, 1], stored uint16, photometric, bits stored, window low, window high), the window in
    stored values (inverted for MONOCHROME1)."""
    f32 = np.float32
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
    return image, stored, photometric, bits, s_lo, s_hi
