"""Applicability (out-of-domain) model: is an image like the images this artifact was validated on?

Fitted per artifact on the pooled final features ``ā`` [N, C] of its validation images (the features the engine
computes for every prediction anyway, so scoring costs no extra forward pass). Methods:

- ``mahalanobis-pca{k}`` (default): centre, project onto the top ``k`` principal components, score = squared
  Mahalanobis distance in that subspace plus the squared residual off it divided by the mean residual variance
  per discarded dimension (``sum z_i^2 / var_i + |r|^2 / sigma_r^2``). The residual term catches images whose
  features move in directions the validation images never used (a rotated or inverted film, a hand), which the
  subspace distance alone misses.
- ``knn{n}-pca{k}``: mean Euclidean distance, in the whitened ``k``-dim PCA space, to the ``n`` nearest validation
  images (stores the projected validation points: N x k floats).

Chosen by measurement (``python -m bench.applicability --real-cxr ../shared/data/real-cxr``, table in
bench/README.md; fitted on 300 phantom val images, AUROC of each set against 200 phantom test images, full / compressed
demo): Mahalanobis with the residual term reaches AUROC 0.99 on the 34 real radiographs (100% flagged), 0.996-1.000
on rotated, inverted, one-lung crops, a synthetic hand and pydicom's CT/MR/NM images (100% flagged), 0.90-0.92 on heavy
noise; without the residual term (subspace only) and k-NN (``knn5-pca32``) are weaker everywhere (real 0.957-0.968,
85-91% flagged; CT/MR/NM 50-75% flagged). The energy score from the logits is worse than chance here (AUROC 0.04-0.33:
these images get *more* confident findings, which is the problem this gate exists for). k = 64 accepts 97-98% of the
phantom test split at the 95% threshold (k = 32: 95-96%) with the same separation; 64 x 1024 float32 is 350 kB of
JSON. The method needs no stored validation images (a mean, k components, k variances) and is one matrix product per
batch.

The threshold is the ``in_domain_share`` quantile of *cross-fitted* validation scores (each image scored by a model
fitted on the other folds), because in-sample Mahalanobis distances are optimistically small: a threshold from them
would reject more than ``1 - in_domain_share`` of new in-domain images. The stored model is then fitted on all
validation images; its in-sample in-domain share is at least ``in_domain_share``.

Stored in the artifact's manifest as small JSON (arrays as base64 float32, exact round trip) and part of its
version id.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.types import Applicability

__all__ = [
    "DEFAULT_METHOD",
    "FORMAT",
    "ApplicabilityError",
    "ApplicabilityModel",
    "fit_applicability",
]

FORMAT = "chexd-applicability/1"
DEFAULT_METHOD = "mahalanobis-pca64"
MAX_COMPONENTS = 64
MIN_IMAGES = 10
_METHOD = re.compile(r"^(?:mahalanobis-pca(?P<k1>\d+)|knn(?P<n>\d+)-pca(?P<k2>\d+))$")
_EPS = 1e-8


class ApplicabilityError(ValueError):
    """An applicability model cannot be fitted, read or applied: too few images, a bad method name, mismatched
    feature width, non-finite features. The message names the parameter, the value and the rule."""


def _parse_method(method: str) -> tuple[str, int, int]:
    """('mahalanobis' | 'knn', k components, n neighbours (0 for mahalanobis))."""
    match = _METHOD.match(method) if isinstance(method, str) else None
    if match is None:
        raise ApplicabilityError(f"Invalid method {method!r} - expected 'mahalanobis-pca<k>' or 'knn<n>-pca<k>'")
    if match["k1"] is not None:
        kind, k, n = "mahalanobis", int(match["k1"]), 0
    else:
        kind, k, n = "knn", int(match["k2"]), int(match["n"])
        if n < 1:
            raise ApplicabilityError(f"Invalid method {method!r} - the number of neighbours must be >= 1")
    if not 1 <= k <= MAX_COMPONENTS:
        raise ApplicabilityError(f"Invalid method {method!r} - PCA components must be in 1..{MAX_COMPONENTS}")
    return kind, k, n


def _encode(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(array.shape), "float32": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode(data: Any, name: str) -> np.ndarray:
    if not isinstance(data, Mapping) or "shape" not in data or "float32" not in data:
        raise ApplicabilityError(f"Invalid {name} {str(data)[:60]!r} - expected {{'shape': [...], 'float32': base64}}")
    try:
        raw = base64.b64decode(data["float32"], validate=True)
        array = np.frombuffer(raw, dtype="<f4").reshape([int(s) for s in data["shape"]])
    except (ValueError, TypeError) as exc:
        raise ApplicabilityError(f"Invalid {name}: {exc}") from None
    if not np.all(np.isfinite(array)):
        raise ApplicabilityError(f"Invalid {name} - contains NaN or infinity")
    return array.astype(np.float32)


def _check_features(pooled: np.ndarray, name: str = "pooled") -> np.ndarray:
    pooled = np.asarray(pooled)
    if pooled.ndim != 2:
        raise ApplicabilityError(f"Invalid {name} shape {pooled.shape} - expected [N, C]")
    pooled = pooled.astype(np.float64)
    if not np.all(np.isfinite(pooled)):
        raise ApplicabilityError(f"Invalid {name} - contains NaN or infinity")
    return pooled


@dataclass(frozen=True, kw_only=True, slots=True)
class ApplicabilityModel:
    """A fitted applicability model (see the module doc). Arrays are float32.

    - ``mean`` [C]; ``components`` [k, C] (orthonormal rows, principal axes); ``variances`` [k] (per axis);
      ``residual_variance``: mean variance per discarded dimension (mahalanobis) ; ``reference`` [M, k] whitened
      projected validation points (knn only, else shape [0, k]).
    - ``threshold``: score above which an image is out of domain; ``in_domain_share``: the share of validation images
      the threshold was chosen to accept (cross-fitted); ``validation_in_domain_share``: the share actually accepted
      by cross-fitted scores; ``n_images``: validation images; ``source``: where they came from; ``folds``: the
      cross-fitting folds the threshold came from (1: in-sample scores, used below 20 images).
    """

    method: str
    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    reference: np.ndarray
    threshold: float
    in_domain_share: float
    validation_in_domain_share: float
    n_images: int
    source: str = ""
    folds: int = 1

    def __post_init__(self) -> None:
        kind, k, n = _parse_method(self.method)
        c = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if c < 1:
            raise ApplicabilityError(f"Invalid mean shape {self.mean.shape} - expected [C]")
        if self.components.shape != (k, c):
            raise ApplicabilityError(f"Invalid components shape {self.components.shape} - expected ({k}, {c})")
        if self.variances.shape != (k,) or not np.all(self.variances > 0):
            raise ApplicabilityError(f"Invalid variances {self.variances.shape} - expected ({k},) positive values")
        if kind == "knn" and (self.reference.ndim != 2 or self.reference.shape[1] != k or len(self.reference) < n):
            raise ApplicabilityError(f"Invalid reference shape {self.reference.shape} - expected (>= {n}, {k})")
        if not (np.isfinite(self.residual_variance) and self.residual_variance > 0):
            raise ApplicabilityError(f"Invalid residual_variance {self.residual_variance!r} - must be > 0")
        if not np.isfinite(self.threshold):
            raise ApplicabilityError(f"Invalid threshold {self.threshold!r} - must be finite")
        for name in ("in_domain_share", "validation_in_domain_share"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ApplicabilityError(f"Invalid {name} {value!r} - must be in (0, 1]")
        if self.folds < 1:
            raise ApplicabilityError(f"Invalid folds {self.folds} - must be >= 1")
        if self.n_images < MIN_IMAGES:
            raise ApplicabilityError(f"Invalid n_images {self.n_images} - need at least {MIN_IMAGES}")

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def score(self, pooled: np.ndarray) -> np.ndarray:
        """float64 [N] scores of pooled features [N, C] (higher = further from the validation images).

        Raises ApplicabilityError for a wrong feature width or non-finite features."""
        x = _check_features(pooled)
        if x.shape[1] != self.channels:
            raise ApplicabilityError(
                f"Invalid pooled width {x.shape[1]} - this applicability model was fitted on {self.channels} channels"
            )
        centred = x - self.mean.astype(np.float64)
        components = self.components.astype(np.float64)
        z = centred @ components.T  # [N, k]
        white = z / np.sqrt(self.variances.astype(np.float64))
        kind, _, n = _parse_method(self.method)
        if kind == "knn":
            reference = self.reference.astype(np.float64)
            d2 = (white**2).sum(1)[:, None] - 2 * white @ reference.T + (reference**2).sum(1)[None, :]
            d = np.sqrt(np.maximum(d2, 0.0))
            return np.sort(d, axis=1)[:, :n].mean(axis=1)
        residual = np.maximum((centred**2).sum(1) - (z**2).sum(1), 0.0)
        return (white**2).sum(1) + residual / self.residual_variance

    def judge_many(self, pooled: np.ndarray) -> list[Applicability]:
        """One verdict per row of pooled [N, C]."""
        return [
            Applicability(
                score=float(s), threshold=self.threshold, in_domain=bool(s <= self.threshold), method=self.method
            )
            for s in self.score(pooled)
        ]

    def judge(self, pooled_row: np.ndarray) -> Applicability:
        """The verdict for one image's pooled features [C]."""
        row = np.asarray(pooled_row)
        if row.ndim != 1:
            raise ApplicabilityError(f"Invalid pooled_row shape {row.shape} - expected [C]")
        return self.judge_many(row[None])[0]

    def summary(self) -> dict[str, Any]:
        """The small facts a person wants (no arrays): method, threshold, shares, images, source."""
        return {
            "method": self.method,
            "threshold": round(float(self.threshold), 6),
            "in_domain_share": self.in_domain_share,
            "validation_in_domain_share": round(float(self.validation_in_domain_share), 4),
            "n_images": self.n_images,
            "channels": self.channels,
            "source": self.source,
            "folds": self.folds,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; arrays as base64 little-endian float32 (exact round trip)."""
        return {
            "format": FORMAT,
            "method": self.method,
            "mean": _encode(self.mean),
            "components": _encode(self.components),
            "variances": _encode(self.variances),
            "residual_variance": float(self.residual_variance),
            "reference": _encode(self.reference),
            "threshold": float(self.threshold),
            "in_domain_share": float(self.in_domain_share),
            "validation_in_domain_share": float(self.validation_in_domain_share),
            "n_images": int(self.n_images),
            "source": self.source,
            "folds": int(self.folds),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ApplicabilityModel:
        """Inverse of :meth:`to_dict`. Raises ApplicabilityError for a missing or invalid field."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ApplicabilityError(f"Invalid applicability format {got!r} - expected {FORMAT!r}")
        try:
            return cls(
                method=data["method"],
                mean=_decode(data["mean"], "mean"),
                components=_decode(data["components"], "components"),
                variances=_decode(data["variances"], "variances"),
                residual_variance=float(data["residual_variance"]),
                reference=_decode(data["reference"], "reference"),
                threshold=float(data["threshold"]),
                in_domain_share=float(data["in_domain_share"]),
                validation_in_domain_share=float(data["validation_in_domain_share"]),
                n_images=int(data["n_images"]),
                source=str(data.get("source", "")),
                folds=int(data.get("folds", 1)),
            )
        except KeyError as exc:
            raise ApplicabilityError(f"Invalid applicability model - missing field {exc.args[0]!r}") from None


def _fit_once(x: np.ndarray, kind: str, k: int) -> dict[str, Any]:
    """PCA pieces from features x [N, C] (float64)."""
    mean = x.mean(axis=0)
    centred = x - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(k, len(s))
    variances = s[:k] ** 2 / max(len(x) - 1, 1)
    floor = max(float(variances.max()) * 1e-6, _EPS) if len(variances) else _EPS
    variances = np.maximum(variances, floor)
    rest = (s[k:] ** 2).sum() / max(len(x) - 1, 1)
    dims = max(x.shape[1] - k, 1)
    residual_variance = max(rest / dims, floor * 1e-3)
    components = vt[:k]
    reference = np.zeros((0, k))
    if kind == "knn":
        reference = (centred @ components.T) / np.sqrt(variances)
    return {
        "mean": mean,
        "components": components,
        "variances": variances,
        "residual_variance": float(residual_variance),
        "reference": reference,
    }


def _model(pieces: dict[str, Any], method: str, threshold: float, **rest: Any) -> ApplicabilityModel:
    return ApplicabilityModel(
        method=method,
        mean=pieces["mean"].astype(np.float32),
        components=pieces["components"].astype(np.float32),
        variances=pieces["variances"].astype(np.float32),
        residual_variance=pieces["residual_variance"],
        reference=pieces["reference"].astype(np.float32),
        threshold=threshold,
        **rest,
    )


def fit_applicability(
    pooled: np.ndarray,
    *,
    in_domain_share: float = 0.95,
    method: str = DEFAULT_METHOD,
    folds: int = 5,
    source: str = "",
    seed: int = 0,
) -> ApplicabilityModel:
    """Fit on validation pooled features [N, C] (float32, N >= 10).

    The threshold is the ``in_domain_share`` quantile of cross-fitted scores (``folds`` folds; ``folds=1`` uses the
    in-sample scores, whose share on the fit data is then exactly the stated share up to ties). PCA keeps
    ``min(k, N_fold - 1)`` components. Raises ApplicabilityError for too few images, non-finite features, a share
    outside (0, 1), a bad method or ``folds`` < 1."""
    x = _check_features(pooled)
    n = len(x)
    if n < MIN_IMAGES:
        raise ApplicabilityError(f"Invalid pooled: {n} images - need at least {MIN_IMAGES} validation images")
    if not 0 < in_domain_share < 1:
        raise ApplicabilityError(f"Invalid in_domain_share {in_domain_share!r} - must be in (0, 1)")
    if folds < 1:
        raise ApplicabilityError(f"Invalid folds {folds} - must be >= 1")
    kind, k, neighbours = _parse_method(method)
    folds = min(folds, n // 10) if folds > 1 else 1
    fit_size = n - -(-n // folds) if folds > 1 else n  # smallest training part of a fold
    k_used = min(k, fit_size - 1, x.shape[1])
    method = f"mahalanobis-pca{k_used}" if kind == "mahalanobis" else f"knn{neighbours}-pca{k_used}"
    if kind == "knn" and neighbours >= fit_size:
        raise ApplicabilityError(f"Invalid method {method!r} - more neighbours than validation images per fold")
    full = _fit_once(x, kind, k_used)
    common = dict(in_domain_share=float(in_domain_share), n_images=n, source=source, folds=folds)
    if folds == 1:
        scores = _model(full, method, 0.0, validation_in_domain_share=1.0, **common).score(x)
        if kind == "knn":  # in-sample k-NN: the nearest neighbour of a fit point is itself; skip it
            scores = _model(full, f"knn{neighbours + 1}-pca{k_used}", 0.0, validation_in_domain_share=1.0, **common)
            scores = scores.score(x) * (neighbours + 1) / neighbours
    else:
        order = np.random.default_rng(seed).permutation(n)
        scores = np.empty(n)
        for fold in np.array_split(order, folds):
            train = np.setdiff1d(order, fold)
            pieces = _fit_once(x[train], kind, k_used)
            scores[fold] = _model(pieces, method, 0.0, validation_in_domain_share=1.0, **common).score(x[fold])
    threshold = float(np.quantile(scores, in_domain_share, method="higher"))
    share = float(np.mean(scores <= threshold))
    return _model(full, method, threshold, validation_in_domain_share=share, **common)
