"""The PDF report of one study revision (reportlab): header, banners, findings, heatmaps, evidence, exclusions, model.

Text is set in Bitstream Vera (bundled with reportlab), embedded as TrueType subsets, so it is extractable
(``pdftotext``) and renders identically everywhere. Output is byte-for-byte reproducible for the same report
(reportlab's invariant mode; the report's own creation time is printed in the text).
"""

from __future__ import annotations

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
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from reporting.regions import outside_share
from reporting.render import FONT_DIR, colormap, draw_peak, overlay
from reporting.report import DOMAIN_HEADLINE, FLAG_HEADLINE, Finding, ImageResult, StudyReport

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
    if not f.regions:
        return "—" if f.positive else ""
    return f"{f.regions[0].zone} ({f.regions[0].share:.0%})"


def _findings_table(result: ImageResult, st: dict[str, ParagraphStyle]) -> Table:
    order = list(result.positive) + [f for f in result.findings if not f.positive]
    rows: list[list[object]] = [["Finding", "Probability", "Threshold", "Status", "Main region (share of heat)"]]
    for f in order:
        rows.append([
            _p(f"<b>{_e(f.label)}</b>" if f.positive else _e(f.label), st["cell"]),
            f"{f.probability:.3f}", f"{f.threshold:.3f}", _p(_status(f), st["cell"]), _p(_region_text(f), st["cell"]),
        ])
    table = _grid(rows, [42 * mm, 22 * mm, 20 * mm, 22 * mm, 74 * mm])
    table.setStyle(TableStyle([("ALIGN", (1, 0), (2, -1), "RIGHT")]))
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


def _colour_bar(vmax: float, height: float) -> Drawing:
    """A vertical colour bar with its scale in logit units (vector graphics, text extractable)."""
    d = Drawing(40 * mm, height)
    d.initialFontName = "Vera"  # the renderer's initial font would otherwise add an unembedded Helvetica
    bar_w, steps, y0, bar_h = 4 * mm, 64, 4, height - 19
    lut = colormap(np.linspace(0.0, 1.0, steps))
    for i in range(steps):
        r, g, b = (int(c) / 255 for c in lut[i])
        d.add(Rect(0, y0 + bar_h * i / steps, bar_w, bar_h / steps + 0.3, fillColor=colors.Color(r, g, b),
                   strokeColor=None))
    d.add(Rect(0, y0, bar_w, bar_h, fillColor=None, strokeColor=colors.black, strokeWidth=0.4))
    for frac in (0.0, 0.5, 1.0):
        d.add(String(bar_w + 2, y0 + bar_h * frac - 2.2, f"{vmax * frac:.2f}", fontName="Vera", fontSize=6.5))
    d.add(String(0, height - 7, "heat (logit units)", fontName="Vera", fontSize=6.5))
    return d


def _heatmap_block(result: ImageResult, f: Finding, st: dict[str, ParagraphStyle]) -> KeepTogether:
    ov = overlay(result, f, max_side=640)
    img = PILImage.fromarray(ov.rgb)
    draw_peak(img, ov.peak)
    h, w = ov.rgb.shape[:2]
    side_mm = 80.0
    width = side_mm * mm if w >= h else side_mm * mm * w / h
    height = width * h / w
    picture = Image(_jpeg(img), width=width, height=height)
    title = f"{_e(f.label)} — {_status(f)}, probability {f.probability:.3f} (threshold {f.threshold:.3f})"
    parts: list[object] = [_p(title, st["h3"])]
    if f.status == "excluded" and f.reason:
        parts.append(_p(f"<i>Excluded: {_e(f.reason)}</i>", st["body"]))
    side: list[object] = [_colour_bar(ov.vmax, 32 * mm)]
    shares = ", ".join(f"{r.zone} {r.share:.0%}" for r in f.regions[:5])
    if f.regions:
        shares += f", outside lungs {outside_share(f.regions):.0%}"
    side.append(_p(f"<b>Heat by zone:</b> {_e(shares) if shares else 'no positive heat'}", st["small"]))
    if f.peak is not None:
        side.append(_p(f"<b>Peak</b> (+): row {f.peak[0]}, column {f.peak[1]}, "
                       f"{_e(result.lung_fields.zone_at(*f.peak))}", st["small"]))
    if f.evidence:
        rows: list[list[object]] = [["#", "Channel", "Contribution", "Share"]]
        for i, e in enumerate(f.evidence, start=1):
            rows.append([str(i), str(e.channel), f"{e.contribution:+.3f}", f"{e.share:+.1%}"])
        table = _grid(rows, [7 * mm, 16 * mm, 24 * mm, 18 * mm])
        table.setStyle(TableStyle([("ALIGN", (0, 0), (-1, -1), "RIGHT"), ("FONTSIZE", (0, 0), (-1, -1), 7)]))
        side += [Spacer(1, 1.5 * mm), _p("<b>Channel evidence</b> (logit units; share of the channel sum)",
                                          st["small"]), table]
    layout = Table([[picture, side]], colWidths=[width + 4 * mm, 180 * mm - width - 4 * mm])
    layout.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0),
                                ("FONTNAME", (0, 0), (-1, -1), "Vera")]))
    parts += [layout, Spacer(1, 3 * mm)]
    return KeepTogether(parts)


