"""The report's value types and their assembly from one prediction: findings, regions, channel evidence, exclusions.

What crosses to the daemon: :class:`SourceImage` (the DICOM facts a report repeats), :class:`ModelInfo`,
:class:`Finding` (with :class:`RegionShare` and :class:`ChannelEvidence`), :class:`ImageResult` (one image) and
:class:`StudyReport` (one study, one revision). :func:`assemble` builds an ImageResult from a
``model.types.Prediction``; :func:`study_report` groups them.

**Applicability** (issue 14): :func:`domain_check` applies the policy (withhold | flag | off) to an image's
applicability verdict and input-quality issues, giving a :class:`DomainCheck`. A *withheld* image gets NO findings
(``ImageResult.findings`` is empty; the documents say "outside the model's validated domain — no AI findings for this
image" with the score, the threshold and the quality reasons); a *flagged* one keeps them under a warning.

**Status** of a finding: "present" (probability >= threshold), "excluded" (>= threshold but a mutually exclusive
finding is present with much higher confidence; see reporting.exclusions — shown with its reason, never hidden), or
"absent".

**Channel evidence** (DESIGN.md): the logit of class c is ``b_c + sum_k phi_ck`` with ``phi_ck = w_ck * mean(A_k)``.
The **total evidence** of a finding is ``T_c = sum_k |phi_ck|`` over ALL feature channels (logit units;
``Prediction.evidence_total``), and a channel's **share** is ``|phi_ck| / T_c``: the shares of all channels add up to
exactly 1, those of any set of channels to that set's part of the evidence. For each present or excluded finding the
report lists, from ``Prediction.top_channels``, up to ``top_k`` channels that push FOR it (phi_ck > 0, largest first:
``Finding.evidence``) and, apart, up to ``COUNTER_ROWS`` (3) that push AGAINST it (phi_ck < 0:
``Finding.counter_evidence``), and says how much of the total the listed rows carry. Since
``sum_k phi_ck = logit_c - b_c``, the share of all evidence that pushes for the finding is
``(T_c + logit_c - b_c) / (2 T_c)``. A prediction archived before T_c was recorded
falls back to the stored top channels as the total (``Finding.evidence_complete`` False; the documents say so).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pydicom
from pydicom.uid import RE_VALID_UID

from model.types import Applicability, Prediction, PreprocessRecipe, QualityIssue
from reporting.errors import ReportError
from reporting.exclusions import ExclusionRules, apply_exclusions
from reporting.regions import (
    LungFields,
    MainRegion,
    RegionShare,
    cam_peak,
    cam_to_image,
    estimate_lung_fields,
    main_region,
    region_shares,
)

__all__ = [
    "DOMAIN_HEADLINE",
    "ChannelEvidence",
    "DomainCheck",
    "Finding",
    "ImageResult",
    "ModelInfo",
    "RegionShare",
    "SourceImage",
    "StudyReport",
    "assemble",
    "display_name",
    "domain_check",
    "study_report",
]

Status = Literal["present", "absent", "excluded"]
DomainStatus = Literal["in_domain", "withheld", "flagged", "unchecked"]
DOMAIN_HEADLINE = "outside the model's validated domain — no AI findings for this image"
FLAG_HEADLINE = "outside the model's validated domain — findings shown with this warning, not validated for this image"
_POLICIES = ("withhold", "flag", "off")
_DOMAIN_STATUSES = ("in_domain", "withheld", "flagged", "unchecked")
COUNTER_ROWS = 3  # counter-evidence rows per finding (at most; the strongest channels against it)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _valid_uid(value: str) -> bool:
    return bool(value) and len(value) <= 64 and RE_VALID_UID.match(value) is not None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceImage:
    """The DICOM facts about one source image that its report repeats (PS3.3 Patient, General Study, Series, Image).

    Strings are the DICOM values as text ("" when absent); ``patient_birth_date``/``study_date`` are DA (YYYYMMDD),
    ``study_time`` TM. ``rows``/``columns`` are the image size in pixels. Build it with :meth:`from_dataset`."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    rows: int
    columns: int
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    institution_name: str = ""
    modality: str = ""
    photometric_interpretation: str = ""
    view_position: str = ""
    series_number: str = ""
    instance_number: str = ""

    def __post_init__(self) -> None:
        for name in ("sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid"):
            value = getattr(self, name)
            if not _valid_uid(value):
                raise ReportError(f"Invalid {name} {value!r} - must be a valid DICOM UID")
        if self.rows < 1 or self.columns < 1:
            raise ReportError(f"Invalid image size {self.rows}x{self.columns} - rows and columns must be >= 1")

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset) -> SourceImage:
        """Read the facts from a dataset. Raises ReportError naming a missing or invalid UID or image size."""
        missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows",
                               "Columns") if k not in ds]
        if missing:
            raise ReportError(f"Invalid source dataset - missing {', '.join(missing)}")
        return cls(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            patient_name=_text(ds, "PatientName"),
            patient_id=_text(ds, "PatientID"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            accession_number=_text(ds, "AccessionNumber"),
            study_id=_text(ds, "StudyID"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            study_description=_text(ds, "StudyDescription"),
            referring_physician_name=_text(ds, "ReferringPhysicianName"),
            institution_name=_text(ds, "InstitutionName"),
            modality=_text(ds, "Modality"),
            photometric_interpretation=_text(ds, "PhotometricInterpretation"),
            view_position=_text(ds, "ViewPosition"),
            series_number=_text(ds, "SeriesNumber"),
            instance_number=_text(ds, "InstanceNumber"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """The model a report states: ``name``; ``version`` (the model version results record, e.g. the manifest's
    16-hex version id; it is the algorithm version in the SR and keys the result UIDs); ``weights_sha256`` (64 hex,
    "" when unknown); ``calibrated_at`` (when thresholds were last calibrated, None if never); ``synthetic`` (the
    demo model trained on phantoms: every document carries a NOT FOR DIAGNOSIS banner); ``intended_use``."""

    name: str
    version: str
    weights_sha256: str = ""
    calibrated_at: dt.datetime | dt.date | None = None
    synthetic: bool = False
    intended_use: str = ""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ReportError("Invalid model name '' - must not be empty")
        if not re.fullmatch(r"[0-9A-Za-z._-]{1,64}", self.version):
            raise ReportError(f"Invalid model version {self.version!r} - expected 1-64 of [0-9A-Za-z._-]")
        if self.weights_sha256 and not _HEX64.match(self.weights_sha256):
            raise ReportError(f"Invalid weights_sha256 {self.weights_sha256!r} - expected 64 lowercase hex digits")


@dataclass(frozen=True, kw_only=True, slots=True)
class DomainCheck:
    """The applicability gate's verdict on one image, as the documents state it (built by :func:`domain_check`).

    ``status``: "in_domain" (applicability score at or below the artifact's threshold, no input-quality issue);
    "withheld" (score above the threshold or a quality issue, policy withhold: the image gets NO findings, the
    documents say why); "flagged" (the same, policy flag: findings kept, with a warning); "unchecked" (the artifact
    has no applicability model and no quality issue was found). ``score``/``threshold``/``method``: the artifact's
    applicability score of the image (unit depends on ``method``; +inf allowed), None/"" when it has none.
    ``quality``: the input-quality issues found (model.types.QualityIssue), each with its reason."""

    status: DomainStatus
    score: float | None = None
    threshold: float | None = None
    method: str = ""
    quality: tuple[QualityIssue, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in _DOMAIN_STATUSES:
            raise ReportError(f"Invalid domain status {self.status!r} - expected one of {', '.join(_DOMAIN_STATUSES)}")
        if (self.score is None) != (self.threshold is None):
            raise ReportError("Invalid domain check - score and threshold are both given or both None")
        if self.score is not None and (np.isnan(self.score) or not np.isfinite(self.threshold)):
            raise ReportError(f"Invalid applicability score {self.score} / threshold {self.threshold} - the score "
                             "must be a number (+inf allowed), the threshold finite")
        if self.status == "unchecked" and (self.score is not None or self.quality):
            raise ReportError("Invalid domain status 'unchecked' - only without a score and without quality issues")
        if self.status == "in_domain" and (self.out_of_domain or self.quality or self.score is None):
            raise ReportError("Invalid domain status 'in_domain' - needs a score at or below its threshold and no "
                             "quality issue")
        if self.status in ("withheld", "flagged") and not (self.out_of_domain or self.quality):
            raise ReportError(f"Invalid domain status {self.status!r} - needs a score above its threshold or a "
                             "quality issue")
        object.__setattr__(self, "quality", tuple(self.quality))

    @property
    def out_of_domain(self) -> bool:
        """The score is above the threshold (False without a score)."""
        return self.score is not None and self.threshold is not None and self.score > self.threshold

    @property
    def withheld(self) -> bool:
        return self.status == "withheld"

    @property
    def flagged(self) -> bool:
        return self.status == "flagged"

    def score_text(self) -> str:
        """E.g. "applicability score 41.2 above the threshold 18.7 (mahalanobis-pca32)"; "" without a score."""
        if self.score is None or self.threshold is None:
            return ""
        relation = "above" if self.out_of_domain else "at or below"
        method = f" ({self.method})" if self.method else ""
        return f"applicability score {_number(self.score)} {relation} the threshold {_number(self.threshold)}{method}"

    def reasons(self) -> tuple[str, ...]:
        """Why the image is outside (withheld/flagged): the score sentence when it is above its threshold, then each
        quality issue's reason. Empty for in_domain and unchecked."""
        out = [self.score_text()] if self.out_of_domain else []
        return tuple(out + [issue.reason for issue in self.quality])

    def to_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "score": None if self.score is None else float(self.score),
            "threshold": None if self.threshold is None else float(self.threshold),
            "method": self.method,
            "quality": [issue.to_dict() for issue in self.quality],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DomainCheck:
        """Inverse of :meth:`to_dict`. Raises ReportError for a malformed dict."""
        quality = data.get("quality") or []
        if not isinstance(quality, list):
            raise ReportError(f"Invalid quality {quality!r} - expected a list of {{code, reason}}")
        score, threshold = data.get("score"), data.get("threshold")
        return cls(
            status=str(data.get("status")),  # type: ignore[arg-type]
            score=None if score is None else float(score),  # type: ignore[arg-type]
            threshold=None if threshold is None else float(threshold),  # type: ignore[arg-type]
            method=str(data.get("method") or ""),
            quality=tuple(QualityIssue(code=str(q["code"]), reason=str(q["reason"])) for q in quality),
        )


def display_name(label: str) -> str:
    """A finding's name for people: "Pleural_Thickening" -> "Pleural thickening" (CheXNet labels are identifiers)."""
    words = label.replace("_", " ").split()
    return " ".join([words[0][:1].upper() + words[0][1:].lower(), *(w.lower() for w in words[1:])]) if words else label


def _pct(value: float) -> str:
    """A share for people: "12%", "0.4%" below 1%, "<0.1%" for tiny non-zero shares."""
    if value <= 0:
        return "0%"
    if value < 0.001:
        return "<0.1%"
    return f"{value:.1%}" if value < 0.01 else f"{value:.0%}"


def _number(value: float) -> str:
    """A score for people: "infinite", "120,812" (>= 100: whole numbers with separators) or 3 significant digits."""
    if not np.isfinite(value):
        return "infinite"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def domain_check(
    applicability: Applicability | None, quality: Sequence[QualityIssue], policy: str
) -> DomainCheck | None:
    """The gate: apply ``policy`` ("withhold" | "flag" | "off") to an image's applicability verdict (None when the
    artifact has no applicability model) and its input-quality issues. Returns None for "off" (nothing checked,
    nothing stored). Out of domain or any quality issue -> "withheld" (withhold) or "flagged" (flag); else
    "in_domain", or "unchecked" without an applicability model. Raises ReportError for another policy."""
    if policy not in _POLICIES:
        raise ReportError(f"Invalid applicability policy {policy!r} - expected one of {', '.join(_POLICIES)}")
    if policy == "off":
        return None
    quality = tuple(quality)
    outside = applicability is not None and not applicability.in_domain
    if outside or quality:
        status: DomainStatus = "withheld" if policy == "withhold" else "flagged"
    else:
        status = "unchecked" if applicability is None else "in_domain"
    if applicability is None:
        return DomainCheck(status=status, quality=quality)
    # the verdict's in_domain is score <= threshold; keep the stored numbers consistent with it
    return DomainCheck(status=status, score=float(applicability.score), threshold=float(applicability.threshold),
                       method=applicability.method, quality=quality)


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelEvidence:
    """One feature channel's part in a finding's logit: ``contribution`` phi_ck in logit units (positive: pushes the
    finding's probability up) and ``share`` = |phi_ck| / (sum over all channels of |phi_ck|), in [0, 1] (see the
    module docstring: the shares of all channels add up to 1)."""

    channel: int
    contribution: float
    share: float

    def __post_init__(self) -> None:
        if self.channel < 0:
            raise ReportError(f"Invalid channel {self.channel} - must be >= 0")
        if not (np.isfinite(self.contribution) and np.isfinite(self.share)):
            raise ReportError(f"Invalid evidence for channel {self.channel} - contribution and share must be finite")
        if not 0.0 <= self.share <= 1.0 + 1e-6:
            raise ReportError(f"Invalid share {self.share} for channel {self.channel} - must be in [0, 1] (|phi| over "
                             "the total evidence)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One label's result on one image.

    ``probability`` and ``threshold`` in [0, 1] / (0, 1); ``status`` present | absent | excluded; ``reason`` why it
    is excluded (None otherwise); ``regions`` the shares of its heat per zone, largest first (present and excluded
    findings; empty for absent ones); ``evidence`` the top channels that push FOR the finding (contribution > 0) and
    ``counter_evidence`` the top ones that push AGAINST it (contribution < 0), both largest first (present and
    excluded findings); ``evidence_total`` sum of |phi| over all channels (logit units; 0 for absent findings) and
    ``evidence_net`` logit - bias (the sum of all phi); ``evidence_complete`` False when the total covers only the
    stored top channels (an older archive); ``peak`` the (row, column) of the heatmap's maximum in source-image
    pixels (None for absent findings)."""

    label: str
    probability: float
    threshold: float
    status: Status
    reason: str | None = None
    regions: tuple[RegionShare, ...] = ()
    evidence: tuple[ChannelEvidence, ...] = ()
    peak: tuple[int, int] | None = None
    counter_evidence: tuple[ChannelEvidence, ...] = ()
    evidence_total: float = 0.0
    evidence_net: float = 0.0
    evidence_complete: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ReportError(f"Invalid probability for {self.label!r}: {self.probability} - must be in [0, 1]")
        if not 0.0 < self.threshold < 1.0:
            raise ReportError(f"Invalid threshold for {self.label!r}: {self.threshold} - must be in (0, 1)")
        if self.status not in ("present", "absent", "excluded"):
            raise ReportError(f"Invalid status {self.status!r} - expected present, absent or excluded")
        if (self.status == "absent") != (self.probability < self.threshold):
            raise ReportError(f"Invalid status {self.status!r} for {self.label!r}: probability {self.probability:.4f} "
                             f"vs threshold {self.threshold:.4f}")
        if (self.status == "excluded") != bool(self.reason):
            raise ReportError(f"Invalid reason for {self.label!r} - an excluded finding needs a reason, others none")
        if any(e.contribution <= 0 for e in self.evidence) or any(e.contribution >= 0 for e in self.counter_evidence):
            raise ReportError(f"Invalid evidence for {self.label!r} - evidence rows push for the finding (contribution "
                             "> 0), counter-evidence rows against it (< 0)")
        if not (np.isfinite(self.evidence_total) and self.evidence_total >= 0 and np.isfinite(self.evidence_net)):
            raise ReportError(f"Invalid evidence_total {self.evidence_total} / evidence_net {self.evidence_net} for "
                             f"{self.label!r} - must be finite, the total >= 0")
        if self.shown_share + self.counter_shown_share > 1.0 + 1e-4:
            raise ReportError(f"Invalid evidence shares for {self.label!r} - the listed rows carry more than the total")

    @property
    def positive(self) -> bool:
        """At or above its threshold (present or excluded)."""
        return self.status != "absent"

    @property
    def name(self) -> str:
        """The finding's display name ("Pleural thickening")."""
        return display_name(self.label)

    @property
    def main_region(self) -> MainRegion | None:
        """The zone or outside the lung fields, whichever holds most of the heat, with its share (None: no heat)."""
        return main_region(self.regions)

    @property
    def region(self) -> str | None:
        """Where most of the heat lies, as every document says it: "left lower zone (34% of heat)" or "outside the
        lung fields (58% of heat)"; None without heat. At most 64 characters."""
        main = self.main_region
        return main.text if main else None

    @property
    def shown_share(self) -> float:
        """The part of the total evidence that the ``evidence`` rows carry, in [0, 1]."""
        return float(sum(e.share for e in self.evidence))

    @property
    def counter_shown_share(self) -> float:
        """The part of the total evidence that the ``counter_evidence`` rows carry, in [0, 1]."""
        return float(sum(e.share for e in self.counter_evidence))

    @property
    def share_for(self) -> float | None:
        """The share of ALL the evidence that pushes for the finding, (T + net) / (2 T); None without evidence or
        when the total is not complete."""
        if self.evidence_total <= 0 or not self.evidence_complete:
            return None
        return min(1.0, max(0.0, (self.evidence_total + self.evidence_net) / (2 * self.evidence_total)))

    def evidence_summary(self) -> str:
        """One sentence for the reader, e.g. "These 5 channels carry 12% of the evidence (sum of |contribution| over
        all channels: 3.41 logit); 3 channels against it carry 4%. Of all the evidence, 63% pushes for the finding,
        37% against." "" when the finding has no evidence."""
        if self.evidence_total <= 0:
            return ""
        scope = "all channels" if self.evidence_complete else "the stored top channels (the total over all channels "
        scope += "" if self.evidence_complete else "was not recorded)"
        n = len(self.evidence)
        text = (f"{'These' if n != 1 else 'This'} {n} channel{'s' if n != 1 else ''} carr{'y' if n != 1 else 'ies'} "
                f"{_pct(self.shown_share)} of the evidence (sum of |contribution| over {scope}: "
                f"{self.evidence_total:.2f} logit)")
        if self.counter_evidence:
            k = len(self.counter_evidence)
            text += (f"; the {k} counter-evidence channel{'s' if k != 1 else ''} carr{'y' if k != 1 else 'ies'} "
                     f"{_pct(self.counter_shown_share)}")
        share_for = self.share_for
        if share_for is not None:
            text += (f". Of all the evidence, {_pct(share_for)} pushes for the finding, {_pct(1 - share_for)} "
                     "against")
        return text + "."


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class ImageResult:
    """Everything the documents show about one image.

    - ``image``: float32 [rows, columns] in [0, 1], bright = dense (MONOCHROME1 already inverted), as decoded.
    - ``cams``: float32 [n_labels, h, w], the prediction's CAMs in logit units; ``labels`` their order.
    - ``recipe``: the model's preprocessing (to map CAM cells back to the image); None: the CAM spans the image.
    - ``findings``: one per label, in label order. ``lung_fields``: the zones used for ``regions``.
    - ``model_version``: the prediction's model version.
    - ``domain``: the applicability gate's verdict (None: the gate was off). A **withheld** image has NO findings
      (``findings`` is empty); every other image has one finding per label."""

    source: SourceImage
    findings: tuple[Finding, ...]
    image: np.ndarray
    cams: np.ndarray
    labels: tuple[str, ...]
    lung_fields: LungFields
    model_version: str
    recipe: PreprocessRecipe | None = None
    domain: DomainCheck | None = None

    def __post_init__(self) -> None:
        if self.image.shape != (self.source.rows, self.source.columns):
            raise ReportError(f"Invalid image shape {self.image.shape} - expected (Rows, Columns) = "
                             f"({self.source.rows}, {self.source.columns})")
        if self.cams.ndim != 3 or self.cams.shape[0] != len(self.labels):
            raise ReportError(f"Invalid cams shape {self.cams.shape} - expected ({len(self.labels)}, h, w)")
        if self.withheld:
            if self.findings:
                raise ReportError("Invalid findings - an image withheld by the applicability gate has none")
        elif tuple(f.label for f in self.findings) != self.labels:
            raise ReportError("Invalid findings - expected one per label, in label order")

    @property
    def withheld(self) -> bool:
        """Outside the model's validated domain under policy withhold: no findings."""
        return self.domain is not None and self.domain.withheld

    def finding(self, label: str) -> Finding:
        for f in self.findings:
            if f.label == label:
                return f
        raise KeyError(f"no finding {label!r} - labels are {list(self.labels)}")

    @property
    def positive(self) -> tuple[Finding, ...]:
        """Present and excluded findings, most probable first."""
        return tuple(sorted((f for f in self.findings if f.positive), key=lambda f: -f.probability))

    def heatmap(self, label: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The finding's heat (ReLU of its CAM, logit units) on a grid of ``shape`` covering the image (default
        the image's own size): float32 [rows, columns] >= 0."""
        cam = self.cams[self.labels.index(label)]
        return cam_to_image(cam, shape or self.image.shape, self.recipe, source_shape=self.image.shape)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class StudyReport:
    """One revision of a study's report.

    ``images`` (at least one, all of one study, oldest first); ``model``; ``created_at`` (timezone-aware, stored as
    UTC); ``revision`` >= 1; ``predecessors``: SOP Instance UIDs of the SR documents this revision supersedes;
    ``superseded_revision`` / ``superseded_at``: the revision number and creation time of the report it replaces (so
    the PDF can say "supersedes revision 2 of 2026-11-27 09:30 UTC"; None when unknown)."""

    images: tuple[ImageResult, ...]
    model: ModelInfo
    created_at: dt.datetime
    revision: int = 1
    predecessors: tuple[str, ...] = field(default_factory=tuple)
    superseded_revision: int | None = None
    superseded_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise ReportError("Invalid report - no images")
        studies = {r.source.study_instance_uid for r in self.images}
        if len(studies) != 1:
            raise ReportError(f"Invalid report - images of {len(studies)} studies: {sorted(studies)}")
        if self.created_at.tzinfo is None:
            raise ReportError("Invalid created_at - must be timezone-aware (UTC)")
        object.__setattr__(self, "created_at", self.created_at.astimezone(dt.UTC))
        if self.revision < 1:
            raise ReportError(f"Invalid revision {self.revision} - must be >= 1")
        for uid in self.predecessors:
            if not _valid_uid(uid):
                raise ReportError(f"Invalid predecessor SOP Instance UID {uid!r}")
        object.__setattr__(self, "predecessors", tuple(self.predecessors))
        if self.superseded_revision is not None and not 1 <= self.superseded_revision < self.revision:
            raise ReportError(f"Invalid superseded_revision {self.superseded_revision} - must be in [1, revision "
                             f"{self.revision})")
        if self.superseded_at is not None:
            if self.superseded_at.tzinfo is None:
                raise ReportError("Invalid superseded_at - must be timezone-aware (UTC)")
            object.__setattr__(self, "superseded_at", self.superseded_at.astimezone(dt.UTC))

    def supersedes_text(self) -> str | None:
        """E.g. "revision 2 of 2026-11-27 09:30 UTC"; "the previous revision" when that is not known; None for a
        first revision."""
        if self.revision == 1:
            return None
        if self.superseded_revision is None:
            return "the previous revision"
        when = f" of {self.superseded_at:%Y-%m-%d %H:%M} UTC" if self.superseded_at else ""
        return f"revision {self.superseded_revision}{when}"

    @property
    def source(self) -> SourceImage:
        """The first image's facts (patient and study are the same for every image)."""
        return self.images[0].source

    @property
    def study_instance_uid(self) -> str:
        return self.source.study_instance_uid


def _evidence(prediction: Prediction, index: int, top_k: int) -> dict[str, object]:
    """Finding keyword arguments: the top ``top_k`` channels for and against class ``index``, the total and net
    evidence (module docstring)."""
    phi = np.asarray(prediction.top_contributions[index], dtype=np.float64)
    channels = np.asarray(prediction.top_channels[index])
    if prediction.evidence_total is not None:
        total, complete = float(prediction.evidence_total[index]), True
        total = max(total, float(np.abs(phi).sum()))  # float32 rounding must not push a share above 1
    else:
        total, complete = float(np.abs(phi).sum()), False
    order = np.argsort(-np.abs(phi), kind="stable")

    def rows(sign: float) -> tuple[ChannelEvidence, ...]:
        picked = [j for j in order if phi[j] * sign > 0][:top_k]
        return tuple(ChannelEvidence(channel=int(channels[j]), contribution=float(phi[j]),
                                     share=float(abs(phi[j]) / total) if total > 0 else 0.0) for j in picked)

    return {
        "evidence": rows(1.0),
        "counter_evidence": rows(-1.0)[:COUNTER_ROWS],
        "evidence_total": total,
        "evidence_net": float(prediction.logits[index]) - float(prediction.bias[index]),
        "evidence_complete": complete,
    }


def assemble(
    prediction: Prediction,
    image: np.ndarray,
    source: SourceImage,
    *,
    thresholds: Mapping[str, float],
    rules: ExclusionRules,
    top_k: int = 5,
    recipe: PreprocessRecipe | None = None,
    lung_fields: LungFields | None = None,
    domain: DomainCheck | None = None,
) -> ImageResult:
    """One image's findings from its prediction: status against ``thresholds`` (label -> (0, 1)), exclusions by
    ``rules``, zones of each positive finding's heat (lung fields estimated from ``image`` unless given), its peak and
    its ``top_k`` channels.

    ``image``: float [Rows, Columns] in [0, 1], bright = dense (as model.preprocess.decode_image returns it).
    ``recipe``: the model's preprocessing, needed to place the CAM on the image correctly when the model pads,
    resizes or crops (pass the manifest's ``preprocessing``).
    ``domain``: the applicability gate's verdict (:func:`domain_check`); a withheld image gets NO findings (the
    probabilities are not turned into statuses at all), a flagged one keeps them.

    Raises ReportError for a missing or out-of-range threshold, an image whose shape is not (Rows, Columns), or
    top_k < 1."""
    if top_k < 1:
        raise ReportError(f"Invalid top_k {top_k} - must be >= 1")
    image = np.asarray(image, dtype=np.float32)
    if image.shape != (source.rows, source.columns):
        raise ReportError(f"Invalid image shape {image.shape} - expected (Rows, Columns) = ({source.rows}, "
                         f"{source.columns}) of {source.sop_instance_uid}")
    probabilities = prediction.as_dict()
    excluded = apply_exclusions(probabilities, thresholds, rules)  # validates the thresholds
    fields = lung_fields or estimate_lung_fields(image)
    findings = []
    for i, label in enumerate(() if domain is not None and domain.withheld else prediction.labels):
        p, t = probabilities[label], float(thresholds[label])
        if p < t:
            findings.append(Finding(label=label, probability=p, threshold=t, status="absent"))
            continue
        cam = prediction.cams[i]
        findings.append(
            Finding(
                label=label,
                probability=p,
                threshold=t,
                status="excluded" if label in excluded else "present",
                reason=excluded[label].reason if label in excluded else None,
                regions=region_shares(cam, fields, recipe),
                peak=cam_peak(cam, image.shape, recipe),
                **_evidence(prediction, i, top_k),  # type: ignore[arg-type]
            )
        )
    return ImageResult(
        source=source,
        findings=tuple(findings),
        image=image,
        cams=np.asarray(prediction.cams, dtype=np.float32),
        labels=tuple(prediction.labels),
        lung_fields=fields,
        model_version=prediction.model_version,
        recipe=recipe,
        domain=domain,
    )


def study_report(
    images: Sequence[ImageResult],
    model: ModelInfo,
    *,
    revision: int = 1,
    predecessors: Sequence[str] = (),
    created_at: dt.datetime | None = None,
    superseded_revision: int | None = None,
    superseded_at: dt.datetime | None = None,
) -> StudyReport:
    """Group one study's image results into a report revision (``created_at`` defaults to now, UTC).

    Raises ReportError for no images, images of several studies, revision < 1 or an invalid predecessor UID."""
    return StudyReport(
        images=tuple(images),
        model=model,
        created_at=created_at or dt.datetime.now(dt.UTC),
        revision=revision,
        predecessors=tuple(predecessors),
        superseded_revision=superseded_revision,
        superseded_at=superseded_at,
    )
