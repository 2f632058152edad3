"""The coded concepts chexd's DICOM objects use for the 14 ChestX-ray14 findings, and where each code comes from.

| Finding (CheXNet label) | Code | Scheme | Meaning | Source |
|---|---|---|---|---|
| Atelectasis | 46621007 | SCT | Atelectasis | SNOMED CT |
| Cardiomegaly | 8186001 | SCT | Cardiomegaly | SNOMED CT |
| Effusion | 60046008 | SCT | Pleural effusion | SNOMED CT; DICOM CID 645 / 8134 |
| Infiltration | 112121 | DCM | Infiltrate | DICOM CID 6102 / 6104 (chest findings) |
| Mass | 4147007 | SCT | Mass | SNOMED CT; DICOM CID 6102 / 6104 |
| Nodule | 27925004 | SCT | Nodule | SNOMED CT; DICOM CID 6102 / 6104 |
| Pneumonia | 233604007 | SCT | Pneumonia | SNOMED CT |
| Pneumothorax | 36118008 | SCT | Pneumothorax | SNOMED CT; DICOM CID 6102 / 6105 |
| Consolidation | 95436008 | SCT | Lung consolidation | SNOMED CT |
| Edema | 19242006 | SCT | Pulmonary edema | SNOMED CT; DICOM CID 3700 |
| Emphysema | 87433001 | SCT | Pulmonary emphysema | SNOMED CT |
| Fibrosis | 51615001 | SCT | Fibrosis of lung | SNOMED CT |
| Pleural_Thickening | CXR14-PT | 99CHEXD | Pleural thickening | private: no SNOMED CT id verified (see below) |
| Hernia | 84089009 | SCT | Hiatal hernia | SNOMED CT (ChestX-ray14's "Hernia" is a hiatus hernia) |

The DICOM CIDs are those pydicom ships (``pydicom.sr._concepts_dict``, from PS3.16). The SNOMED CT ids were checked
against independent published value sets and code tables; for Pleural thickening the only id found (78381009) came
from a single table that also mislabels another code, so it is NOT used: the private scheme ``99CHEXD`` (declared in
every SR's CodingSchemeIdentificationSequence) stays for it until a SNOMED CT browser confirms an id.

Searched again on 2026-12-02 (issue 15): pydicom's PS3.16 concept dictionary has no pleural thickening concept in
any CID (only "Pleural effusion", "Pleural structure", "Subpleural line"); the SNOMED CT browser pages found
(tx-dev.fhir.org and other Snowstorm-style browsers) hold no page for a "Pleural thickening" or "Thickening of pleura"
concept; the nearest published SNOMED CT value set found (HL7 Lithuania lung IG, ValueSet incidental-finding, LDCT
incidental chest findings) lists only neighbours - 301256004 "Pleura finding (finding)", 233659006 "Asbestos-induced
pleural plaque (disorder)", 32931001 "Calcification of pleura (disorder)" - none of which means pleural thickening
(the first is the parent of every pleural finding, pleural effusion included: coding with it would say less than the
label). So no id is stated by a source we can cite, and the private code stays.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

from reporting.errors import ReportError

__all__ = ["FINDING_CODES", "PRIVATE_SCHEME", "SCT_FINDINGS", "finding_code"]

PRIVATE_SCHEME = "99CHEXD"

FINDING_CODES: dict[str, Code] = {
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "Cardiomegaly": Code("8186001", "SCT", "Cardiomegaly"),
    "Effusion": Code("60046008", "SCT", "Pleural effusion"),
    "Infiltration": Code("112121", "DCM", "Infiltrate"),
    "Mass": Code("4147007", "SCT", "Mass"),
    "Nodule": Code("27925004", "SCT", "Nodule"),
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "Pneumothorax": Code("36118008", "SCT", "Pneumothorax"),
    "Consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "Edema": Code("19242006", "SCT", "Pulmonary edema"),
    "Emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    "Fibrosis": Code("51615001", "SCT", "Fibrosis of lung"),
    "Pleural_Thickening": Code("CXR14-PT", PRIVATE_SCHEME, "Pleural thickening"),
    "Hernia": Code("84089009", "SCT", "Hiatal hernia"),
}

# the findings chexd claims a SNOMED CT code for (a test holds the table to this)
SCT_FINDINGS: tuple[str, ...] = tuple(label for label, code in FINDING_CODES.items() if code.scheme_designator == "SCT")


def finding_code(label: str) -> Code:
    """The code of a finding label (CheXNet spelling, e.g. "Pleural_Thickening"); raises ReportError for others."""
    try:
        return FINDING_CODES[label]
    except KeyError:
        raise ReportError(f"No code for finding {label!r} - known: {sorted(FINDING_CODES)}") from None
