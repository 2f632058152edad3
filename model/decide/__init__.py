"""Treatment decision system: route each finding's problem to the cheapest intervention that is verified to work.

**Parts.** Everything is diagnosed, fitted and planned on the *selection* part of the validation data and measured
on the patient-disjoint *verification* part (``model.verification.split_features``). Confidence intervals are
percentile 95% intervals of a bootstrap that resamples PATIENTS of the verification part; deltas are paired (the
same resamples before and after).

**Diagnosis** of one finding on the selection part (and the radiologist feedback), in this order:

- *too few positives*: fewer than ``MIN_POSITIVES`` positive images in the selection or the verification part. The
  finding is reported and routed to "needs data"; it gets no other verdict.
- *false-positive pattern*: at least ``MIN_CONFIRMED`` = 2 images that radiologists marked absent for the finding and
  that the model still calls present share contributing channels: a channel counts as shared when it is among the
  top ``TOP_CHANNELS`` = 10 channels by contribution ``φ_k = w_k · ā_k`` of at least half of them (and at least 2).
- *weak ranking*: the selection AUROC's upper 95% bound is below ``AUROC_FLOOR`` = 0.70; *regressed ranking*: it is
  below the reference (parent) model's AUROC on the same images, when one is given.
- *poor operating point*: at the current threshold, F1 is at least ``F1_GAP`` = 0.05 below, or recall at least
  ``RECALL_GAP`` = 0.20 below, what the F1-optimal threshold of the selection part gives ("far").
- otherwise *nothing to fix*.

A finding with several problems is routed for the first of: false-positive pattern, ranking, operating point (the
others are listed in its evidence; run ``decide`` again on the candidate to address them).

**Interventions**, cheapest first, each with its acceptance rule on the verification part:

1. *threshold* (1 number in the manifest, no weight). Operating point: the F1-optimal threshold of the selection
   part; accepted when the paired ΔF1 CI lies above 0. False-positive pattern: the lowest threshold above every
   confirmed false positive; accepted when it loses at most ``TOLERANCE`` = 2% of the held-out true positives.
   Ranking: rejected (a threshold cannot change AUROC).
2. *channel edit* (zero a few weights of the finding's row: ``model.correct.plan_correction`` on the selection part
   with the confirmed false positives as targets); accepted when ``model.correct.check_held_out`` passes on the
   verification part (held-out TP loss rate within ``TOLERANCE``). Only for a false-positive pattern.
3. *head fine-tune* (the finding's row and bias, ``C + 1`` parameters, from ``model.finetune.finetune_head`` trained
   on one patient-disjoint half of the selection part and stopped on the other; for a false-positive pattern the
   confirmed false positives are added as negatives). Ranking: accepted when the paired ΔAUROC CI lies above 0;
   operating point: when the ΔF1 CI does (threshold refitted on the selection part); false-positive pattern: when
   every confirmed false positive falls below the threshold (seen in training: stated, not verified) and
   ``check_held_out`` passes. The refit trains all rows jointly; only the finding's row is applied, and the other
   rows of the refit head are measured against their verification CIs and reported (``whole_head_check``).
4. *needs data / retraining*: nothing cheaper passed its rule.

**Other findings.** Every intervention changes only its finding's threshold or row of the head, and a finding's
probability depends only on its own row and bias, so the other findings are untouched *by construction* (a unit
test asserts the composed head's other rows are bit-identical); this is stated, never claimed as a result.

**Cost** of an intervention: parameters changed (weights and biases; a threshold changes 0 weights and 1 manifest
number), findings touched, and CPU seconds (``time.process_time``, all threads, for fitting plus verifying it).

With only predictions (no model, :func:`decide_predictions`) only thresholds can be routed, and the output says so.

Modules: :mod:`~model.decide.rules` (constants, ``RULES``, the error), :mod:`~model.decide.results` (the returned
values), :mod:`~model.decide.measures` (statistics), :mod:`~model.decide.context` (checked inputs),
:mod:`~model.decide.diagnosis`, one module per intervention (:mod:`~model.decide.threshold`,
:mod:`~model.decide.channel_edit`, :mod:`~model.decide.head_finetune`) and :mod:`~model.decide.routing` (:func:`decide`,
:func:`decide_predictions`, :func:`compose`).
"""

from model.decide.results import Composition, Cost, Decision, Diagnosis, Option, Route
from model.decide.routing import compose, decide, decide_predictions
from model.decide.rules import (
    AUROC_FLOOR,
    F1_GAP,
    INTERVENTIONS,
    MIN_CONFIRMED,
    PROBLEMS,  # noqa: F401 (a module constant, as before the split)
    RECALL_GAP,
    RULES,
    TOLERANCE,
    TOP_CHANNELS,
    DecisionError,
)

__all__ = [
    "AUROC_FLOOR",
    "F1_GAP",
    "INTERVENTIONS",
    "MIN_CONFIRMED",
    "RECALL_GAP",
    "RULES",
    "TOLERANCE",
    "TOP_CHANNELS",
    "Composition",
    "Cost",
    "Decision",
    "DecisionError",
    "Diagnosis",
    "Option",
    "Route",
    "compose",
    "decide",
    "decide_predictions",
]
