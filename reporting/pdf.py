"""The PDF report of one study revision (reportlab): header, banners, findings, heatmaps, evidence, exclusions, model.

Layout (issue 15): the patient and study table, then per image one block that never spans more than a page (for up
to 8 positive findings): the findings table first (present and excluded findings with their probability, threshold
and where most of the heat lies; the absent ones folded into one row with their probabilities), the heatmaps as a
grid of small pictures, one channel-evidence table (evidence for and against each finding, and how much of the total
evidence the listed channels carry); the model section last. Footer on every page: the AI-result notice and
"page N of M" on the first line, model, weights and revision on the second. Findings are named for people
("Pleural thickening", reporting.report.display_name).

Text is set in Bitstream Vera (bundled with reportlab), embedded as TrueType subsets, so it is extractable
(``pdftotext``) and renders identically everywhere. **Determinism**: the same report (same images, predictions,
model, revision and ``created_at``) gives the same bytes: reportlab's invariant mode fixes the document ID, and the
PDF's CreationDate/ModDate are the report's own ``created_at`` (the true creation time of the revision, not the
build time). The DICOM UIDs never depend on these bytes (reporting.uids).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image as PILImage
from reportlab import rl_config
from reportlab.graphics.shapes import Drawing, Rect, String
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from reporting.regions import OUTSIDE, OUTSIDE_TEXT, outside_share
from reporting.render import FONT_DIR, colormap, draw_peak, overlay
from reporting.report import (
    DOMAIN_HEADLINE,
    FLAG_HEADLINE,
    ChannelEvidence,
    Finding,
    ImageResult,
    StudyReport,
    display_name,
)

__all__ = ["AI_BANNER", "SYNTHETIC_BANNER", "write_pdf"]

# Binary (Flate/DCT) streams instead of ASCII85 text: reportlab's pure-Python ASCII85 encoder was a fifth of the PDF's
# build time (the overlay JPEGs) and makes the file a quarter larger; every PDF reader takes binary streams.
rl_config.useA85 = 0

SYNTHETIC_BANNER = "SYNTHETIC DEMO MODEL — NOT FOR DIAGNOSIS"
AI_BANNER = "AI result — requires review by a qualified reader"
_RED = colors.HexColor("#c0001a")
_AMBER = colors.HexColor("#fff1c2")
_GREY = colors.HexColor("#6b6b6b")
_STATUS_COLOUR = {"present": "#c0001a", "excluded": "#b35900", "absent": "#6b6b6b"}


def _register_fonts() -> None:
    if "Vera" in pdfmetrics.getRegisteredFontNames():
        return
    for name, file in (("Vera", "Vera.ttf"), ("Vera-Bold", "VeraBd.ttf"), ("Vera-Italic", "VeraIt.ttf"),
                       ("Vera-BoldItalic", "VeraBI.ttf")):
        pdfmetrics.registerFont(TTFont(name, os.path.join(FONT_DIR, file)))
    pdfmetrics.registerFontFamily("Vera", normal="Vera", bold="Vera-Bold", italic="Vera-Italic",
                                  boldItalic="Vera-BoldItalic")


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName="Vera", fontSize=8.5, leading=11)
    return {
        "body": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7, leading=9, textColor=_GREY),
        "title": ParagraphStyle("title", parent=base, fontName="Vera-Bold", fontSize=15, leading=19, spaceAfter=4),
        "h2": ParagraphStyle("h2", parent=base, fontName="Vera-Bold", fontSize=11, leading=14, spaceBefore=8,
                             spaceAfter=4),
        "h3": ParagraphStyle("h3", parent=base, fontName="Vera-Bold", fontSize=9.5, leading=12, spaceBefore=6,
                             spaceAfter=3),
        "banner": ParagraphStyle("banner", parent=base, fontName="Vera-Bold", fontSize=13, leading=16,
                                 textColor=colors.white, alignment=TA_CENTER),
        "banner_small": ParagraphStyle("banner_small", parent=base, fontSize=7.5, leading=9.5,
                                       textColor=colors.white, alignment=TA_CENTER),
        "notice": ParagraphStyle("notice", parent=base, fontName="Vera-Bold", fontSize=10, leading=13,
                                 alignment=TA_CENTER),
        "cell": ParagraphStyle("cell", parent=base, fontSize=8, leading=10),
        "caption": ParagraphStyle("caption", parent=base, fontSize=6.5, leading=8),
    }


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(text, style)


def _e(value: object) -> str:
    return escape(str(value))


def _date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else da


def _time(tm: str) -> str:
    return f"{tm[:2]}:{tm[2:4]}:{tm[4:6]}" if len(tm) >= 6 and tm[:6].isdigit() else tm


# A header value is clipped at this many characters (the DICOM maximum of an LO value and of one PN component group):
# a 10,000-character PatientName made a table cell taller than the page (reportlab LayoutError, the report lost).
MAX_FIELD_CHARS = 64
ELLIPSIS = "…"
UNSHOWN_NOTE = ("Characters of the patient or study data that this report's font cannot show are printed as '?'; "
                "the DICOM header of the images holds the exact values.")
# C0/C1 controls, zero-width and bidirectional formatting characters: never printed (a right-to-left override would
# reorder what follows it in a viewer that applies it)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def _glyphs() -> frozenset[int]:
    _register_fonts()
    return frozenset(pdfmetrics.getFont("Vera").face.charToGlyph)


def shown(value: str, limit: int = MAX_FIELD_CHARS) -> tuple[str, bool]:
    """A DICOM text value as the report prints it, and whether characters were replaced: control and direction
    characters and characters the font lacks become '?', runs of white space one space, and text longer than
    ``limit`` characters is clipped with an ellipsis (so no value can make a cell taller than a page)."""
    glyphs = _glyphs()
    collapsed = " ".join(value.split())
    text = _UNPRINTABLE.sub("?", collapsed)
    replaced = text != collapsed
    if any(ord(c) not in glyphs for c in text):
        text = "".join(c if ord(c) in glyphs else "?" for c in text)
        replaced = True
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + ELLIPSIS
    return text, replaced


def _name(pn: str) -> str:
    parts = [p for p in pn.split("^") if p]
    return ", ".join(parts[:2]) + (" " + " ".join(parts[2:]) if len(parts) > 2 else "") if parts else ""


def _banner(text: str, sub: str | None, st: dict[str, ParagraphStyle], background: colors.Color,
            dark_text: bool = False) -> Table:
    rows = [[_p(_e(text), st["notice"] if dark_text else st["banner"])]]
    if sub:
        rows.append([_p(_e(sub), st["small"] if dark_text else st["banner_small"])])
    table = Table(rows, colWidths=[180 * mm])
    table.setStyle(TableStyle([
        ("FONTNAME", (0, 0), (-1, -1), "Vera"), ("BACKGROUND", (0, 0), (-1, -1), background),
        ("BOX", (0, 0), (-1, -1), 1.2, _RED if not dark_text else colors.HexColor("#b38600")),
        ("TOPPADDING", (0, 0), (-1, -1), 4), ("BOTTOMPADDING", (0, 0), (-1, -1), 4),
    ]))
    return table


def _grid(rows: list[list[object]], widths: Sequence[float], *, header: bool = True) -> Table:
    table = Table(rows, colWidths=list(widths), repeatRows=1 if header else 0)
    style = [
        ("FONTNAME", (0, 0), (-1, -1), "Vera"), ("FONTSIZE", (0, 0), (-1, -1), 8),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.HexColor("#cccccc")),
        ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]
    if header:
        style += [("FONTNAME", (0, 0), (-1, 0), "Vera-Bold"), ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor(
            "#eeeeee")), ("LINEBELOW", (0, 0), (-1, 0), 0.8, colors.black)]
    table.setStyle(TableStyle(style))
    return table


def _header(report: StudyReport, st: dict[str, ParagraphStyle]) -> list[object]:
    """The patient and study table (every value through :func:`shown`), and a note when characters were replaced."""
    s = report.source
    left = [
        ("Patient", _name(s.patient_name)), ("Patient ID", s.patient_id), ("Birth date", _date(s.patient_birth_date)),
        ("Sex", s.patient_sex), ("Institution", s.institution_name),
    ]
    right = [
        ("Study date", f"{_date(s.study_date)} {_time(s.study_time)}".strip()), ("Accession", s.accession_number),
        ("Study", s.study_description), ("Referring", _name(s.referring_physician_name)),
        ("Images", str(len(report.images))),
    ]
    values = {label: shown(value) for label, value in left + right}
    rows = [[_p(f"<b>{_e(a)}</b>", st["cell"]), _p(_e(values[a][0]) or "—", st["cell"]),
             _p(f"<b>{_e(c)}</b>", st["cell"]), _p(_e(values[c][0]) or "—", st["cell"])]
            for (a, _), (c, _) in zip(left, right, strict=True)]
    rows.append([_p("<b>Study UID</b>", st["cell"]), _p(_e(s.study_instance_uid), st["small"]), "", ""])
    table = Table(rows, colWidths=[24 * mm, 66 * mm, 24 * mm, 66 * mm])
    table.setStyle(TableStyle([
        ("FONTNAME", (0, 0), (-1, -1), "Vera"),
        ("SPAN", (1, -1), (-1, -1)), ("BOX", (0, 0), (-1, -1), 0.5, colors.black),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5), ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
    ]))
    if any(replaced for _, replaced in values.values()):
        return [table, Spacer(1, 1 * mm), _p(_e(UNSHOWN_NOTE), st["small"])]
    return [table]


def _status(f: Finding) -> str:
    return f'<font color="{_STATUS_COLOUR[f.status]}"><b>{f.status}</b></font>' if f.positive else f.status


def _region_text(f: Finding) -> str:
    """Where most of the heat lies, the words of the SC label and the SR (Finding.region)."""
    return f.region or ("no positive heat" if f.positive else "")


def _named(text: str, labels: Sequence[str]) -> str:
    """``text`` with every label identifier replaced by its display name ("Pleural_Thickening" -> "Pleural
    thickening")."""
    for label in sorted(labels, key=len, reverse=True):
        if "_" in label:
            text = text.replace(label, display_name(label))
    return text


def _findings_table(result: ImageResult, st: dict[str, ParagraphStyle]) -> Table:
    """Present and excluded findings first (most probable first), one row each; the absent ones folded into one
    row that still gives every probability and threshold."""
    rows: list[list[object]] = [["Finding", "Probability", "Threshold", "Status", "Most heat (share of the heat)"]]
    for f in result.positive:
        rows.append([_p(f"<b>{_e(f.name)}</b>", st["cell"]), f"{f.probability:.3f}", f"{f.threshold:.3f}",
                     _p(_status(f), st["cell"]), _p(_e(_region_text(f)), st["cell"])])
    absent = [f for f in result.findings if not f.positive]
    if absent:
        listed = " · ".join(f"{_e(f.name)} {f.probability:.3f} / {f.threshold:.2f}" for f in absent)
        rows.append([_p(f"<b>absent</b> (probability / threshold, below it): {listed}", st["small"]), "", "", "",
                     ""])
    table = _grid(rows, [42 * mm, 22 * mm, 20 * mm, 22 * mm, 74 * mm])
    style = [("ALIGN", (1, 0), (2, -1), "RIGHT")]
    if absent:
        style.append(("SPAN", (0, len(rows) - 1), (-1, len(rows) - 1)))
    table.setStyle(TableStyle(style))
    return table


def _domain_block(result: ImageResult, st: dict[str, ParagraphStyle]) -> list[object]:
    """What the applicability gate decided for the image: withheld (a red box, the headline "outside the model's
    validated domain — no AI findings for this image", the score, threshold and quality reasons), flagged (an amber
    warning with the same reasons; the findings follow), in domain or unchecked (one small line). Nothing when the
    gate was off."""
    d = result.domain
    if d is None:
        return []
    if d.status in ("withheld", "flagged"):
        headline = DOMAIN_HEADLINE if d.withheld else "WARNING: " + FLAG_HEADLINE
        facts = [d.score_text() or "this model has no applicability model (no score)"]
        facts += [f"input quality: {issue.reason}" for issue in d.quality]
        text = "; ".join(f for f in facts if f)
        sub = (f"{text[:1].upper()}{text[1:]}." if d.withheld else
               f"{text[:1].upper()}{text[1:]}. Read the findings below with this in mind.")
        banner = _banner(headline[:1].upper() + headline[1:], sub, st,
                         _RED if d.withheld else _AMBER, dark_text=not d.withheld)
        return [banner, Spacer(1, 2 * mm)]
    if d.status == "in_domain":
        line = f"Applicability: within the model's validated domain ({d.score_text()})."
    else:
        line = ("Applicability: not checked — this model carries no applicability model; no input-quality issue "
                "was found.")
    return [_p(_e(line), st["small"]), Spacer(1, 1 * mm)]


def _jpeg(img: PILImage.Image) -> io.BytesIO:
    """JPEG (quality 90): reportlab embeds it as is (DCTDecode); a PNG would be decoded and deflated again."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)
    buf.seek(0)
    return buf


def _colour_legend() -> Drawing:
    """One horizontal colour bar for an image's heatmaps: blue (no heat) to red (the picture's maximum, stated under
    each picture in logit units). Vector graphics, text extractable."""
    d = Drawing(180 * mm, 4.5 * mm)
    d.initialFontName = "Vera"  # the renderer's initial font would otherwise add an unembedded Helvetica
    x0, bar_w, steps = 118 * mm, 40 * mm, 48
    lut = colormap(np.linspace(0.0, 1.0, steps))
    for i in range(steps):
        r, g, b = (int(c) / 255 for c in lut[i])
        d.add(Rect(x0 + bar_w * i / steps, 1, bar_w / steps + 0.3, 2.6 * mm, fillColor=colors.Color(r, g, b),
                   strokeColor=None))
    d.add(Rect(x0, 1, bar_w, 2.6 * mm, fillColor=None, strokeColor=colors.black, strokeWidth=0.3))
    d.add(String(0, 3, "Heatmaps: class activation maps (ReLU, logit units); + marks the peak.", fontName="Vera",
                 fontSize=6.5))
    d.add(String(x0 - 2, 3, "0", fontName="Vera", fontSize=6.5, textAnchor="end"))
    d.add(String(x0 + bar_w + 2, 3, "the picture's max", fontName="Vera", fontSize=6.5))
    return d


def _columns(n: int) -> int:
    """Heatmap pictures per row: 3 for up to 3 findings, 4 for up to 8, then 5 (an image stays on one page)."""
    return 3 if n <= 3 else 4 if n <= 8 else 5


def _next_zones(f: Finding, count: int = 2) -> str:
    """The shares after the main one, zones and outside together, e.g. "left middle zone 11%, outside 9%"."""
    entries = [(r.zone, r.share) for r in f.regions] + [(OUTSIDE, outside_share(f.regions))]
    main = f.main_region
    rest = sorted((e for e in entries if main is None or e[0] != main.zone), key=lambda e: -e[1])
    return ", ".join(f"{OUTSIDE_TEXT if z == OUTSIDE else z} {v:.0%}" for z, v in rest[:count] if v >= 0.005)


def _heatmap_card(result: ImageResult, f: Finding, width: float, st: dict[str, ParagraphStyle]) -> list[object]:
    ov = overlay(result, f, max_side=480)
    img = PILImage.fromarray(ov.rgb)
    draw_peak(img, ov.peak)
    h, w = ov.rgb.shape[:2]
    side = width - 3 * mm
    pw, ph = (side, side * h / w) if w >= h else (side * w / h, side)
    cell: list[object] = [Image(_jpeg(img), width=pw, height=ph)]
    cell.append(_p(f"<b>{_e(f.name)}</b> — {_status(f)}, p {f.probability:.2f} (threshold {f.threshold:.2f})",
                   st["caption"]))
    cell.append(_p(f"<b>Most heat:</b> {_e(_region_text(f))}", st["caption"]))
    lines = []
    nxt = _next_zones(f)
    if nxt:
        lines.append(f"then {_e(nxt)}")
    if f.peak is not None:
        zone = result.lung_fields.zone_at(*f.peak)
        lines.append(f"peak: {_e(OUTSIDE_TEXT if zone == OUTSIDE else zone)}")
    lines.append(f"max heat {ov.vmax:.2f} logit")
    cell.append(_p(" · ".join(lines), st["caption"]))
    return cell


def _heatmap_grid(result: ImageResult, st: dict[str, ParagraphStyle]) -> list[object]:
    findings = result.positive
    cols = _columns(len(findings))
    width = 180 * mm / cols
    cells = [_heatmap_card(result, f, width, st) for f in findings]
    rows = [cells[i : i + cols] + [""] * (cols - len(cells[i : i + cols])) for i in range(0, len(cells), cols)]
    table = Table(rows, colWidths=[width] * cols)
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0),
                               ("RIGHTPADDING", (0, 0), (-1, -1), 3 * mm), ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
                               ("FONTNAME", (0, 0), (-1, -1), "Vera")]))
    return [_colour_legend(), table]


def _channels(rows: Sequence[ChannelEvidence]) -> str:
    return " · ".join(f"#{e.channel} {e.contribution:+.2f} ({_share(e.share)})" for e in rows) or "—"


def _share(value: float) -> str:
    return "0%" if value <= 0 else "<0.1%" if value < 0.001 else f"{value:.1%}"


def _evidence_table(result: ImageResult, st: dict[str, ParagraphStyle]) -> list[object]:
    """One row per present or excluded finding: the listed channels for it and against it (contribution in logit
    units, share of the finding's total evidence) and what part of the total they carry."""
    findings = [f for f in result.positive if f.evidence or f.counter_evidence]
    if not findings:
        return []
    rows: list[list[object]] = [["Finding", "Channels for it", "Counter-evidence (against it)", "Listed rows carry"]]
    incomplete = False
    for f in findings:
        carry = (f"{_share(f.shown_share)} (for) + {_share(f.counter_shown_share)} (against) of the total "
                 f"{f.evidence_total:.2f} logit")
        if f.share_for is not None:
            carry += f"; all channels: {f.share_for:.0%} for, {1 - f.share_for:.0%} against"
        incomplete |= not f.evidence_complete
        rows.append([_p(f"<b>{_e(f.name)}</b>", st["caption"]), _p(_channels(f.evidence), st["caption"]),
                     _p(_channels(f.counter_evidence) if f.counter_evidence else
                        "none among the strongest channels (the stored top channels by |contribution|)",
                        st["caption"]), _p(carry, st["caption"])])
    table = _grid(rows, [28 * mm, 62 * mm, 44 * mm, 46 * mm])
    table.setStyle(TableStyle([("FONTSIZE", (0, 0), (-1, 0), 7), ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    note = ("<b>Channel evidence</b>: #channel, its contribution to the finding's logit (logit units) and its share "
            "of the finding's total evidence = |contribution| / sum of |contribution| over all feature channels "
            "(the shares of all channels add up to 100%).")
    if incomplete:
        note += (" For a prediction stored before the total was recorded, the total is that of the stored top "
                 "channels only, so its shares are too large.")
    return [_p(note, st["small"]), table]


def _model_section(report: StudyReport, st: dict[str, ParagraphStyle]) -> list[object]:
    m = report.model
    calibrated = m.calibrated_at.isoformat() if m.calibrated_at else "never (default thresholds)"
    synthetic = "YES — not for diagnosis" if m.synthetic else "no"
    pairs = [
        ("Model", m.name, "Version", m.version),
        ("Calibrated", calibrated, "Synthetic model", synthetic),
        ("Report created", report.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"), "Revision", str(report.revision)),
    ]
    rows = [[_p(f"<b>{_e(a)}</b>", st["cell"]), _p(_e(b), st["cell"]), _p(f"<b>{_e(c)}</b>", st["cell"]),
             _p(_e(d), st["cell"])] for a, b, c, d in pairs]
    rows += [[_p(f"<b>{_e(a)}</b>", st["cell"]), _p(_e(b), st["cell"]), "", ""]
             for a, b in (("Weights sha256", m.weights_sha256 or "unknown"), ("Intended use", m.intended_use or "—"))]
    table = Table(rows, colWidths=[34 * mm, 61 * mm, 34 * mm, 51 * mm])
    table.setStyle(TableStyle([("FONTNAME", (0, 0), (-1, -1), "Vera"), ("BOX", (0, 0), (-1, -1), 0.5, colors.black),
                               ("SPAN", (1, -2), (-1, -2)), ("SPAN", (1, -1), (-1, -1)),
                               ("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1)]))
    notes = (
        "Heatmaps are class activation maps (ReLU, in logit units) of the final feature layer, upsampled to the "
        "image; images are shown bright = dense in radiological orientation (the patient's right on the image left). "
        "Zones come from lung fields estimated from the image (or a fixed grid where that failed, as stated per "
        "image); \"most heat\" is the zone, or the area outside the lung fields, holding the largest share of the "
        "finding's heat, with that share. Channel evidence: a listed channel's exact contribution to the finding's "
        "logit, and its share of the finding's total evidence (the sum of |contribution| over all feature channels); "
        "channels that push against the finding are listed apart as counter-evidence. A finding above its threshold "
        "is marked excluded when a finding it is strongly negatively associated with in NIH ChestX-ray14 is present "
        "with much higher confidence."
    )
    return [KeepTogether([_p("Model", st["h2"]), table, Spacer(1, 2 * mm), _p(_e(notes), st["small"])])]


class _Stamp:
    """A reportlab TimeStamp for a given UTC time: the PDF's CreationDate/ModDate."""

    def __init__(self, when: dt.datetime) -> None:
        when = when.astimezone(dt.UTC)
        self.t = when.timestamp()
        self.lt = when.timetuple()
        self.YMDhms = tuple(self.lt)[:6]
        self.dhh = self.dmm = 0
        self.tzname = "UTC"


def _canvas_maker(report: StudyReport) -> type[Canvas]:
    """A canvas that stamps the report's creation time into the PDF and draws the footer ("page N of M" needs the
    page count: pages are kept until the document is saved)."""
    m = report.model
    left_1 = AI_BANNER
    left_2 = (f"{m.name} {m.version}  ·  weights {(m.weights_sha256 or 'unknown')[:16]}  ·  revision "
              f"{report.revision} of {report.created_at:%Y-%m-%d %H:%M} UTC")

    class FooterCanvas(Canvas):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            self._doc._timeStamp = _Stamp(report.created_at)  # CreationDate/ModDate: when the report was made
            self._pages: list[dict[str, object]] = []

        def showPage(self) -> None:  # noqa: N802 (reportlab's name)
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                self.saveState()
                self.setFont("Vera", 7)
                self.setFillColor(_GREY)
                self.drawString(15 * mm, 10 * mm, left_1)
                self.drawRightString(195 * mm, 10 * mm, f"page {self._pageNumber} of {total}")
                self.drawString(15 * mm, 6.5 * mm, left_2)
                if m.synthetic:
                    self.setFillColor(_RED)
                    self.setFont("Vera-Bold", 7)
                    self.drawString(15 * mm, 287 * mm, SYNTHETIC_BANNER)
                self.restoreState()
                super().showPage()
            super().save()

    return FooterCanvas


def write_pdf(report: StudyReport, path: str | os.PathLike[str]) -> str:
    """Write the report to ``path`` (atomically: a temporary file renamed into place) and return its sha256 (hex).

    Raises OSError when the folder is not writable."""
    _register_fonts()
    st = _styles()
    target = Path(path)
    s = report.source
    story: list[object] = [_p("Chest radiograph — AI findings report", st["title"])]
    if report.model.synthetic:
        story += [_banner(SYNTHETIC_BANNER, "This model was trained only on synthetic phantom images. Its output "
                          "says nothing about a real patient.", st, _RED), Spacer(1, 2 * mm)]
    story += [_banner(AI_BANNER, "Produced automatically by chexd; not a diagnosis. Unverified until a qualified "
                      "reader confirms it.", st, _AMBER, dark_text=True), Spacer(1, 3 * mm)]
    supersedes = report.supersedes_text()
    if supersedes:
        story += [_p(f'<font color="#c0001a"><b>Revised report, revision {report.revision}</b></font> of '
                     f"{report.created_at:%Y-%m-%d %H:%M} UTC, supersedes {_e(supersedes)}", st["body"]),
                  Spacer(1, 2 * mm)]
    story += _header(report, st)
    labels = report.images[0].labels
    for n, result in enumerate(report.images, start=1):
        src = result.source
        modality, view = shown(src.modality, 16)[0], shown(src.view_position, 16)[0]
        title = f"Image {n} of {len(report.images)}: {modality or 'image'} {view}".strip()
        block: list[object] = [
            _p(_e(title), st["h2"]),
            _p(f"SOP Instance UID {_e(src.sop_instance_uid)} · {src.rows} × {src.columns} px · "
               f"{_e(shown(src.photometric_interpretation, 16)[0])} · zones: {_e(result.lung_fields.note)}",
               st["small"]),
            Spacer(1, 1.5 * mm),
        ]
        block += _domain_block(result, st)
        if not result.withheld:  # a withheld image: no findings table, no heatmaps (the block above says why)
            block.append(_findings_table(result, st))
            for f in (f for f in result.positive if f.status == "excluded"):
                block.append(_p(f"<b>{_e(f.name)} excluded</b> (p = {f.probability:.3f}): "
                                f"{_e(_named(f.reason or '', labels))}", st["small"]))
            if result.positive:
                block += [Spacer(1, 2 * mm), *_heatmap_grid(result, st), *_evidence_table(result, st)]
            else:
                block.append(_p("No finding at or above its threshold.", st["body"]))
        story.append(KeepTogether(block))  # an image block starts a page rather than splitting across two
    story += _model_section(report, st)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    doc = SimpleDocTemplate(
        str(tmp), pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=13 * mm, bottomMargin=15 * mm,
        title=f"AI findings report — study {s.study_instance_uid}", author="chexd",
        subject=f"{report.model.name} {report.model.version}, revision {report.revision}", creator="chexd",
        invariant=1, initialFontName="Vera",
    )
    doc.build(story, canvasmaker=_canvas_maker(report))
    data = tmp.read_bytes()
    tmp.replace(target)
    return hashlib.sha256(data).hexdigest()
