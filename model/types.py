"""Plain value types that cross package boundaries (no torch import here).

Label order is CheXNet's; every array of per-finding values is paired with ``LABELS`` (or a manifest's labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class PreprocessRecipe:
    """How an image in [0, 1] (bright = dense) becomes the network input.

    ``channels``: 3 (grey repeated, CheXNet) or 1 (torchxrayvision). ``input_size``: square side in pixels fed to the
    network. ``resize``: side the image is first resized to, then centre-cropped to ``input_size`` (None: resize
    straight to ``input_size``). ``normalization``: "imagenet" (mean/std per channel) or "xrv" (scaled to
    [-1024, 1024]).
    """

    channels: Literal[1, 3] = 3
    input_size: int = 224
    resize: int | None = 256
    normalization: Literal["imagenet", "xrv"] = "imagenet"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"Invalid channels {self.channels} - must be 1 or 3")
        if not 32 <= self.input_size <= 2048:
            raise ValueError(f"Invalid input_size {self.input_size} - must be in 32..2048")
        if self.resize is not None and self.resize < self.input_size:
            raise ValueError(f"Invalid resize {self.resize} - must be >= input_size {self.input_size}")
        if self.normalization not in ("imagenet", "xrv"):
            raise ValueError(f"Invalid normalization {self.normalization!r} - expected 'imagenet' or 'xrv'")

    def to_dict(self) -> dict[str, object]:
        return {
            "channels": self.channels,
            "input_size": self.input_size,
            "resize": self.resize,
            "normalization": self.normalization,
        }


CHEXNET_RECIPE = PreprocessRecipe()
XRV_RECIPE = PreprocessRecipe(channels=1, input_size=224, resize=None, normalization="xrv")


@dataclass(frozen=True, kw_only=True, slots=True)
class Applicability:
    """One image's applicability verdict: is it like the images the model was validated on?

    ``score``: distance of the image's pooled features from the artifact's validation images (higher = further; the
    unit depends on ``method``, e.g. a squared Mahalanobis distance); ``threshold``: the score above which the image
    is out of domain (chosen so that a stated share of validation images is in domain); ``in_domain``: ``score <=
    threshold``; ``method``: how the score was computed, e.g. ``"mahalanobis-pca32"``.
    """

    score: float
    threshold: float
    in_domain: bool
    method: str

    def __post_init__(self) -> None:
        if not np.isfinite(self.threshold):
            raise ValueError(f"Invalid threshold {self.threshold!r} - must be finite")
        if np.isnan(self.score):
            raise ValueError("Invalid score nan - must be a number (+inf is allowed: infinitely far)")
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"Invalid method {self.method!r} - must be a non-empty string")

    def to_dict(self) -> dict[str, object]:
        return {
            "score": float(self.score),
            "threshold": float(self.threshold),
            "in_domain": bool(self.in_domain),
            "method": self.method,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class QualityIssue:
    """A problem with the input image itself, found on its decoded pixels before any resizing.

    ``code``: ``'inverted'`` | ``'constant'`` | ``'saturated'`` | ``'lungs_not_found'`` | ``'too_few_pixels'`` | ...;
    ``reason``: one sentence for the report, with the measured numbers and the rule.
    """

    code: str
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not self.code:
            raise ValueError(f"Invalid code {self.code!r} - must be a non-empty string")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError(f"Invalid reason for {self.code!r} - must be a non-empty sentence")

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "reason": self.reason}


@dataclass(frozen=True, kw_only=True, slots=True)
class Prediction:
    """One image's model output, all from a single forward pass.

    - ``probabilities``, ``logits``: float32 [n_labels]; probabilities = sigmoid(logits), in [0, 1].
    - ``cams``: float32 [n_labels, h, w], class activation maps in logit units at the final feature resolution
      (h = w = input_size / 32): ``M_c = sum_k w_ck * A_k`` over the post-ReLU final features.
    - ``top_channels``: int [n_labels, k] feature channel indices with the largest |phi_ck| per class, and
      ``top_contributions``: float32 [n_labels, k] their phi_ck = w_ck * mean(A_k) in logit units.
    - ``bias``: float32 [n_labels]; for every class sum_k phi_ck + bias_c == logit_c (all k, not only the top).
    - ``evidence_total``: float32 [n_labels], sum_k |phi_ck| over ALL channels (the total evidence, logit units),
      so the documents can say what share of it the listed channels carry; None when not recorded (older archives).
    - ``model_version``: the artifact's content hash (sha256 hex, possibly shortened).
    - ``applicability``: the image's out-of-domain verdict from the pooled features of the same forward pass, None
      when the artifact has no applicability model.
    - ``quality``: input-quality issues found on the decoded pixels (empty: none found or not checked).
    """

    labels: tuple[str, ...]
    probabilities: np.ndarray
    logits: np.ndarray
    cams: np.ndarray
    top_channels: np.ndarray
    top_contributions: np.ndarray
    bias: np.ndarray
    model_version: str
    extra: dict[str, object] = field(default_factory=dict)
    applicability: Applicability | None = None
    quality: tuple[QualityIssue, ...] = ()
    evidence_total: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.evidence_total is not None and np.shape(self.evidence_total) != (n,):
            raise ValueError(f"Invalid evidence_total shape {np.shape(self.evidence_total)} - expected ({n},)")
        for name in ("probabilities", "logits", "bias"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"Invalid {name} shape {arr.shape} - expected ({n},) to match the labels")
        if not np.all(np.isfinite(self.logits)):
            raise ValueError("Invalid logits - contain NaN or infinity")
        if np.any(self.probabilities < 0) or np.any(self.probabilities > 1):
            raise ValueError("Invalid probabilities - must be in [0, 1]")
        if self.cams.ndim != 3 or self.cams.shape[0] != n:
            raise ValueError(f"Invalid cams shape {self.cams.shape} - expected ({n}, h, w)")
        if self.top_channels.shape != self.top_contributions.shape or self.top_channels.shape[0] != n:
            raise ValueError("Invalid top_channels/top_contributions - shapes must match and be (n_labels, k)")
        if self.applicability is not None and not isinstance(self.applicability, Applicability):
            raise ValueError(f"Invalid applicability {self.applicability!r} - expected an Applicability or None")
        quality = tuple(self.quality)
        if not all(isinstance(issue, QualityIssue) for issue in quality):
            raise ValueError(f"Invalid quality {quality!r} - expected QualityIssue values")
        object.__setattr__(self, "quality", quality)

    def as_dict(self) -> dict[str, float]:
        """Label -> probability."""
        return {label: float(p) for label, p in zip(self.labels, self.probabilities, strict=True)}
