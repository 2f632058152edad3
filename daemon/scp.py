"""The DICOM Storage SCP (pynetdicom): C-ECHO, C-STORE and association access control.

The C-STORE handler is total and fast (DESIGN "fast, total C-STORE handler"): it validates, stores durably,
enqueues a job and returns a named status; every exception maps to a status; no decoding of pixels, no inference.
Statuses follow PS3.4 Annex B.2.3 and PS3.7 C.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from daemon.intake import UnusableDatasetError, inspect
from daemon.settings import Settings
from daemon.spool import InvalidUIDError, validate_uid
from daemon.store import InstanceStore, StoreOutcome, audit

log = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """C-STORE / C-ECHO response statuses used by chexd (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


STORAGE_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    # Accepted so a PACS routing rule that also sends other images gets a clean success; the input gate skips them.
    CTImageStorage,
    MRImageStorage,
)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4)
_REJECTED_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03
_CALLED_AE_NOT_RECOGNISED = 0x07


def _parse_allow_list(
    entries: tuple[str, ...],
) -> list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network | None]]:
    rules = []
    for entry in entries:
        ae, _, address = entry.partition("@")
        rules.append((ae.strip(), ipaddress.ip_network(address.strip(), strict=False) if address else None))
    return rules


class StorageSCP:
    """Owns the pynetdicom AE and its server thread. ``on_stored`` is called after each new instance commits."""

    def __init__(
        self, settings: Settings, store: InstanceStore, on_stored: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_stored = on_stored
        self._allow = _parse_allow_list(settings.allowed_calling_aes)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_associations = settings.max_associations
        self.ae.acse_timeout = settings.acse_timeout
        self.ae.dimse_timeout = settings.dimse_timeout
        self.ae.network_timeout = settings.network_timeout
        # Senders fill PDUs up to this size; pynetdicom's per-PDU cost dominates receiving large images at 16 KiB.
        self.ae.maximum_pdu_size = settings.max_pdu_size
        self.ae.require_called_aet = False  # checked in _on_requested so the rejection can be audited
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        from daemon.tls import scp_context  # DICOM TLS when tls_cert/tls_key are set (None: plain TCP)

        self.server = self.ae.start_server(
            (self.settings.bind_address, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=scp_context(self.settings),
        )
        log.info("storage SCP listening ae_title=%s port=%s", self.settings.ae_title, self.settings.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("SCP is not running")
        return int(self.server.server_address[1])

    # --- association control -------------------------------------------------------------------------------------

    def _admit(self, calling_ae: str, called_ae: str, address: str) -> tuple[int, str] | None:
        """None to accept, else (diagnostic, reason) for an A-ASSOCIATE-RJ."""
        if self.settings.require_called_ae and called_ae != self.settings.ae_title:
            return _CALLED_AE_NOT_RECOGNISED, f"called AE {called_ae!r} is not {self.settings.ae_title!r}"
        if not self._allow:
            return None
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            peer = None
        for ae, network in self._allow:
            if ae == calling_ae and (network is None or (peer is not None and peer in network)):
                return None
        return (
            _CALLING_AE_NOT_RECOGNISED,
            f"calling AE {calling_ae!r} from {address} is not in the allow-list",
        )

    def _on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling = (requestor.primitive.calling_ae_title or "").strip()
        called = (requestor.primitive.called_ae_title or "").strip()
        address = str(requestor.address)
        refusal = self._admit(calling, called, address)
        if refusal is None:
            return
        diagnostic, reason = refusal
        log.warning("association rejected: %s", reason)
        audit(
            self.store.sessions,
            "association_rejected",
            calling_ae=calling[:16],
            called_ae=called[:16],
            peer_address=address,
            detail=reason,
        )
        event.assoc.acse.send_reject(_REJECTED_PERMANENT, _SOURCE_SERVICE_USER, diagnostic)

    def _on_rejected(self, event: evt.Event) -> None:
        # Only pynetdicom's own rejections arrive here (ours in _on_requested are audited there).
        active = sum(1 for a in self.ae.active_associations if a.is_acceptor)
        reason = (
            f"association limit {self.ae.maximum_associations} reached"
            if active > self.ae.maximum_associations
            else "rejected during association negotiation"
        )
        requestor = event.assoc.requestor
        log.warning("association rejected: %s", reason)
        audit(
            self.store.sessions,
            "association_rejected",
            calling_ae=(requestor.ae_title or "").strip()[:16],
            peer_address=str(requestor.address),
            detail=reason,
        )

    # --- services ------------------------------------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return Status.SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        try:
            return self._store(event)
        except Exception:
            log.exception("unexpected error in C-STORE handler")
            return Status.PROCESSING_FAILURE

    def _store(self, event: evt.Event) -> int:
        request = event.request
        calling_ae = (event.assoc.requestor.ae_title or "").strip()[:16] or None
        # The file is the received dataset bytes unchanged behind a Part 10 header (as event.encoded_dataset()
        # builds it), written from pynetdicom's buffer without copying 8 MB images twice.
        header = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
        with request.DataSet.getbuffer() as dataset_bytes:
            return self._store_payload(event, calling_ae, [header, dataset_bytes])

    def _store_payload(self, event: evt.Event, calling_ae: str | None, data: list[bytes | memoryview]) -> int:
        request = event.request

        def reject(status: Status, reason: str, uid: str | None = None) -> int:
            path = self.store.spool.quarantine_bytes(data, f"0x{status:04X} {reason}")
            log.warning("C-STORE refused status=0x%04X reason=%s quarantined=%s", status, reason, path.name)
            audit(
                self.store.sessions,
                "instance_quarantined",
                calling_ae=calling_ae,
                sop_instance_uid=uid,
                detail=f"0x{status:04X} {reason}; kept as {path.name}",
            )
            return status

        try:
            requested_class = validate_uid(request.AffectedSOPClassUID, "Affected SOP Class UID")
            requested_uid = validate_uid(request.AffectedSOPInstanceUID, "Affected SOP Instance UID")
        except InvalidUIDError as exc:
            return reject(Status.CANNOT_UNDERSTAND, str(exc))

        try:
            ds = _parse_fully(event)
        except Exception as exc:
            return reject(Status.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}", requested_uid)

        missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
        if missing:
            return reject(
                Status.CANNOT_UNDERSTAND, f"dataset has no {' or '.join(missing)} - not a DICOM image", requested_uid
            )
        if (
            str(ds.get("SOPClassUID", "")) != requested_class
            or str(ds.get("SOPInstanceUID", "")) != requested_uid
        ):
            return reject(
                Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP Class/Instance UID ({ds.get('SOPClassUID')}, {str(ds.get('SOPInstanceUID'))[:64]}) "
                f"differ from the request ({requested_class}, {requested_uid})",
                requested_uid,
            )

        try:
            meta = inspect(ds, event.context.transfer_syntax)
        except (InvalidUIDError, UnusableDatasetError) as exc:
            return reject(Status.CANNOT_UNDERSTAND, str(exc), requested_uid)

        try:
            outcome = self.store.save(meta, data, calling_ae, after_commit=self.on_stored)
        except OSError as exc:
            log.error("C-STORE out of resources (disk) sop_instance_uid=%s: %s", requested_uid, exc)
            return Status.OUT_OF_RESOURCES
        except SQLAlchemyError as exc:
            log.error("C-STORE out of resources (database) sop_instance_uid=%s: %s", requested_uid, exc)
            return Status.OUT_OF_RESOURCES
        if outcome is StoreOutcome.DUPLICATE:
            log.info("duplicate instance acknowledged sop_instance_uid=%s", requested_uid)
        return Status.SUCCESS


def _parse_fully(event: evt.Event) -> Dataset:
    """Decode the received dataset and touch every element so truncation or garbage fails here, not later."""
    ds = event.dataset
    for elem in ds.iterall():
        _ = elem.value
    ds.file_meta = event.file_meta
    return ds


def make_scu_ae(ae_title: str) -> Any:
    """An AE for chexd's own clients (echo, send)."""
    return AE(ae_title=ae_title)
