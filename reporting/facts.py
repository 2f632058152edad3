"""The facts about the model that made a prediction, as the daemon archives them with it and the report states them.

:class:`ModelFacts` is the typed door between the daemon and reporting: the daemon writes it into the prediction
archive as JSON (:meth:`ModelFacts.to_dict`), the report worker reads it back (:meth:`ModelFacts.from_dict`, which
also reads the plain dicts older archives hold) and hands it to :func:`reporting.compose.compose_study`. Torch-free.
"""

from __future__ import annotations

import datetime as dt
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model.types import PreprocessRecipe
from reporting.errors import ReportError
from reporting.report import DomainCheck, ModelInfo

__all__ = ["ModelFacts"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelFacts:
    """One model, as its prediction's report needs it.

    ``name`` (e.g. the manifest's, "unnamed" when unknown); ``version`` (the model version the prediction records,
    e.g. the manifest's 16-hex version id); ``weights_sha256`` (64 hex, "" when unknown); ``synthetic`` (the demo
    model trained on phantoms); ``intended_use``; ``thresholds``: label -> decision threshold in [0, 1] (read-only);
    ``calibrated_at``: when the thresholds were last calibrated (None if never); ``preprocessing``: the model's
    recipe (None: the CAM is taken to span the whole, square-padded image); ``domain``: the applicability gate's
    verdict on this image (None when the gate was off). Raises ReportError for an empty name or a threshold that is
    not a finite number."""

    name: str
    version: str
    weights_sha256: str = ""
    synthetic: bool = False
    intended_use: str = ""
    thresholds: Mapping[str, float] = field(default_factory=dict)
    calibrated_at: dt.datetime | dt.date | None = None
    preprocessing: PreprocessRecipe | None = None
    domain: DomainCheck | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ReportError("Invalid model name '' - must not be empty")
        thresholds: dict[str, float] = {}
        for label, value in dict(self.thresholds).items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise ReportError(f"Invalid threshold {value!r} for {label!r} - expected a finite number")
            thresholds[str(label)] = number
        object.__setattr__(self, "thresholds", types.MappingProxyType(thresholds))

    def model_info(self) -> ModelInfo:
        """The model as the documents state it (reporting.report.ModelInfo)."""
        return ModelInfo(name=self.name, version=self.version, weights_sha256=self.weights_sha256,
                         calibrated_at=self.calibrated_at, synthetic=self.synthetic, intended_use=self.intended_use)

    def to_dict(self) -> dict[str, Any]:
        """The archive's JSON form: the keys of :meth:`from_dict`; ``preprocessing`` and ``domain`` only when set."""
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "synthetic": self.synthetic,
            "intended_use": self.intended_use,
            "thresholds": dict(self.thresholds),
            "calibrated_at": None if self.calibrated_at is None else self.calibrated_at.isoformat(),
        }
        if self.preprocessing is not None:
            data["preprocessing"] = self.preprocessing.to_dict()
        if self.domain is not None:
            data["domain"] = self.domain.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFacts:
        """Read :meth:`to_dict`'s form, and the plain dicts archives written before this class hold: name (missing or
        empty: "unnamed"), version (required), weights_sha256, synthetic, intended_use, thresholds, calibrated_at
        (ISO 8601 text, a date or datetime, or None), preprocessing (a PreprocessRecipe dict)
        and domain (a DomainCheck dict); unknown keys are ignored. Raises ReportError for a missing version or a
        malformed value."""
        if not isinstance(data, Mapping):
            raise ReportError(f"Invalid model facts {type(data).__name__} - expected a mapping")
        if not data.get("version"):
            raise ReportError("Invalid model facts - no model version")
        try:
            calibrated = data.get("calibrated_at")
            if isinstance(calibrated, str):
                calibrated = dt.datetime.fromisoformat(calibrated) if calibrated else None
            recipe = data.get("preprocessing")
            if isinstance(recipe, Mapping):
                recipe = PreprocessRecipe(**recipe)
            domain = data.get("domain")
            if isinstance(domain, Mapping):
                domain = DomainCheck.from_dict(domain)
            return cls(
                name=str(data.get("name") or "unnamed"),
                version=str(data["version"]),
                weights_sha256=str(data.get("weights_sha256") or ""),
                synthetic=bool(data.get("synthetic", False)),
                intended_use=str(data.get("intended_use") or ""),
                thresholds=dict(data.get("thresholds") or {}),
                calibrated_at=calibrated if isinstance(calibrated, dt.date) else None,
                preprocessing=recipe if isinstance(recipe, PreprocessRecipe) else None,
                domain=domain if isinstance(domain, DomainCheck) else None,
            )
        except ReportError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ReportError(f"Invalid model facts - {type(exc).__name__}: {exc}") from exc
