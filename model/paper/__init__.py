"""The paper's abstract, claim by claim: a figure measured here beside the paper's, with a CI and a verdict.

Each :class:`PaperRow` holds one claim of the source paper's abstract, the value measured here, its 95% CI (patient
bootstrap where patients exist), the paper's value, which data it was measured on (:data:`REAL`: real CheXNet
predictions on the NIH ChestX-ray14 test split; :data:`DEMO`: chexd's SYNTHETIC demo model on its chest phantom;
:data:`STRUCTURAL`: a count or an invariant that follows from the architecture or the algorithm) and a verdict:

- ``reproduced``: measured on data that did not choose the effect and the stated rule of the row holds;
- ``not reproduced``: measured, and the rule fails (the reason says by how much);
- ``true by construction``: holds because of how the model or the algorithm is built (a count, a one-row edit, a
  search capped at the paper's size) - a test guards it, it is not evidence for the method; never ``reproduced``;
- ``not measurable here``: the data, hardware or information to measure it is missing (the reason says which).

The row builders (``*_row``/``*_rows``) are pure functions of measured numbers, so their verdict rules are unit
tested on synthetic inputs. The ``measure_*`` functions compute those numbers from arrays and FeatureSets (no
database, no files); ``daemon.cli.paper_table`` loads the artifacts and data and prints the table.

Modules, one per section of the table: :mod:`~model.paper.claims` (the paper's figures, verdicts, :class:`PaperRow`),
:mod:`~model.paper.compression`, :mod:`~model.paper.correction`, :mod:`~model.paper.routing`,
:mod:`~model.paper.calibration`, :mod:`~model.paper.finetune`, :mod:`~model.paper.polarized`, and
:mod:`~model.paper.measure` (helpers the rows share).
"""

from model.paper.calibration import calibration_rows
from model.paper.claims import (  # noqa: F401 (constants outside __all__ stay importable, as before)
    BEST_CLASSES,
    DATA_KINDS,
    DEMO,
    MARGINAL_F1,
    MIN_JUDGED,
    PAPER,
    RATIO_TOLERANCE,
    REAL,
    STRUCTURAL,
    VERDICTS,
    PaperError,
    PaperRow,
    ratio_verdict,
)
from model.paper.compression import compression_auroc_row, compression_params_row, latency_row, measure_compression
from model.paper.correction import CorrectionStudy, correction_rows, measure_correction
from model.paper.finetune import FinetuneStudy, finetune_rows, head_parameters_row, measure_finetune
from model.paper.measure import head_of, head_scores, phantom_feature_sets
from model.paper.polarized import polarized_row
from model.paper.routing import routing_row

__all__ = [
    "DATA_KINDS",
    "DEMO",
    "PAPER",
    "REAL",
    "STRUCTURAL",
    "VERDICTS",
    "CorrectionStudy",
    "FinetuneStudy",
    "PaperError",
    "PaperRow",
    "calibration_rows",
    "compression_auroc_row",
    "compression_params_row",
    "correction_rows",
    "finetune_rows",
    "head_of",
    "head_parameters_row",
    "head_scores",
    "latency_row",
    "measure_compression",
    "measure_correction",
    "measure_finetune",
    "phantom_feature_sets",
    "polarized_row",
    "ratio_verdict",
    "routing_row",
]
