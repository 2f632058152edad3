"""The C-STORE / C-ECHO statuses chexd answers with, and the one place that says which refusal gets which
(PS3.4 B.2.3, PS3.7 C). A sender acts on the class: 0xA7xx (out of resources) means "try again later", nothing was
kept; 0xA9xx and 0xCxxx mean "this dataset will never be accepted", it was quarantined."""

from __future__ import annotations

import enum

from sqlalchemy.exc import SQLAlchemyError

from daemon.edge.intake import UnusableDatasetError
from daemon.store.spool import InvalidUIDError
from model.errors import ImageTooLargeError


class Status(enum.IntEnum):
    """C-STORE / C-ECHO response statuses used by chexd (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


def store_status(exc: BaseException) -> Status:
    """The C-STORE status for a refusal caused by ``exc``: unreadable or unusable data (bad UIDs, a dataset chexd
    cannot use, an image over the pixel limits) 0xC000; the disk or the database failing 0xA700; anything else (a
    bug) 0x0110."""
    if isinstance(exc, (InvalidUIDError, UnusableDatasetError, ImageTooLargeError)):
        return Status.CANNOT_UNDERSTAND
    if isinstance(exc, (OSError, SQLAlchemyError)):
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE
