"""Phase B: how many channels each conv keeps. One Lagrange multiplier prices parameters (and one per MAC weight
prices MACs) against the gain-weighted error curves, bisected until the network meets both targets.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NoReturn

import numpy as np

from model.complexity import Complexity, complexity
from model.compress.compressor import _Compressor
from model.compress.report import CompressionError, log
from model.compress.tensors import _round_channels
from model.network import Architecture, LayerSpec, TransitionSpec


def _architecture(job: _Compressor, keep: dict[tuple[Any, ...], int]) -> Architecture:
    """The architecture implied by per-unit keep counts (channel identities do not matter for counting)."""
    arch = job.arch
    blocks = []
    for b, block in enumerate(arch.blocks):
        layers = []
        for i, spec in enumerate(block):
            n_in = keep[("conv1", b, i)]
            layers.append(
                LayerSpec(
                    bottleneck=keep[("conv2", b, i)],
                    growth=spec.growth,
                    kept_inputs=tuple(range(n_in)) if n_in < arch.layer_available(b, i) else None,
                )
            )
        blocks.append(tuple(layers))
    transitions = []
    for b, t in enumerate(arch.transitions):
        n_in = keep[("transition", b)]
        kept = tuple(range(n_in)) if n_in < arch.block_output(b) else None
        transitions.append(TransitionSpec(out_channels=t.out_channels, kept_inputs=kept))
    n_head = keep[("head",)]
    last = arch.block_output(len(arch.blocks) - 1)
    return Architecture(
        in_channels=arch.in_channels,
        stem_channels=arch.stem_channels,
        blocks=tuple(blocks),
        transitions=tuple(transitions),
        head_inputs=tuple(range(n_head)) if n_head < last else None,
        num_classes=arch.num_classes,
        pool_first=True,
    )


def _keep_for(
    arch: Architecture,
    sides: list[int],
    base: Complexity,
    totals: dict[tuple[Any, ...], int],
    cumulative: dict[tuple[Any, ...], np.ndarray],
    round_to: int,
    lam: float,
    mu: float,
) -> dict[tuple[Any, ...], int]:
    """Keep counts per unit at multipliers ``lam`` (price of parameters) and ``lam * mu`` (price of MACs), both as
    fractions of the original network's; ``cumulative``: each unit's weighted error after k removals."""
    keep = dict(totals)
    for _ in range(3):  # conv1 and bottleneck costs depend on each other: a few fixed-point rounds
        for u, cum in cumulative.items():
            kind = u[0]
            if kind == "conv1":
                b, i = u[1], u[2]
                width = keep[("conv2", b, i)]
                params, macs = width + 2, width * sides[b] ** 2
            elif kind == "conv2":
                b, i = u[1], u[2]
                growth = arch.blocks[b][i].growth
                n_in = keep[("conv1", b, i)]
                params, macs = n_in + 2 + 9 * growth, (n_in + 9 * growth) * sides[b] ** 2
            elif kind == "transition":
                b = u[1]
                out = arch.transitions[b].out_channels
                params, macs = out + 2, out * (sides[b] // 2) ** 2  # the output pools before its conv
            else:
                params, macs = arch.num_classes + 2, arch.num_classes
            unit_cost = params / base.parameters + mu * macs / base.macs
            k = np.arange(len(cum))
            removed = int(np.argmin(cum - lam * unit_cost * k))
            keep[u] = _round_channels(totals[u] - removed, totals[u], round_to)
    return keep


def _allocate(
    job: _Compressor,
    curves: dict[tuple[Any, ...], np.ndarray],
    *,
    target_params: float,
    target_macs: float | None,
    input_size: int,
    gains: dict[tuple[Any, ...], float] | None = None,
) -> dict[tuple[Any, ...], int]:
    """Keep counts per unit meeting both targets with the least total relative error (see module doc)."""
    arch = job.arch
    base = complexity(arch, input_size)
    from model.complexity import feature_size

    sides = feature_size(arch, input_size)
    totals = {u: len(c) + 1 for u, c in curves.items()}
    weights = gains or {}
    cumulative = {u: weights.get(u, 1.0) * np.concatenate([[0.0], np.cumsum(c)]) for u, c in curves.items()}
    keep_for = partial(_keep_for, arch, sides, base, totals, cumulative, job.round_to)
    limit = target_params * base.parameters
    mac_limit = None if target_macs is None else target_macs * base.macs
    Result = tuple[dict[tuple[Any, ...], int], int, int, float]

    def evaluate(keep: dict[tuple[Any, ...], int]) -> Result:
        counts = complexity(_architecture(job, keep), input_size)
        error = sum(float(cum[totals[u] - keep[u]]) for u, cum in cumulative.items())
        return keep, counts.parameters, counts.macs, error

    def feasible(result: Result) -> bool:
        return result[1] <= limit and (mac_limit is None or result[2] <= mac_limit)

    def fit_lambda(mu: float) -> Result | None:
        """The least pruning (smallest lambda) meeting both targets at this MAC weight."""
        lo, hi = 1e-8, 1e8
        if not feasible(evaluate(keep_for(hi, mu))):
            return None
        for _ in range(80):
            mid = math.sqrt(lo * hi)
            if feasible(evaluate(keep_for(mid, mu))):
                hi = mid
            else:
                lo = mid
            if hi / lo < 1.0001:
                break
        return evaluate(keep_for(hi, mu))

    # Two budgets, one multiplier each: lambda prices parameters, lambda * mu prices MACs. For each mu the
    # smallest feasible lambda; of those, the allocation with the least weighted error.
    mus = (0.0, *(2.0**k for k in range(-4, 15)))
    tried: list[tuple[float, Result | None]] = [(mu, fit_lambda(mu)) for mu in mus]
    found = [(r[3], mu, r) for mu, r in tried if r is not None]
    if found:
        _, mu, best = min(found, key=lambda item: item[0])
        log.info("allocation: mu %.3g: %d params, %d MACs, weighted error %.4g", mu, best[1], best[2], best[3])
        return best[0]
    smallest = evaluate(keep_for(1e8, 0.0))
    fewest = min(evaluate(keep_for(1e8, mu))[2] for mu, _ in tried)
    _unreachable(target_params, target_macs, smallest[1], fewest, limit, base)


def _unreachable(
    target_params: float, target_macs: float | None, fewest_params: int, fewest: int, limit: float, base: Complexity
) -> NoReturn:
    """Raise CompressionError naming the target that cannot be met (``fewest_params`` / ``fewest``: the smallest
    parameter count and MAC count any allocation reached)."""
    if fewest_params > limit:
        raise CompressionError(
            f"Invalid target_params {target_params}: unreachable - pruning conv inputs and bottlenecks leaves this "
            f"network at least {fewest_params:,} of {base.parameters:,} parameters "
            f"({fewest_params / base.parameters:.0%})"
        )
    raise CompressionError(
        f"Invalid target_macs {target_macs}: not reachable together with target_params {target_params} - the "
        f"fewest MACs found were {fewest:,} of {base.macs:,} ({fewest / base.macs:.0%}); the stem conv is not "
        "pruned. Raise target_macs or lower target_params"
    )
