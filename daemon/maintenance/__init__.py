"""The maintenance layer: model-maintenance jobs (calibrate, correct, finetune, compress, decide) and the read-only
measurements beside them (evaluate, channels, paper-table), as a library the ``chexd`` commands call.

What every job shares sits in the modules below and is re-exported here. A job loads its parent version
(:func:`load_parent`, ``parent.py``), gets labelled validation data (:func:`labelled_source`,
:func:`validation_features`: cached pooled features, ``sources.py``), runs inside an admin-job record
(:func:`run_job`, ``jobs.py``) and derives a child artifact (:func:`write_candidate`, ``candidate.py``): a new version
(:func:`child_version`, ``versions.py``, one rule for every job), the parent's provenance plus one entry per step,
the job's report (including the check of the *saved* weights) inside the manifest's metrics, registered as a
*candidate*. Nothing here activates a model (``chexd model activate`` does).

Each job's own steps live in the module of its command's name: ``calibrate.py``, ``correct.py``, ``finetune.py``,
``compress.py``, ``decide.py``, ``evaluate.py``, ``channels.py``, ``paper.py`` (``chexd paper-table``), ``train.py``,
``imports.py`` (``chexd model import``); ``images.py`` reads false-positive images (files, stored UIDs, radiologist
feedback).

A library: no Typer, no printing. Progress goes through a ``(stage, done, total)`` callback; expected failures are
raised as :class:`MaintenanceError`, whose message a person can act on (the CLI prints it and exits 1, or 2 when
``usage`` is set: the options themselves are wrong).
"""

from __future__ import annotations

from daemon.maintenance.candidate import Candidate, backbone_check, write_candidate
from daemon.maintenance.errors import MaintenanceError, Progress
from daemon.maintenance.jobs import run_job
from daemon.maintenance.parent import Parent, load_parent
from daemon.maintenance.sources import SourceOptions, feature_cache_dir, labelled_source, validation_features
from daemon.maintenance.versions import MAJOR_OPERATIONS, child_version

__all__ = [
    "MAJOR_OPERATIONS",
    "Candidate",
    "MaintenanceError",
    "Parent",
    "Progress",
    "SourceOptions",
    "backbone_check",
    "child_version",
    "feature_cache_dir",
    "labelled_source",
    "load_parent",
    "run_job",
    "validation_features",
    "write_candidate",
]
