"""What a compression run reports (:class:`CompressionReport`, one :class:`UnitReport` per pruned conv) and its error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model.errors import ModelError

log = logging.getLogger("model.compress")  # one logger for the package, named as before the split

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class CompressionError(ModelError, ValueError):
    """Compression cannot run with these inputs or settings; the message names the value and the rule."""


@dataclass(frozen=True, kw_only=True, slots=True)
class UnitReport:
    """One pruned conv input set.

    ``name``: e.g. ``denseblock3.denselayer5.conv1`` (its input channels), ``...conv2`` (the bottleneck channels it
    reads), ``transition2.conv``, ``classifier``. ``kept``/``total``: channels read after/before. ``error``: squared
    reconstruction error of the conv's output on the calibration images relative to the output's variance, after the
    least-squares refit; ``error_without_refit``: the same channels with the original weights (no refit).
    """

    name: str
    kept: int
    total: int
    error: float
    error_without_refit: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kept": self.kept,
            "total": self.total,
            "error": self.error,
            "error_without_refit": self.error_without_refit,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionReport:
    """What :func:`compress` did. Counts are per image of ``input_size`` px; MACs are conv + linear
    multiply-accumulates (:mod:`model.complexity`). ``logit_rmse``/``logit_max_abs``: compressed versus original
    logits on the ``held_out_images`` calibration images that no fit saw. ``distilled``: whether the distilled weights
    were kept (``distill_steps`` > 0 and they were closer to the original on the held-out images).
    ``macs_before_pool_first``: the original's MACs with its transitions pooling before their conv, as the compressed
    network's do (an exact reorder, :class:`~model.network.Architecture`); ``macs_removed`` counts against the original
    as it was given, ``macs_removed_by_pruning`` against this figure."""

    input_size: int
    parameters_before: int
    parameters_after: int
    macs_before: int
    macs_after: int
    macs_before_pool_first: int
    target_params: float
    target_macs: float | None
    calibration_images: int
    held_out_images: int
    logit_rmse: float
    logit_max_abs: float
    logit_rmse_before_distill: float
    distill_steps: int
    distilled: bool
    seconds: float
    units: tuple[UnitReport, ...] = field(default=(), repr=False)

    @property
    def parameters_removed(self) -> float:
        """Fraction of the parameters removed (0.55 = 55% fewer)."""
        return 1 - self.parameters_after / self.parameters_before

    @property
    def macs_removed(self) -> float:
        """Fraction of the MACs removed."""
        return 1 - self.macs_after / self.macs_before

    @property
    def macs_removed_by_pruning(self) -> float:
        """Fraction of the MACs removed, counted against the original with the same transition order."""
        return 1 - self.macs_after / self.macs_before_pool_first

    def to_dict(self, *, units: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "input_size": self.input_size,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "parameters_removed": round(self.parameters_removed, 6),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_removed": round(self.macs_removed, 6),
            "macs_before_pool_first": self.macs_before_pool_first,
            "macs_removed_by_pruning": round(self.macs_removed_by_pruning, 6),
            "target_params": self.target_params,
            "target_macs": self.target_macs,
            "calibration_images": self.calibration_images,
            "held_out_images": self.held_out_images,
            "logit_rmse": self.logit_rmse,
            "logit_max_abs": self.logit_max_abs,
            "logit_rmse_before_distill": self.logit_rmse_before_distill,
            "distill_steps": self.distill_steps,
            "distilled": self.distilled,
            "seconds": round(self.seconds, 1),
        }
        if units:
            data["units"] = [u.to_dict() for u in self.units]
        return data
