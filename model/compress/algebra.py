"""Least-squares algebra of channel selection: sufficient statistics of a linear fit (:class:`_Stats`) and backward
greedy elimination with exact Optimal-Brain-Surgeon costs (:func:`_eliminate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_RIDGE = 1e-4  # Tikhonov term relative to the mean feature energy: keeps the fits stable without biasing them


# ------------------------------------------------------------------------------------------- least-squares algebra
@dataclass(slots=True)
class _Stats:
    """Sufficient statistics of a linear fit ``Y ≈ [X, 1] W``: Gram ``G`` [(d+1), (d+1)], ``C = [X, 1]^T Y``
    [(d+1), m], and the target's sum of squares / column sums / row count (all float64)."""

    G: np.ndarray
    C: np.ndarray
    yy: float
    ysum: np.ndarray
    rows: int

    @classmethod
    def of(cls, x: Tensor, y: Tensor, scale: Tensor | None = None) -> _Stats:
        """Statistics of rows ``x`` [R, d] and targets ``y`` [R, m], each target column multiplied by ``scale``."""
        # float32 products (fast BLAS), accumulated by the BLAS in blocks; the algebra after this is float64
        x1 = torch.cat([x.float(), torch.ones(len(x), 1)], 1)
        y = y.float() if scale is None else y.float() * scale.float()[None, :]
        return cls(
            G=(x1.T @ x1).double().numpy(),
            C=(x1.T @ y).double().numpy(),
            yy=float(y.double().pow(2).sum()),
            ysum=y.double().sum(0).numpy(),
            rows=len(x),
        )

    @property
    def variance(self) -> float:
        """Sum over outputs of the centred sum of squares (the error of predicting each output by its mean)."""
        return max(self.yy - float((self.ysum**2).sum()) / self.rows, 1e-30)

    def features(self, candidates: np.ndarray, group: int) -> np.ndarray:
        """Feature indices of the given candidates (``group`` consecutive features each) plus the intercept."""
        cols = (np.asarray(candidates)[:, None] * group + np.arange(group)).ravel()
        return np.concatenate([cols, [self.G.shape[0] - 1]])

    def regularised(self, feats: np.ndarray) -> np.ndarray:
        g = self.G[np.ix_(feats, feats)].copy()
        n = len(feats) - 1  # the intercept (last) is not penalised
        if n:
            scale = max(float(np.mean(np.diag(g)[:n])), 1e-12)
            g[np.arange(n), np.arange(n)] += _RIDGE * scale
        return g

    def solve(self, candidates: np.ndarray, group: int) -> np.ndarray:
        """Least-squares weights [(len(candidates)*group + 1), m] (the last row is the intercept)."""
        feats = self.features(candidates, group)
        return np.linalg.solve(self.regularised(feats), self.C[feats])

    def error(self, candidates: np.ndarray, group: int, weights: np.ndarray) -> float:
        """Relative squared error (to the target's variance) of ``[X_candidates, 1] @ weights``."""
        feats = self.features(candidates, group)
        g, c = self.G[np.ix_(feats, feats)], self.C[feats]
        sse = self.yy - 2 * float((weights * c).sum()) + float((weights * (g @ weights)).sum())
        return max(sse, 0.0) / self.variance


def _eliminate(
    stats: _Stats, n_candidates: int, group: int, n_keep: int, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Backward greedy selection: repeatedly remove the candidates whose removal increases the least-squares residual
    the least. For a group of features g the increase is exactly ``tr(B_g^T [(G^-1)_gg]^-1 B_g)`` (Optimal Brain
    Surgeon); the same formula over several groups gives the exact joint increase.

    While more than ``batch`` candidates remain, the ``1/batch`` cheapest are removed together (their joint increase
    is shared in proportion to their single costs); below that, one at a time. Returns (candidates in removal order,
    the residual increase of each removal), ``n_candidates - n_keep`` long. The inverse is downdated per step and
    recomputed from scratch whenever half of the candidates has gone (speed and numerical drift)."""
    alive = np.arange(n_candidates)
    removed: list[int] = []
    costs: list[float] = []
    while len(alive) > n_keep:
        feats = stats.features(alive, group)
        g_inv = np.linalg.inv(stats.regularised(feats))
        b = g_inv @ stats.C[feats]
        pos = np.arange(len(alive) * group).reshape(len(alive), group)
        live = np.ones(len(alive), dtype=bool)
        stop = max(n_keep, len(alive) - max(1, len(alive) // 2))
        count = len(alive)
        while count > stop:
            idx = np.flatnonzero(live)
            if group == 1:
                p = pos[idx, 0]
                cost = (b[p] ** 2).sum(1) / np.maximum(np.diag(g_inv)[p], 1e-30)
            else:
                p = pos[idx]
                s = g_inv[p[:, :, None], p[:, None, :]]
                bg = b[p]
                cost = (bg * np.linalg.solve(s, bg)).sum((1, 2))
            cost = np.maximum(cost, 0.0)
            r = min(count - stop, max(1, count // batch))
            order = np.argsort(cost, kind="stable")[:r]
            ks = idx[order]
            q = pos[ks].ravel()
            u = g_inv[:, q]
            s_inv = np.linalg.inv(g_inv[np.ix_(q, q)])
            bq = b[q]
            joint = max(float((bq * (s_inv @ bq)).sum()), 0.0) if r > 1 else float(cost[order[0]])
            b -= u @ (s_inv @ bq)
            g_inv -= u @ s_inv @ u.T
            single = cost[order]
            shares = single / single.sum() if single.sum() > 0 else np.full(r, 1 / r)
            live[ks] = False
            count -= r
            removed.extend(int(a) for a in alive[ks])
            costs.extend(float(joint * w) for w in shares)
        alive = alive[live]
    return np.array(removed, dtype=np.int64), np.array(costs)


def _select(stats: _Stats, n_candidates: int, group: int, n_keep: int) -> np.ndarray:
    """Candidates kept (sorted) after greedy elimination down to ``n_keep``."""
    removed, _ = _eliminate(stats, n_candidates, group, n_keep)
    keep = np.setdiff1d(np.arange(n_candidates), removed)
    return keep
