"""False-positive images for the head-editing jobs: files, stored images by SOP Instance UID, and the stored images
radiologists marked absent for a finding (``chexd feedback UID --finding F --absent``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.maintenance.errors import MaintenanceError

if TYPE_CHECKING:
    import numpy as np

    from daemon.maintenance.parent import Parent
    from daemon.settings import Settings
    from model.features import FeatureSet

__all__ = ["correction_targets", "false_positive_images", "feedback_false_positives", "feedback_images"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
Image = tuple[str, "np.ndarray"]  # (id, decoded image [0, 1])


def _read_file(path: Path) -> np.ndarray:
    from model.errors import ModelError
    from model.preprocess import decode_file

    try:
        return decode_file(path)
    except ModelError as exc:
        raise MaintenanceError(str(exc)) from exc


def _read_uid(settings: Settings, uid: str) -> np.ndarray:
    from sqlalchemy import select

    from daemon.store.registry import registry_sessions
    from daemon.store.tables import Instance
    from daemon.work.worker import PermanentJobError, read_stored_image

    with registry_sessions(settings)() as session:
        rel = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == uid))
    if rel is None:
        raise MaintenanceError(f"no stored image with SOP Instance UID {uid} - give a UID the daemon received, or a "
                               "DICOM/PNG file path", usage=True)
    root = settings.spool_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise MaintenanceError(f"stored path of {uid} lies outside the spool ({rel!r})")
    try:
        return read_stored_image(path)[1]
    except PermanentJobError as exc:
        raise MaintenanceError(f"SOP Instance UID {uid}: {exc}") from exc


def false_positive_images(settings: Settings, refs: list[str]) -> list[Image]:
    """(id, decoded image [0, 1]) per reference: an existing file (DICOM, PNG, JPEG) or a stored SOP Instance UID.
    Raises MaintenanceError (usage for a reference that is neither, or an unknown UID)."""
    images = []
    for ref in refs:
        path = Path(ref).expanduser()
        if path.is_file():
            images.append((str(path), _read_file(path)))
        elif _UID.match(ref):
            images.append((ref, _read_uid(settings, ref)))
        else:
            raise MaintenanceError(f"--false-positive {ref!r} is neither a file nor a SOP Instance UID", usage=True)
    return images


def feedback_images(settings: Settings, finding: str) -> list[Image]:
    """(SOP Instance UID, decoded image) of every stored image whose newest radiologist verdict on ``finding`` is
    "absent". Raises MaintenanceError when one cannot be read."""
    from daemon.store.feedback import feedback_items
    from daemon.store.registry import registry_sessions
    from daemon.work.worker import PermanentJobError, read_stored_image

    images = []
    for item in feedback_items(registry_sessions(settings), settings.spool_dir.resolve()):
        if item.verdicts.get(finding) is False:
            try:
                images.append((item.sop_instance_uid, read_stored_image(item.path)[1]))
            except PermanentJobError as exc:
                raise MaintenanceError(f"feedback image {item.sop_instance_uid}: {exc}") from exc
    return images


def correction_targets(
    settings: Settings, refs: list[str], finding: str, *, from_feedback: bool
) -> tuple[list[Image], list[Image]]:
    """(given false positives, feedback images not among them) for ``chexd correct``. Raises MaintenanceError
    (usage when ``from_feedback`` finds nothing and no image was given)."""
    targets = false_positive_images(settings, refs)
    feedback = feedback_images(settings, finding) if from_feedback else []
    known = {ref for ref, _ in targets}
    feedback = [(uid, image) for uid, image in feedback if uid not in known]
    if from_feedback and not feedback and not targets:
        raise MaintenanceError(f"no stored image has an 'absent' verdict on {finding} ('chexd feedback UID --finding "
                               f"{finding} --absent' records one)", usage=True)
    return targets, feedback


def feedback_false_positives(
    settings: Settings, parent: Parent, *, device: str, batch_size: int
) -> tuple[dict[str, FeatureSet], int]:
    """``({finding: features of the stored images whose newest verdict on it is 'absent'}, images read)``: every
    image is decoded and run through the parent's backbone once. Raises MaintenanceError when a stored image cannot
    be read."""
    from daemon.store.feedback import feedback_items
    from daemon.store.registry import registry_sessions
    from daemon.work.worker import PermanentJobError, read_stored_image
    from model.features import compute_features
    from model.types import LABELS

    items = [
        i
        for i in feedback_items(registry_sessions(settings), settings.spool_dir.resolve())
        if any(v is False for v in i.verdicts.values())
    ]
    if not items:
        return {}, 0
    images = []
    for item in items:
        try:
            images.append((item.sop_instance_uid, None, read_stored_image(item.path)[1], [0] * len(LABELS)))
        except PermanentJobError as exc:
            raise MaintenanceError(f"feedback image {item.sop_instance_uid}: {exc}") from exc
    features = compute_features(
        parent.network,
        images,
        recipe=parent.manifest.preprocessing,
        device=device,
        batch_size=batch_size,
        source="radiologist feedback",
    )
    parent.network.cpu()
    out = {}
    for finding in parent.manifest.labels:
        index = [k for k, item in enumerate(items) if item.verdicts.get(finding) is False]
        if index:
            out[finding] = features.subset(index)
    return out, len(items)
