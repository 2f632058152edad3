"""Logs without patient data: every log record and library warning passes a filter that drops values, keeps keywords.

Libraries copy attribute values into their messages: highdicom warns ``The string "MUSTERMANN MAX" is unlikely to
represent the intended person name``, pydicom ``Invalid value for VR PN: 'Dr Who'.``, and exception texts (reportlab's
LayoutError, pydicom's ValueError) repeat what they choked on. :class:`RedactingFilter` rewrites such text before any
handler writes it:

- a quoted string (``"..."``, ``'...'``, ``b'...'``) becomes ``"<redacted>"`` unless it is a DICOM keyword, a tag, a
  UID, a VR, a character set name, a number or a Python type name (things that say *which* attribute, never *what*);
- known library templates whose value is not (reliably) quoted are cut at the value;
- control characters are escaped, so a value can never forge a log line.

Records of chexd's own loggers (``daemon``, ``model``, ``reporting``) keep their message template (they log UIDs,
never names), but their string and exception arguments (a reason built from a library's exception: ``"C-STORE refused
reason=%s"``) and every traceback's exception text are redacted the same way. Records of
every other logger (pydicom, highdicom, pynetdicom, reportlab, ``py.warnings`` …) are redacted in full.

Warnings are not silenced (DESIGN rule 11): :func:`install` routes them into logging (``py.warnings``), where the
filter applies. pynetdicom, highdicom and PIL stay at WARNING even when chexd logs at DEBUG (pynetdicom's DEBUG
output dumps A-ASSOCIATE PDUs and, for query/retrieve, identifiers); pynetdicom's ``LOG_REQUEST_IDENTIFIERS`` and
``LOG_RESPONSE_IDENTIFIERS`` are switched off too.
"""

from __future__ import annotations

import builtins
import logging
import re
import traceback
from functools import cache
from types import TracebackType

__all__ = ["REDACTED", "RedactingFilter", "install", "redact", "redact_exception"]

REDACTED = "<redacted>"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = ("daemon", "model", "reporting", "migrations", "__main__")
QUIET_LIBRARIES = ("pynetdicom", "highdicom", "PIL")

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

# Library templates whose value runs to a fixed phrase (a value may itself contain quotes): cut it there.
_TEMPLATES = [
    # highdicom.valuerep.check_person_name
    re.compile(r'(The string ")(.*?)(" is unlikely to represent the intended person name)', re.S),
    # highdicom.base.SOPClass: value of argument "patient_name" is potentially invalid: "..."
    re.compile(r'(is potentially invalid: )(.*)()$', re.S),
    # pydicom.valuerep.validate_regex: Invalid value for VR PN: 'x'.
    re.compile(r"(Invalid value for VR \w\w: )(.*?)(\.?)$", re.M),
    # pydicom DS / IS: Value "x" is not valid for elements with a VR of DS
    re.compile(r'(Value ")(.*?)(" is not valid for elements with a VR of)', re.S),
    # pydicom DA / DT / TM: Unable to convert (non-conformant value) 'x' to 'DA' object
    re.compile(r"(Unable to convert (?:non-conformant value )?)(.*?)( to '\w\w' object)", re.S),
    # pydicom: The ValueError exception 'x' occurred ...
    re.compile(r"(The \w+ exception )(.*?)( occurred)", re.S),
    # pydicom.dataset.from_json: Error while processing tag X: <exception text>
    re.compile(r"(Error while processing tag \w+: )(.*)()$", re.S),
]
# A quote inside a value stays part of it when a letter follows ('O'Brien'); an apostrophe after a letter
# (doesn't) never opens one.
_QUOTED = re.compile(r"""(?<![\w"'])([bBrRuUfF]{0,2})(["'])((?:\\.|(?!\2(?!\w)).)*)\2(?!\w)""", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# text that no rule can change (no quote, control character or unquoted-value template): returned as it is
_SUSPECT = re.compile(rf"[\"']|{_CONTROL.pattern}|potentially invalid|Error while processing")
_TAG = re.compile(r"^\(?[0-9A-Fa-f]{4},\s?[0-9A-Fa-f]{4}\)?$|^0x[0-9A-Fa-f]{8}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
_NUMBER = re.compile(r"^[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$")
_VR = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


@cache
def _safe_words() -> frozenset[str]:
    """Quoted words that name an attribute, an encoding or a type - never a patient's value."""
    from pydicom.charset import python_encoding
    from pydicom.datadict import keyword_dict

    types = {name for name, obj in vars(builtins).items() if isinstance(obj, type)}
    return frozenset(keyword_dict) | frozenset(python_encoding) | frozenset(python_encoding.values()) | types


def _is_safe(body: str) -> bool:
    text = body.strip()
    return bool(text) and (
        text in _safe_words() or text in _VR or bool(_TAG.match(text) or _UID.match(text) or _NUMBER.match(text))
    )


def _quoted(match: re.Match[str]) -> str:
    prefix, quote, body = match.group(1), match.group(2), match.group(3)
    return match.group(0) if _is_safe(body) else f"{prefix}{quote}{REDACTED}{quote}"


def _escape_control(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        text)


def redact(text: str) -> str:
    """``text`` with attribute values replaced by ``<redacted>`` (keywords, tags, UIDs and VRs kept) and control
    characters escaped (``\\x1b``). Idempotent."""
    if not _SUSPECT.search(text):  # the common case (a UID, a count): nothing quoted, nothing to escape
        return text
    for template in _TEMPLATES:
        text = template.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(3)}", text)
    return _escape_control(_QUOTED.sub(_quoted, text))


def redact_exception(exc_info: _ExcInfo) -> str:
    """A traceback with each exception's text redacted; the stack (file, line, source) is kept as is."""
    parts = []
    for chunk in traceback.TracebackException(*exc_info).format():
        keep = chunk.startswith((" ", "Traceback (most recent", "\nThe above exception", "\nDuring handling"))
        parts.append(chunk if keep else redact(chunk))
    return "".join(parts).rstrip("\n")


class RedactingFilter(logging.Filter):
    """Rewrites a record in place so that no handler can write a patient's value (see the module docstring);
    never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_chexd_redacted", False):
            return True
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        if own:
            if isinstance(record.args, tuple) and any(isinstance(a, str | BaseException) for a in record.args):
                record.args = tuple(redact(str(a)) if isinstance(a, str | BaseException) else a for a in record.args)
        else:
            try:
                message = record.getMessage()
            except Exception:  # a library's bad format string: never let logging raise into the caller
                message = f"{record.msg} {record.args}"
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact_exception(record.exc_info)  # type: ignore[arg-type]
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        record._chexd_redacted = True
        return True


def install(level: str | int = "INFO", *, fmt: str = LOG_FORMAT) -> None:
    """Configure the root logger (stderr, ``fmt``) once per process, put :class:`RedactingFilter` on every root
    handler, route ``warnings`` into logging and keep pynetdicom at WARNING or above. Used by ``chexd serve`` and by
    the report worker processes (which are spawned, so they inherit nothing)."""
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=fmt)
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO and dumps PDUs/identifiers at DEBUG, highdicom each module it copies (20 lines
    # a document), PIL each PNG chunk: keep their warnings and errors only.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
