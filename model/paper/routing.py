"""The routing claim: the decision system sends each finding's problem to the cheapest verified intervention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.paper.claims import DEMO, PaperRow, _row

# ----------------------------------------------------------------------------------------------------- routing


def routing_row(
    counts: Mapping[str, int] | None, *, source: str, reason: str = "", details: Mapping[str, Any] | None = None
) -> PaperRow:
    """What ``chexd decide`` routed on the demo: ``counts`` intervention -> findings. The paper claims each problem
    goes to its cheapest effective intervention; the cheapest-first order is the decision system's design, so the
    verdict is 'true by construction' (each chosen intervention's effect is verified on held-out data in the routing
    table); None -> 'not measurable here' with ``reason``."""
    claim = "TDS routes each problem to its cheapest effective intervention"
    paper_value = "cheapest effective intervention (no figures)"
    if counts is None:
        return _row(
            section="routing",
            claim=claim,
            value=None,
            ci=None,
            paper_value=paper_value,
            data=DEMO,
            source=source,
            verdict="not measurable here",
            reason=reason or "the decision system did not run",
            details=dict(details or {}),
        )
    text = ", ".join(f"{k}: {v}" for k, v in counts.items() if v) or "nothing routed"
    return _row(
        section="routing",
        claim=claim,
        value=text,
        ci=None,
        paper_value=paper_value,
        data=DEMO,
        source=source,
        verdict="true by construction",
        reason="interventions are tried cheapest first and the first whose held-out verification passes is "
        "chosen - the routing is the algorithm's design; the verified effects are in the routing table"
        + (f"; {reason}" if reason else ""),
        details=dict(details or {}) | {"counts": dict(counts)},
    )
