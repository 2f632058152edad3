"""The polarized-channel claim: the top polarized channels' finding pairs rarely co-occur (Jaccard < 0.1), judged
against row-permutation nulls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.paper.claims import DEMO, PAPER, PaperRow, _row

# --------------------------------------------------------------------------------------------------- polarized


def _evidence(observed: Mapping[str, Any], base_rate: Mapping[str, Any], null: Mapping[str, Any]) -> list[str]:
    """The observed share of top polarized channels with Jaccard < 0.1, with the base rate and the null's share."""
    parts = [
        f"{observed['jaccard_below']} of {observed['channels']} top polarized channels have Jaccard < 0.1 "
        f"({observed['distinct_pairs']} distinct pairs)"
    ]
    if base_rate.get("share_jaccard_below") is not None:
        parts.append(f"base rate over all {base_rate['pairs']} finding pairs {base_rate['share_jaccard_below']:.0%}")
    if null.get("share_mean") is not None:
        p_jaccard = null.get("p_jaccard")
        parts.append(
            f"row-permutation null {null['share_mean']:.0%}" + (f" (p = {p_jaccard:.3g})" if p_jaccard else "")
        )
    return parts


def polarized_row(
    analysis: Mapping[str, Any] | None,
    *,
    source: str,
    data: str = DEMO,
    reason: str = "",
    paper: Mapping[str, Any] = PAPER,
) -> PaperRow:
    """Share of the top polarized channels whose finding pair has Jaccard < 0.1, against the nulls (``analysis``:
    ``model.channels.ChannelAnalysis.to_dict()``). The paper's claim is that polarized channels exploit mutual
    exclusivity: 'reproduced' only when the row-permutation p-value for "polarized pairs co-occur less than chance"
    (``null.p_lift``) is below 0.05; a high Jaccard share alone matches the base rate of rare findings. None ->
    'not measurable here' with ``reason``."""
    claim = "polarized channels: Jaccard < 0.1 in 89 of 100"
    base = {
        "section": "polarized",
        "claim": claim,
        "paper_value": paper["polarized_share"],
        "data": data,
        "source": source,
    }
    if analysis is None:
        return _row(
            value=None,
            ci=None,
            verdict="not measurable here",
            reason=reason or "the channel analysis did not run",
            **base,
        )
    observed, base_rate, null = analysis["observed"], analysis["base_rate"], analysis["null"]
    share = observed.get("share_jaccard_below")
    details = {
        "observed": dict(observed),
        "base_rate": dict(base_rate),
        "null": dict(null),
        "verdict_channels": analysis.get("verdict"),
        "label_source": analysis.get("label_source"),
    }
    if share is None:
        return _row(
            value=None,
            ci=None,
            verdict="not measurable here",
            details=details,
            reason=reason or "no polarized channel has a defined Jaccard (findings without positives)",
            **base,
        )
    parts = _evidence(observed, base_rate, null)
    p_lift = null.get("p_lift")
    if p_lift is None:
        return _row(
            value=round(float(share), 4),
            ci=None,
            unit="share of top channels",
            verdict="not measurable here",
            reason="; ".join(parts) + "; no lift p-value (no pair with enough expected co-occurrence)",
            details=details,
            **base,
        )
    lift = observed.get("mean_lift")
    parts.append(
        f"mean lift {lift:.3f} vs null {null.get('mean_lift_mean'):.3f}, permutation p = {p_lift:.3g} for "
        f"'polarized pairs co-occur less than chance' ({null['draws_used']} draws); rule: p < 0.05"
        if lift is not None and null.get("mean_lift_mean") is not None
        else f"permutation p = {p_lift:.3g}; rule: p < 0.05"
    )
    return _row(
        value=round(float(share), 4),
        ci=None,
        unit="share of top channels",
        verdict="reproduced" if p_lift < 0.05 else "not reproduced",
        reason="; ".join(parts) + (f"; {reason}" if reason else ""),
        details=details,
        **base,
    )
