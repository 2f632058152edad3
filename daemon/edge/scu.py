"""chexd's DICOM clients: C-ECHO and C-STORE (the ``echo`` and ``send`` commands)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from daemon.edge.tls import client_handshake_error
from daemon.errors import DaemonError

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255


class AssociationError(DaemonError, ConnectionError):
    """The peer could not be reached or refused the association."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SendResult:
    """Outcome for one file: ``status`` is the C-STORE status (None when nothing was sent) and ``error`` says why."""

    path: Path
    sop_instance_uid: str | None
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0x0000 or self.status >> 12 == 0xB)


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def _tls_args(tls: ssl.SSLContext | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args``: the context and the name the server's certificate must carry (``host``)."""
    return (tls, host.strip("[]")) if tls is not None else None


def _no_association(
    called_ae: str, host: str, port: int, tls: ssl.SSLContext | None, rejected: bool, timeout: float
) -> str:
    """Why no association came up; with TLS, a failed handshake names OpenSSL's reason."""
    name = f"{called_ae}@{host}:{port}"
    if tls is not None and not rejected:
        reason = client_handshake_error(tls, host, port, timeout=timeout)
        if reason is not None:
            return f"no association with {name}: TLS handshake failed: {reason}"
    return f"no association with {name} (rejected, aborted or unreachable)"


def echo(
    host: str,
    port: int,
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "CHEXD-SCU",
    timeout: float = 10,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Send one C-ECHO; return its status. ``tls``: a client context (``daemon.edge.tls.forward_context``), DICOM TLS.
    Raises AssociationError when no association is established (refused, unreachable, TLS handshake failed)."""
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=_tls_args(tls, host))
    if not assoc.is_established:
        raise AssociationError(_no_association(called_ae, host, port, tls, assoc.is_rejected, timeout))
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise AssociationError(f"no C-ECHO response from {called_ae}@{host}:{port}")
    return int(status.Status)


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly plus every file under named folders, sorted. Raises FileNotFoundError."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            for dirpath, _, names in os.walk(path):
                files.extend(Path(dirpath, n) for n in sorted(names))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(files)


def send(
    files: list[Path],
    host: str,
    port: int,
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "CHEXD-SCU",
    timeout: float = 30,
    on_result: Callable[[SendResult], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> list[SendResult]:
    """C-STORE each file's bytes as stored (no re-encoding). Files that are not DICOM get a SendResult with an error.
    ``tls``: a client context for DICOM TLS. Raises AssociationError when the peer refuses or cannot be reached."""
    results: list[SendResult] = []
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file's dataset bytes as stored instead of re-encoding

    def report(result: SendResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    headers: list[tuple[Path, str, str, str]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            headers.append(
                (path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID))
            )
        except Exception as exc:
            report(
                SendResult(path=path, sop_instance_uid=None, status=None, error=f"not a DICOM file: {exc}")
            )

    for batch in _batches(headers):
        ae = _ae(calling_ae, timeout)
        for sop_class, ts in dict.fromkeys((h[1], h[2]) for h in batch):
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=_tls_args(tls, host))
        if not assoc.is_established:
            raise AssociationError(_no_association(called_ae, host, port, tls, assoc.is_rejected, timeout))
        try:
            for path, _, _, uid in batch:
                try:
                    status = assoc.send_c_store(path)
                except Exception as exc:
                    report(SendResult(path=path, sop_instance_uid=uid, status=None, error=str(exc)))
                    continue
                if "Status" in status:
                    report(SendResult(path=path, sop_instance_uid=uid, status=int(status.Status)))
                else:
                    report(
                        SendResult(
                            path=path, sop_instance_uid=uid, status=None, error="no response (aborted?)"
                        )
                    )
                if not assoc.is_established:
                    raise AssociationError(f"association with {host}:{port} ended while sending {path}")
        finally:
            if assoc.is_established:
                assoc.release()
    return results


def _batches(headers: list[tuple[Path, str, str, str]]) -> Iterator[list[tuple[Path, str, str, str]]]:
    """Split files so each association needs at most MAX_CONTEXTS presentation contexts."""
    batch: list[tuple[Path, str, str, str]] = []
    contexts: set[tuple[str, str]] = set()
    for header in headers:
        key = (header[1], header[2])
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(header)
    if batch:
        yield batch
