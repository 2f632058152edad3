"""The decision system's constants (gaps, floors, tolerance, the intervention and problem names), the acceptance rule
of every intervention in words (``RULES``), and its error.
"""

from __future__ import annotations

from model.errors import ModelError

F1_GAP = 0.05  # operating point "far": F1 at the current threshold this much below the F1-optimal one (selection)
RECALL_GAP = 0.20  # ... or recall this much below
AUROC_FLOOR = 0.70  # weak ranking: the selection AUROC's upper 95% bound below this
TOP_CHANNELS = 10  # channels per confirmed false positive compared for a shared pattern
MIN_CONFIRMED = 2  # confirmed false positives needed to call a pattern "recurring"
TOLERANCE = 0.02  # largest acceptable held-out true-positive loss rate
INTERVENTIONS = ("threshold", "channel_edit", "head_finetune", "needs_data")
PROBLEMS = ("too_few_positives", "false_positive_pattern", "weak_ranking", "regressed_ranking", "operating_point")

RULES: dict[str, str] = {
    "threshold/operating_point": "the selection part's F1-optimal threshold; accepted when the verification ΔF1 "
    "(new - current threshold, paired patient bootstrap) has its 95% CI above 0",
    "threshold/false_positive_pattern": "the lowest threshold above every confirmed false positive; accepted when it "
    f"loses at most {TOLERANCE:.0%} of the verification true positives",
    "threshold/ranking": "never accepted: a threshold does not change the ranking (AUROC)",
    "channel_edit/false_positive_pattern": "plan_correction on the selection part (targets: the confirmed false "
    f"positives); accepted when check_held_out passes on the verification part (TP loss rate <= {TOLERANCE:.0%})",
    "channel_edit/other": "not applicable: a channel edit needs false-positive images to target",
    "head_finetune/ranking": "the finding's row refitted on the selection part; accepted when the verification "
    "ΔAUROC 95% CI lies above 0",
    "head_finetune/operating_point": "the finding's row refitted on the selection part, threshold refitted there; "
    "accepted when the verification ΔF1 95% CI lies above 0",
    "head_finetune/false_positive_pattern": "the finding's row refitted with the confirmed false positives as "
    "negatives; accepted when they fall below the threshold (in-sample) and check_held_out passes",
    "needs_data": "chosen when no cheaper intervention meets its rule, or the finding has too few positives",
}


class DecisionError(ModelError, ValueError):
    """The inputs of a decision are unusable: shapes, unknown findings, thresholds outside (0, 1)."""
