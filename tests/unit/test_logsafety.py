"""daemon.logsafety: real highdicom, pydicom and reportlab warnings and errors carrying patient values pass the filter
with the keyword kept and the value gone; no record is dropped; a spawned process is filtered the same way."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from pydicom import config as pydicom_config

from daemon.logsafety import REDACTED, RedactingFilter, redact, redact_exception

NAME, DOCTOR, PATIENT_ID = "MUSTERMANN MAX", "Dr Who", "PHI-ID-123"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger writing into a buffer through RedactingFilter; warnings routed into logging."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            yield buffer
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_highdicom_person_name_warning_keeps_its_text_and_loses_the_name(captured: io.StringIO) -> None:
    from highdicom.valuerep import check_person_name

    check_person_name(NAME)
    check_person_name(DOCTOR)
    text = captured.getvalue()
    assert NAME not in text and "MUSTERMANN" not in text and DOCTOR not in text
    assert text.count(f'The string "{REDACTED}" is unlikely to represent the intended person name') == 2
    assert "UserWarning" in text, "the warning is logged, not silenced"


def test_pydicom_invalid_value_warnings_keep_the_vr_and_lose_the_value(captured: io.StringIO) -> None:
    ds = pydicom.Dataset()
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.WARN
    try:
        ds.PatientBirthDate = "MUSTERMANN"  # DA: "Invalid value for VR DA: 'MUSTERMANN'."
        ds.PatientAge = DOCTOR  # AS
        ds.PatientID = PATIENT_ID + "X" * 70  # LO: the length, never the value
    finally:
        pydicom_config.settings.writing_validation_mode = old
    text = captured.getvalue()
    assert "MUSTERMANN" not in text and "Who" not in text and PATIENT_ID not in text
    assert f"Invalid value for VR DA: {REDACTED}" in text and f"Invalid value for VR AS: {REDACTED}" in text
    assert "exceeds the maximum length of 64 allowed for VR LO" in text


def test_an_exception_text_is_redacted_in_a_traceback_and_as_an_argument(captured: io.StringIO) -> None:
    log = logging.getLogger("daemon.work.reports")
    value = NAME.split()[0]  # a variable: a traceback's source lines are code, never data
    try:
        pydicom.valuerep.DA(value)  # pydicom's error repeats the value
    except ValueError as exc:
        log.exception("report 7 failed")
        log.warning("job failed: %s", exc)
    text = captured.getvalue()
    assert "MUSTERMANN" not in text
    assert "report 7 failed" in text and "Traceback" in text and 'File "' in text, "the stack itself is kept"
    assert f"Unable to convert {REDACTED} to 'DA' object" in text


def test_reportlab_layout_error_naming_a_paragraph_is_redacted(tmp_path, captured: io.StringIO) -> None:  # type: ignore[no-untyped-def]
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Table
    from reportlab.platypus.doctemplate import LayoutError

    doc = SimpleDocTemplate(str(tmp_path / "x.pdf"))
    cell = Paragraph(" ".join([NAME] * 3000), ParagraphStyle("p"))
    with pytest.raises(LayoutError) as info:
        doc.build([Table([[Paragraph(NAME, ParagraphStyle("p")), cell]])])
    assert "MUSTERMANN" in str(info.value), "reportlab's own message repeats the text"
    logging.getLogger("daemon.work.reports").error("report failed", exc_info=(info.type, info.value, info.tb))
    assert "MUSTERMANN" not in captured.getvalue() and "LayoutError" in captured.getvalue()
    assert "MUSTERMANN" not in redact_exception((info.type, info.value, info.tb))


def test_own_messages_are_kept_and_uids_keywords_tags_survive(captured: io.StringIO) -> None:
    logging.getLogger("daemon.edge.scp").info("stored sop_instance_uid=%s", "1.2.840.10008.1.2.3")
    logging.getLogger("pydicom").warning(
        "Invalid 'PatientName' (0010,0010) '1.2.3.4' 'ISO_IR 192' 'str' 'PN' vs '%s'", DOCTOR
    )
    text = captured.getvalue()
    assert "stored sop_instance_uid=1.2.840.10008.1.2.3" in text
    assert "'PatientName' (0010,0010) '1.2.3.4' 'ISO_IR 192' 'str' 'PN'" in text and DOCTOR not in text


@pytest.mark.parametrize(
    ("message", "leak"),
    [
        ("it doesn't match 'O'Brien^Pat' value", "Brien"),  # a quote inside the value
        ('The string "A"B C" is unlikely to represent the intended person name', "B C"),
        ("value b'Doe\\'s' here", "Doe"),
        ('value of argument "patient_name" is potentially invalid: "Roe Richard"', "Roe"),
        ("The ValueError exception 'Invalid value for VR PN: Roe' occurred", "Roe"),
        ("evil\x1b[2J\r\n2026-01-01 INFO forged", "\x1b"),
    ],
)
def test_redact_handles_quotes_inside_values_and_control_characters(message: str, leak: str) -> None:
    out = redact(message)
    assert leak not in out
    assert redact(out) == out, "idempotent"


def test_no_record_is_dropped(captured: io.StringIO) -> None:
    flt = RedactingFilter()
    records = [logging.LogRecord(name, logging.WARNING, __file__, 1, "x %s", ("'a'",), None)
               for name in ("pydicom", "daemon.work.worker", "py.warnings", "anything")]
    assert all(flt.filter(r) for r in records)


def test_a_fresh_process_configured_by_install_filters_library_warnings() -> None:
    """As a spawned report worker: logsafety.install, then highdicom warns with a name."""
    code = (
        "from daemon import logsafety; logsafety.install('DEBUG');"
        "from highdicom.valuerep import check_person_name; check_person_name('MUSTERMANN MAX');"
        "import logging; logging.getLogger('pynetdicom').info('PDU dump');"
        "print(logging.getLogger('pynetdicom').getEffectiveLevel())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "MUSTERMANN" not in result.stderr and f'"{REDACTED}" is unlikely' in result.stderr
    assert "PDU dump" not in result.stderr and result.stdout.strip() == str(logging.WARNING)


def test_own_records_keep_their_template_and_uids_but_redact_quoted_values_in_arguments(
    captured: io.StringIO,
) -> None:
    reason = f"dataset cannot be parsed: Invalid value for VR PN: '{DOCTOR}'"
    logging.getLogger("daemon.edge.scp").warning("C-STORE refused status=0x%04X reason=%s uid=%s", 0xC000, reason,
                                            "1.2.3.4")
    text = captured.getvalue()
    assert DOCTOR not in text
    assert f"C-STORE refused status=0xC000 reason=dataset cannot be parsed: Invalid value for VR PN: {REDACTED}" in text
    assert "uid=1.2.3.4" in text
