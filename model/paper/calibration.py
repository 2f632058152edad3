"""The calibration claims: F1 and recall of Youden thresholds against threshold 0.5, on held-out halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.paper.claims import PAPER, REAL, PaperRow, _row, ratio_verdict

# ------------------------------------------------------------------------------------------------- calibration


def calibration_rows(
    result: Mapping[str, Any] | None, *, source: str = "", reason: str = "", paper: Mapping[str, Any] = PAPER
) -> list[PaperRow]:
    """Youden thresholds vs 0.5: F1 ratio and recall ratio on the held-out halves (``result``:
    ``CalibrationResult.to_dict()``), each judged by :func:`ratio_verdict`. ``result`` None -> 'not measurable
    here' with ``reason``."""
    rows = []
    for key, claim in (
        ("f1_ratio", "Youden thresholds: F1 x1.6 vs threshold 0.5"),
        ("recall_ratio", "Youden thresholds: recall x7 vs threshold 0.5"),
    ):
        if result is None:
            rows.append(
                _row(
                    section="calibration",
                    claim=claim,
                    value=None,
                    ci=None,
                    paper_value=paper[key],
                    data=REAL,
                    source=source,
                    verdict="not measurable here",
                    reason=reason or "not measurable here: give --chexnet-preds",
                )
            )
            continue
        value, ci = result.get(key), result.get(f"{key}_ci")
        verdict, why = ratio_verdict(value, tuple(ci) if ci else None, paper[key])
        splits = result.get("n_splits", 1)
        rows.append(
            _row(
                section="calibration",
                claim=claim,
                value=None if value is None else round(float(value), 4),
                ci=tuple(ci) if ci else None,
                unit="ratio, Youden / 0.5 (held-out halves)",
                paper_value=paper[key],
                data=REAL,
                source=source,
                verdict=verdict,
                reason=f"{why}; fitted on one patient-disjoint half, reported on the other, {splits} "
                "split(s), CI resamples patients" + (" and splits" if splits and splits > 1 else ""),
                details={
                    k: result.get(k)
                    for k in (
                        "n_fit",
                        "n_report",
                        "split",
                        "n_bootstrap",
                        "n_splits",
                        "mean_f1",
                        "mean_f1_default",
                        "mean_recall",
                        "mean_recall_default",
                    )
                    if k in result
                },
            )
        )
    return rows