def _model_section(report: StudyReport, st: dict[str, ParagraphStyle]) -> list[object]:
    m = report.model
    calibrated = m.calibrated_at.isoformat() if m.calibrated_at else "never (default thresholds)"
    rows = [
        ["Model", m.name], ["Version", m.version], ["Weights sha256", m.weights_sha256 or "unknown"],
        ["Threshold calibration", calibrated], ["Synthetic demo model", "YES — not for diagnosis" if m.synthetic
                                                 else "no"],
        ["Intended use", m.intended_use or "—"],
        ["Report created", report.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")], ["Revision", str(report.revision)],
    ]
    table = Table([[_p(f"<b>{_e(a)}</b>", st["cell"]), _p(_e(b), st["cell"])] for a, b in rows],
                  colWidths=[40 * mm, 140 * mm])
    table.setStyle(TableStyle([("FONTNAME", (0, 0), (-1, -1), "Vera"), ("BOX", (0, 0), (-1, -1), 0.5, colors.black),
                               ("TOPPADDING", (0, 0), (-1, -1), 1),
                               ("BOTTOMPADDING", (0, 0), (-1, -1), 1)]))
    notes = (
        "Heatmaps are class activation maps (ReLU, in logit units) of the final feature layer, upsampled to the "
        "image; images are shown bright = dense in radiological orientation (the patient's right on the image left). "
        "Zones come from lung fields estimated from the image (or a fixed grid where that failed, as stated per "
        "image). Channel evidence: each listed channel's exact contribution to the finding's logit and its share of "
        "the sum of all channel contributions (logit minus bias). A finding above its threshold is marked excluded "
        "when a finding it is strongly negatively associated with in NIH ChestX-ray14 is present with much higher "
        "confidence."
    )
    return [_p("Model", st["h2"]), table, Spacer(1, 2 * mm), _p(_e(notes), st["small"])]


def _page(report: StudyReport):  # type: ignore[no-untyped-def]
    m = report.model

    def draw(canvas, doc) -> None:  # type: ignore[no-untyped-def]
        canvas.saveState()
        canvas.setFont("Vera", 7)
        canvas.setFillColor(_GREY)
        canvas.drawString(15 * mm, 10 * mm, f"{AI_BANNER}  ·  {m.name} {m.version}  ·  weights "
                                            f"{(m.weights_sha256 or 'unknown')[:16]}  ·  revision {report.revision}")
        canvas.drawRightString(195 * mm, 10 * mm, f"page {doc.page}")
        if m.synthetic:
            canvas.setFillColor(_RED)
            canvas.setFont("Vera-Bold", 7)
            canvas.drawString(15 * mm, 287 * mm, SYNTHETIC_BANNER)
        canvas.restoreState()

    return draw


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
    if report.revision > 1:
        supersedes = ", ".join(report.predecessors) if report.predecessors else "the previous revision"
        story += [_p(f'<font color="#c0001a"><b>Revised report, revision {report.revision}</b></font>, supersedes '
                     f"{_e(supersedes)}", st["body"]), Spacer(1, 2 * mm)]
    story += _header(report, st)
    for n, result in enumerate(report.images, start=1):
        src = result.source
        modality, view = shown(src.modality, 16)[0], shown(src.view_position, 16)[0]
        title = f"Image {n} of {len(report.images)}: {modality or 'image'} {view}".strip()
        story += [_p(_e(title), st["h2"]),
                  _p(f"SOP Instance UID {_e(src.sop_instance_uid)} · {src.rows} × {src.columns} px · "
                     f"{_e(shown(src.photometric_interpretation, 16)[0])} · zones: {_e(result.lung_fields.note)}",
                     st["small"]),
                  Spacer(1, 1.5 * mm)]
        story += _domain_block(result, st)
        if result.withheld:
            continue  # no findings table, no heatmaps: the block above says why
        story.append(_findings_table(result, st))
        excluded = [f for f in result.findings if f.status == "excluded"]
        if excluded:
            story.append(_p("Excluded findings", st["h3"]))
            story += [_p(f"<b>{_e(f.label)}</b> (p = {f.probability:.3f}): {_e(f.reason)}", st["body"])
                      for f in excluded]
        if not result.positive:
            story.append(_p("No finding at or above its threshold.", st["body"]))
        story += [_heatmap_block(result, f, st) for f in result.positive]
    story += _model_section(report, st)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    doc = SimpleDocTemplate(
        str(tmp), pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=14 * mm, bottomMargin=16 * mm,
        title=f"AI findings report — study {s.study_instance_uid}", author="chexd",
        subject=f"{report.model.name} {report.model.version}, revision {report.revision}", creator="chexd",
        invariant=1, initialFontName="Vera",
    )
    on_page = _page(report)
    doc.build(story, onFirstPage=on_page, onLaterPages=on_page)
    data = tmp.read_bytes()
    tmp.replace(target)
    return hashlib.sha256(data).hexdigest()
