"""Fixtures for the report tests: a phantom DICOM image with known lesions and a Prediction built from numpy.

The prediction needs no model: probabilities are chosen, each finding's CAM is its phantom lesion mask pooled to a
CAM grid (a perfect detector's heat) and the channel evidence is made up but exact (top-k contributions plus the rest
sum to logit - bias).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import numpy as np
import pydicom

from model.phantom import PhantomSample, generate, to_dicom
from model.preprocess import decode_image
from model.types import LABELS, Prediction
from reporting.exclusions import ExclusionRules
from reporting.report import ImageResult, ModelInfo, SourceImage, StudyReport, assemble, study_report

CELLS = 8
WEIGHTS = "ab" * 32
THRESHOLDS: dict[str, float] = dict.fromkeys(LABELS, 0.5) | {"Effusion": 0.4, "Cardiomegaly": 0.3, "Pneumothorax": 0.3}


def demo_model(*, synthetic: bool = True) -> ModelInfo:
    return ModelInfo(
        name="chexd-test",
        version="0123456789abcdef",
        weights_sha256=WEIGHTS,
        calibrated_at=dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC),
        synthetic=synthetic,
        intended_use="tests only",
    )


def pool(mask: np.ndarray, cells: int = CELLS) -> np.ndarray:
    """Fraction of each of cells x cells blocks covered by ``mask`` (square, side divisible by cells)."""
    s = mask.shape[0] // cells
    return mask.reshape(cells, s, cells, s).mean(axis=(1, 3)).astype(np.float32)


def make_prediction(
    probabilities: Mapping[str, float], *, masks: np.ndarray | None = None, seed: int = 0, top_k: int = 8,
    model_version: str = "0123456789abcdef",
) -> Prediction:
    """A Prediction with the given probabilities (others 0.02); CAMs from ``masks`` [14, S, S] where given."""
    rng = np.random.default_rng(seed)
    n = len(LABELS)
    probs = np.array([probabilities.get(label, 0.02) for label in LABELS], dtype=np.float32)
    logits = np.log(probs / (1 - probs)).astype(np.float32)
    bias = rng.normal(-1.0, 0.3, n).astype(np.float32)
    channels = np.stack([rng.choice(1024, top_k, replace=False) for _ in range(n)]).astype(np.int64)
    # top-k contributions: most of (logit - bias), largest first, one pushing against
    total = logits - bias
    weights = np.array([0.4, 0.25, 0.15, 0.1, -0.05, 0.05, 0.04, 0.03][:top_k], dtype=np.float32)
    contributions = (total[:, None] * weights[None, :]).astype(np.float32)
    cams = rng.normal(-0.5, 0.1, (n, CELLS, CELLS)).astype(np.float32)
    if masks is not None:
        for i in range(n):
            if masks[i].any():
                cams[i] = 3.0 * pool(masks[i]) - 0.2
    return Prediction(
        labels=LABELS,
        probabilities=probs,
        logits=logits,
        cams=cams,
        top_channels=channels,
        top_contributions=contributions,
        bias=bias,
        model_version=model_version,
        # the listed top-k carry about 30% of the total evidence sum_k |phi_ck| (the rest: the channels not listed)
        evidence_total=(np.abs(contributions).sum(axis=1) / 0.3).astype(np.float32),
    )


def phantom_case(
    index: int = 2,
    *,
    findings: Mapping[str, float] | None = None,
    size: int = 256,
    seed: int = 5,
    study_uid: str | None = None,
    monochrome1: bool | None = None,
) -> tuple[PhantomSample, pydicom.Dataset, np.ndarray, Prediction]:
    """A phantom with ``findings`` (label -> probability) drawn, its DICOM, its decoded image and a prediction."""
    findings = dict(findings or {"Effusion": 0.9, "Cardiomegaly": 0.8})
    force = {label: label in findings for label in LABELS}
    sample = generate(seed, index, size=size, force=force)
    ds = to_dicom(sample, study_uid=study_uid)
    if monochrome1 is not None and (sample.photometric == "MONOCHROME1") != monochrome1:
        # flip the stored orientation: same picture after decoding
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        top = (1 << sample.bits_stored) - 1
        ds.PixelData = (top - sample.stored.astype(np.int64)).astype("<u2").tobytes()
        ds.WindowCenter = f"{top - sample.window_center:g}"
        if "PresentationLUTShape" in ds:
            ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        if "PixelIntensityRelationshipSign" in ds:
            ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
    image = decode_image(ds)
    prediction = make_prediction(findings, masks=sample.masks)
    return sample, ds, image, prediction


def image_result(ds: pydicom.Dataset, image: np.ndarray, prediction: Prediction,
                 thresholds: Mapping[str, float] = THRESHOLDS) -> ImageResult:
    return assemble(prediction, image, SourceImage.from_dataset(ds), thresholds=thresholds, rules=ExclusionRules())


def phantom_report(*, revision: int = 1, predecessors: tuple[str, ...] = (), synthetic: bool = True,
                   findings: Mapping[str, float] | None = None) -> tuple[StudyReport, list[pydicom.Dataset]]:
    _, ds, image, prediction = phantom_case(findings=findings)
    report = study_report([image_result(ds, image, prediction)], demo_model(synthetic=synthetic), revision=revision,
                          predecessors=predecessors, created_at=dt.datetime(2026, 11, 27, 9, 30, tzinfo=dt.UTC))
    return report, [ds]
