"""PDF report: text extractable (pdftotext), fonts embedded (pdffonts), renders (pdftoppm), banners and revisions;
the heatmap overlay is drawn on the decoded image (bright = dense, MONOCHROME1 inverted, radiological orientation)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from model.preprocess import decode_image
from model.types import LABELS, Applicability, QualityIssue
from reporting.exclusions import ExclusionRules
from reporting.pdf import AI_BANNER, SYNTHETIC_BANNER, shown, write_pdf
from reporting.render import overlay
from reporting.report import SourceImage, assemble, display_name, domain_check, study_report
from tests.reporting_helpers import (
    THRESHOLDS,
    demo_model,
    image_result,
    make_prediction,
    phantom_case,
    phantom_report,
)

REAL_CXR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-cxr"
FINDINGS = {"Pneumothorax": 0.97, "Edema": 0.6, "Effusion": 0.9, "Cardiomegaly": 0.8}


def _text(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    report, _ = phantom_report(findings=FINDINGS)
    path = tmp_path_factory.mktemp("pdf") / "report.pdf"
    return path, write_pdf(report, path)


def test_text_lists_every_finding_status_and_the_banners(written: tuple[Path, str]) -> None:
    path, digest = written
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    text = _text(path)
    flat = " ".join(text.split())
    for label in LABELS:  # display names: "Pleural thickening", never the identifier "Pleural_Thickening"
        assert display_name(label) in flat
    assert "Pleural_Thickening" not in text and "Pleural thickening" in flat
    assert SYNTHETIC_BANNER in text and AI_BANNER in text
    assert "excluded" in text and "present" in text and "absent" in text
    # the excluded finding's reason names the partner and the NIH lift; channel evidence and zones are listed
    assert "Pneumothorax present (p=0.97" in flat and "0.30x chance" in flat
    assert "Channel evidence" in flat and "cardiac silhouette" in flat
    assert "chexd-test" in text and "0123456789abcdef" in text and "ab" * 32 in text  # model name, version, hash
    assert "2026-11-01" in text  # calibration date
    assert "Revised report" not in text


def test_fonts_are_embedded(written: tuple[Path, str]) -> None:
    out = subprocess.run(["pdffonts", str(written[0])], check=True, capture_output=True, text=True).stdout
    rows = out.strip().splitlines()[2:]
    assert rows, out
    for row in rows:
        # columns: name type encoding emb sub uni object-id: emb must be "yes" for every font
        fields = row.split()
        assert fields[-5] == "yes", row
    assert "Helvetica" not in out


def test_pages_render_to_images(written: tuple[Path, str], tmp_path: Path) -> None:
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(written[0]), str(tmp_path / "page")], check=True,
                   timeout=120)
    pages = sorted(tmp_path.glob("page*.png"))
    assert 1 <= len(pages) <= 2  # one image with 4 positive findings: its block and the model section
    first = np.asarray(Image.open(pages[0]).convert("RGB")).astype(int)
    # the red synthetic banner is on the first page
    red = (first[..., 0] > 150) & (first[..., 1] < 60) & (first[..., 2] < 80)
    assert red.sum() > 500
    # the heatmaps are on the first page too (compact layout): saturated colours from the colour map
    saturated = (first.max(axis=2) - first.min(axis=2) > 150) & ~red
    assert saturated.sum() > 200


def test_the_same_report_writes_the_same_bytes(written: tuple[Path, str], tmp_path: Path) -> None:
    report, _ = phantom_report(findings=FINDINGS)
    assert write_pdf(report, tmp_path / "again.pdf") == written[1]


def test_a_real_model_has_no_synthetic_banner_and_a_revision_says_what_it_supersedes(tmp_path: Path) -> None:
    report, _ = phantom_report(synthetic=False, revision=3, predecessors=("1.2.3.4.5", "1.2.3.4.6"),
                               findings={"Effusion": 0.9})
    dated = replace(report, superseded_revision=2, superseded_at=dt.datetime(2026, 11, 26, 17, 5, tzinfo=dt.UTC))
    write_pdf(dated, tmp_path / "r3.pdf")
    text = " ".join(_text(tmp_path / "r3.pdf").split())
    assert SYNTHETIC_BANNER not in text and AI_BANNER in text
    assert "Revised report, revision 3 of 2026-11-27 09:30 UTC, supersedes revision 2 of 2026-11-26 17:05 UTC" in text
    assert "1.2.3.4.5" not in text  # a revision and its date, not a bare UID
    write_pdf(report, tmp_path / "unknown.pdf")  # the daemon did not say which revision it replaces
    assert "supersedes the previous revision" in " ".join(_text(tmp_path / "unknown.pdf").split())


def test_footer_puts_page_and_revision_on_separate_lines_and_counts_pages(written: tuple[Path, str]) -> None:
    lines = _text(written[0]).splitlines()
    pages = [line for line in lines if re.search(r"page \d+ of \d+", line)]
    total = int(re.search(r"of (\d+)", pages[0]).group(1))
    assert len(pages) == total >= 1 and all(AI_BANNER in line for line in pages)
    assert not any("revision" in line for line in pages)  # "revision 1" was printed over "page 1"
    assert sum("revision 1 of 2026-11-27 09:30 UTC" in line for line in lines) == total


def test_creation_date_is_the_reports_and_the_bytes_stay_deterministic(tmp_path: Path) -> None:
    report, _ = phantom_report(findings={"Effusion": 0.9})
    later = replace(report, created_at=dt.datetime(2026, 12, 2, 8, 15, 30, tzinfo=dt.UTC))
    for name, r in (("a", report), ("b", later)):
        write_pdf(r, tmp_path / f"{name}.pdf")
    info = {name: subprocess.run(["pdfinfo", "-isodates", str(tmp_path / f"{name}.pdf")], check=True,
                                 capture_output=True, text=True).stdout for name in "ab"}
    assert "2026-11-27T09:30:00" in info["a"] and "2000-01-01" not in info["a"]
    assert "2026-12-02T08:15:30" in info["b"]
    assert write_pdf(later, tmp_path / "b2.pdf") == hashlib.sha256((tmp_path / "b.pdf").read_bytes()).hexdigest()


def test_each_image_fits_on_one_page_findings_table_first(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.99"
    cases = [FINDINGS, {"Pleural_Thickening": 0.85, "Effusion": 0.7},
             {"Nodule": 0.9, "Mass": 0.8, "Infiltration": 0.7, "Atelectasis": 0.75, "Pleural_Thickening": 0.9}]
    results = []
    for k, findings in enumerate(cases):
        _, ds, image, prediction = phantom_case(index=2 + k, findings=findings, study_uid=study)
        results.append(image_result(ds, image, prediction))
    path = tmp_path / "three.pdf"
    write_pdf(study_report(results, demo_model()), path)
    info = subprocess.run(["pdfinfo", str(path)], check=True, capture_output=True, text=True).stdout
    count = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    assert count <= len(cases) + 1  # 7 pages for 3 images before (issue 15)
    pages = [" ".join(subprocess.run(["pdftotext", "-f", str(n), "-l", str(n), str(path), "-"], check=True,
                                     capture_output=True, text=True).stdout.split())
             for n in range(1, count + 1)]
    for n in range(1, len(cases) + 1):
        page = next(p for p in pages if f"Image {n} of 3" in p)
        # the whole block is on that page, the findings table before the heatmaps and the evidence
        assert page.index("Most heat (share of the heat)") < page.index("Heatmaps:") < page.index("Channels for it")


def test_heat_outside_the_lungs_is_named_alike_in_the_pdf_and_the_sr(tmp_path: Path) -> None:
    from reporting.sr import build_sr

    _, ds, image, prediction = phantom_case(findings={"Pleural_Thickening": 0.85})
    i = LABELS.index("Pleural_Thickening")
    cam = np.full(prediction.cams[i].shape, -0.5, np.float32)
    cam[0, :2] = cam[0, -2:] = 3.0  # the red at the shoulders
    prediction.cams[i] = cam
    result = image_result(ds, image, prediction)
    finding = result.finding("Pleural_Thickening")
    assert finding.main_region.is_outside and finding.main_region.share > 0.5
    assert finding.region == f"outside the lung fields ({finding.main_region.share:.0%} of heat)"
    report = study_report([result], demo_model())
    write_pdf(report, tmp_path / "r.pdf")
    assert finding.region in " ".join(_text(tmp_path / "r.pdf").split())
    sr = build_sr(report, [ds])
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert f"Main region of the heatmap: {finding.region}" in texts, texts


def test_evidence_table_shows_counter_evidence_apart_and_what_the_rows_carry(written: tuple[Path, str]) -> None:
    raw = subprocess.run(["pdftotext", str(written[0]), "-"], check=True, capture_output=True, text=True).stdout
    text = " ".join(raw.split())  # reading order, not layout: a table cell's wrapped lines stay together
    assert "Counter-evidence (against it)" in text and "Listed rows carry" in text
    assert "of the total" in text and "all channels:" in text
    report, _ = phantom_report(findings=FINDINGS)
    effusion = report.images[0].finding("Effusion")
    against = effusion.counter_evidence[0]
    assert f"#{against.channel} {against.contribution:+.2f}" in text  # the channel against it is shown, as such
    assert f"{effusion.shown_share:.1%} (for)" in text


def test_overlay_is_on_the_decoded_image_bright_dense_for_both_photometrics() -> None:
    grey = {}
    for mono1 in (False, True):
        sample, ds, image, prediction = phantom_case(findings={"Effusion": 0.9}, monochrome1=mono1)
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if mono1 else "MONOCHROME2")
        result = image_result(ds, image, prediction)
        ov = overlay(result, result.finding("Effusion"), max_side=256)
        grey[mono1] = ov.rgb
        # where there is no heat the picture is the decoded image itself (bright = dense)
        no_heat = result.heatmap("Effusion", image.shape) < 0.05 * ov.vmax
        assert np.abs(ov.rgb[..., 1][no_heat].astype(int) - np.round(image * 255)[no_heat]).max() <= 1
        lungs = result.lung_fields.lungs_at(image.shape) & no_heat
        spine = np.zeros_like(no_heat)
        spine[: image.shape[0] // 2, image.shape[1] // 2 - 4: image.shape[1] // 2 + 4] = True
        assert ov.rgb[..., 1][lungs].mean() < 0.6 * ov.rgb[..., 1][spine & no_heat].mean()  # lungs dark
        # the heat peak lies on the lesion (within one 32-px CAM cell): heat and image share one orientation
        mask = sample.masks[LABELS.index("Effusion")]
        r, c = result.finding("Effusion").peak
        assert mask[max(0, r - 32): r + 32, max(0, c - 32): c + 32].any()
    # the stored inversion does not change what is shown (to a quantisation step of the flipped window)
    assert np.abs(grey[False].astype(int) - grey[True].astype(int)).max() <= 2


def test_real_monochrome1_file_is_shown_inverted_relative_to_its_monochrome2_twin(tmp_path: Path) -> None:
    mono2 = pydicom.dcmread(REAL_CXR / "siim-ptx-1.2.276.0.7230010.3.1.4.8323329.6904.dcm")
    mono1 = pydicom.dcmread(REAL_CXR / "Fake_MONOHR1.dcm")  # same pixels, PhotometricInterpretation MONOCHROME1
    shown = {}
    for name, ds in (("mono2", mono2), ("mono1", mono1)):
        image = decode_image(ds)
        prediction = make_prediction({"Nodule": 0.9})
        result = image_result(ds, image, prediction)
        ov = overlay(result, result.finding("Nodule"), max_side=256)
        heat = result.heatmap("Nodule", ov.rgb.shape[:2])
        shown[name] = (ov.rgb[..., 1].astype(int), heat <= 0.05 * ov.vmax)
        report = study_report([result], demo_model())
        write_pdf(report, tmp_path / f"{name}.pdf")
        assert SourceImage.from_dataset(ds).photometric_interpretation in _text(tmp_path / f"{name}.pdf")
    (a, mask_a), (b, mask_b) = shown["mono2"], shown["mono1"]
    both = mask_a & mask_b
    # MONOCHROME1 is displayed inverted: grey(mono1) = 255 - grey(mono2) wherever no heat is drawn
    assert np.abs((a + b)[both] - 255).max() <= 2


# --- hostile header values (issue 12): the report is always written, values are clipped or marked, never dropped ----

HOSTILE = {
    "long_name": {"PatientName": "LANGERNAME" * 1000},  # reportlab LayoutError: the study's report failed for good
    "long_everything": {"PatientID": "9" * 10000, "AccessionNumber": "X" * 5000, "StudyDescription": "desc " * 3000,
                        "InstitutionName": "I" * 3000, "ReferringPhysicianName": "Y" * 300 + "^Z"},
    "control": {"PatientName": "Evil\x1b[31m^Name\r\nINFO forged", "PatientID": "ID\x00\x07"},
    "rtl_emoji": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "כהן^דוד\u202eevil",
                  "StudyDescription": "emoji 🫁"},
    "cjk": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "山田^太郎=やまだ^たろう",
            "InstitutionName": "東京病院"},
    "empty": {"PatientName": "", "PatientID": ""},
    "spaces": {"PatientName": "     ", "PatientID": "   "},
    "markup": {"PatientName": "<b>x</b>&amp;<font size=900>^y", "PatientID": "<para>"},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_values_are_clipped_or_marked_and_the_report_is_written(tmp_path: Path, case: str) -> None:
    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9})
    for keyword, value in HOSTILE[case].items():
        setattr(ds, keyword, value)
    report = study_report([image_result(ds, image, prediction)], demo_model())
    path = tmp_path / "r.pdf"
    write_pdf(report, path)  # raised LayoutError for the long values
    raw = subprocess.run(["pdftotext", str(path), "-"], check=True, capture_output=True, text=True).stdout
    text, packed = " ".join(raw.split()), "".join(raw.split())
    assert "Effusion" in text and AI_BANNER in text
    if case == "long_name":
        assert "LANGERNAME" * 6 + "LAN…" in packed and "LANGERNAME" * 7 not in packed
    if case == "long_everything":
        assert "9" * 63 + "…" in packed and "9" * 64 not in packed and "X" * 63 + "…" in packed
    if case == "control":
        assert "\x1b" not in raw and "\x00" not in raw and "Evil?[31m" in text and "ID??" in text
    if case in ("rtl_emoji", "cjk", "control"):
        assert "cannot show are printed as '?'" in text, "the reader is told characters were replaced"
    else:
        assert "cannot show" not in text
    if case in ("empty", "spaces"):
        assert "Patient —" in text and "Patient ID —" in text
    if case == "markup":
        assert "<b>x</b>&amp;<font size=900>, y" in text and "<para>" in text, "markup is text, never markup"


@pytest.mark.parametrize(
    ("value", "expected", "replaced"),
    [
        ("Doe^John", "Doe^John", False),
        ("  two   spaces\tand tab ", "two spaces and tab", False),
        ("A" * 100, "A" * 63 + "…", False),
        ("bell\x07", "bell?", True),
        ("Иван", "????", True),
        ("x\u202ey", "x?y", True),
        ("", "", False),
    ],
)
def test_shown_clips_collapses_and_replaces(value: str, expected: str, replaced: bool) -> None:
    assert shown(value) == (expected, replaced)
    assert len(shown("B" * 10_000, 16)[0]) == 16


# --- the applicability gate (issue 14) ---------------------------------------------------------------------------

def _gated_pdf(policy: str, folder: Path) -> str:
    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9, "Cardiomegaly": 0.8})
    domain = domain_check(Applicability(score=41.2, threshold=18.7, in_domain=False, method="mahalanobis-pca32"),
                          (QualityIssue(code="inverted", reason="the image looks inverted for MONOCHROME2"),), policy)
    result = assemble(prediction, image, SourceImage.from_dataset(ds), thresholds=THRESHOLDS, rules=ExclusionRules(),
                      domain=domain)
    path = folder / f"{policy}.pdf"
    write_pdf(study_report([result], demo_model()), path)
    return " ".join(_text(path).split())  # the banner wraps: compare on single spaces


def test_withheld_image_says_outside_the_validated_domain_with_score_threshold_and_reasons(tmp_path: Path) -> None:
    text = _gated_pdf("withhold", tmp_path)
    assert "Outside the model's validated domain — no AI findings for this image" in text
    assert "score 41.2 above the threshold 18.7 (mahalanobis-pca32)" in text
    assert "the image looks inverted for MONOCHROME2" in text
    assert "Effusion" not in text and "Most heat" not in text and "Channels for it" not in text  # no findings


def test_flagged_image_keeps_its_findings_under_a_warning(tmp_path: Path) -> None:
    text = _gated_pdf("flag", tmp_path)
    assert "WARNING: outside the model's validated domain" in text and "no AI findings" not in text
    assert "score 41.2 above the threshold 18.7" in text
    assert "Effusion" in text and "Cardiomegaly" in text and "Channel evidence" in text


def test_in_domain_image_states_its_score_in_one_line(tmp_path: Path) -> None:
    _, ds, image, prediction = phantom_case()
    domain = domain_check(Applicability(score=7.5, threshold=18.7, in_domain=True, method="m"), (), "withhold")
    result = image_result(ds, image, prediction)
    result = assemble(prediction, image, result.source, thresholds=THRESHOLDS, rules=ExclusionRules(), domain=domain)
    write_pdf(study_report([result], demo_model()), tmp_path / "in.pdf")
    text = " ".join(_text(tmp_path / "in.pdf").split())
    assert "Applicability: within the model's validated domain (applicability score 7.5 at or below the threshold " \
           "18.7 (m))" in text
    assert "no AI findings" not in text and "Effusion" in text
