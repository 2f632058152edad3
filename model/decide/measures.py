"""Statistics the decision system measures with: probabilities, F1 and recall, AUROC, their paired patient-bootstrap
samples, formatting of estimates with intervals, and a CPU clock for costs.
"""

from __future__ import annotations

import time

import numpy as np

# ------------------------------------------------------------------------------------------------ statistics


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _probabilities(pooled: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float64 [N, n]: the same float32 arithmetic as the classifier, then the sigmoid in float64."""
    z = pooled.astype(np.float32) @ weight.astype(np.float32).T + bias.astype(np.float32)
    return _sigmoid(z.astype(np.float64))


def _f1_recall(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float | None, float | None]:
    positives = int(y.sum())
    if positives == 0:
        return None, None
    pred = s >= t
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    return 2 * tp / (2 * tp + fp + (positives - tp)), tp / positives


def _boot_f1(y: np.ndarray, s: np.ndarray, t: float, counts: np.ndarray) -> np.ndarray:
    """F1 [B] at threshold ``t`` on each resample (NaN where a resample has no positive)."""
    pred = s >= t
    tp, fp, fn = counts @ (pred & y), counts @ (pred & ~y), counts @ (~pred & y)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), np.nan)


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _boot_auroc(y: np.ndarray, s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    from model.metrics import bootstrap_auroc

    return bootstrap_auroc(y.astype(np.int64), s.astype(np.float64), counts)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: tuple[float, float] | None, signed: bool = False) -> str:
    if ci is None:
        return "no CI"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _above_zero(ci: tuple[float, float] | None) -> bool:
    return ci is not None and ci[0] > 0


# ------------------------------------------------------------------------------------------------ interventions


class _Clock:
    def __init__(self) -> None:
        self.start = time.process_time()

    @property
    def seconds(self) -> float:
        return time.process_time() - self.start
