"""The errors reporting raises."""

from __future__ import annotations

__all__ = ["ReportError"]


class ReportError(ValueError):
    """The base of reporting's errors: an input the documents cannot be made from (an image, prediction, model fact
    or argument that is missing, inconsistent or out of range). A ValueError, so callers that catch ValueError keep
    working."""
