"""Instance metadata as the edge hands it to the store (daemon.edge.intake.InstanceMeta), for store, worker and disk
tests that file instances without DICOM parsing."""

from __future__ import annotations

from daemon.edge.intake import InstanceMeta

ROOT = "1.2.826.0.1.3680043.10.9999"


def make_meta(n: int = 1, *, series: int = 1, skip_reason: str | None = None) -> InstanceMeta:
    """Instance ``n`` of series ``series`` in study ``ROOT.1`` (a chest DX; ``skip_reason`` as intake would set it)."""
    return InstanceMeta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        sop_instance_uid=f"{ROOT}.1.{series}.{n}",
        study_instance_uid=f"{ROOT}.1",
        series_instance_uid=f"{ROOT}.1.{series}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="DX",
        body_part="CHEST",
        view_position="PA",
        study_date="20240101",
        skip_reason=skip_reason,
    )


def rel_of(meta: InstanceMeta) -> str:
    """The spool path (relative) of an instance: study/series/instance.dcm."""
    return f"{meta.study_instance_uid}/{meta.series_instance_uid}/{meta.sop_instance_uid}.dcm"
