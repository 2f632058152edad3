"""The version rule: which manifest version a job's child artifact gets."""

from __future__ import annotations

import re

__all__ = ["MAJOR_OPERATIONS", "child_version"]

# operations that change the network's architecture (not only its head or thresholds): a new MINOR version
MAJOR_OPERATIONS = frozenset({"compress"})
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:[-+][0-9A-Za-z.+-]+)?$")


def child_version(parent_version: str, operation: str) -> str:
    """The manifest version of an artifact derived from ``parent_version`` by ``operation``; always a new one.

    An operation in :data:`MAJOR_OPERATIONS` (one that changes the architecture, e.g. ``compress``) bumps MINOR and
    resets PATCH ('1.2.3' -> '1.3.0'); every other (thresholds, head weights, composed head/threshold steps) bumps
    PATCH ('1.2.3' -> '1.2.4'). A pre-release or build suffix of the parent is dropped ('1.2.3-rc1' -> '1.2.4').
    The registry tells two children of one parent apart by their ``version_id`` (a content hash), not by this string.
    Raises ValueError for a version that is not MAJOR.MINOR.PATCH or an empty operation."""
    match = _SEMVER.match(parent_version) if isinstance(parent_version, str) else None
    if match is None:
        raise ValueError(f"Invalid parent_version {parent_version!r} - expected MAJOR.MINOR.PATCH, e.g. '1.0.0'")
    if not isinstance(operation, str) or not operation:
        raise ValueError(f"Invalid operation {operation!r} - expected a non-empty name such as 'calibrate'")
    major, minor, patch = (int(part) for part in match.groups())
    if operation in MAJOR_OPERATIONS:
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"
