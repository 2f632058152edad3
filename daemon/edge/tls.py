"""DICOM TLS: the SSL contexts of the Storage SCP and of forwarding (PS3.15 B.9, the BCP 195 TLS profile).

Profile (RFC 9325 / BCP 195 as DICOM PS3.15 B.9 adopts it): TLS 1.2 or 1.3 only; TLS 1.2 cipher suites with
forward secrecy and an AEAD cipher only (ECDHE or DHE key exchange with AES-GCM or ChaCha20-Poly1305): no RSA key
exchange, no CBC, no SHA-1 MAC, no NULL, EXPORT, RC4, 3DES, anonymous or PSK suites; TLS 1.3 suites are all AEAD.
OpenSSL's security level 2 refuses keys and DH groups under 2048 bits (ECC under 224). No TLS compression, no
renegotiation.

The SCP context (:func:`server_context`) verifies client certificates against ``tls_ca`` per
:class:`ClientCertMode`; the forwarding context (:func:`client_context`) verifies the destination's certificate
against ``tls_ca`` (or the system trust store) and presents ``tls_cert``/``tls_key`` when the server asks.

The SCP's handshake runs in the network edge (``daemon.edge.server``): non-blocking, under the A-ASSOCIATE-RQ deadline,
never in pynetdicom's accept loop (pynetdicom 3.0.4 handshakes there, blocking: one silent TCP connection to a TLS
port stops every association). A failed handshake is logged once with the peer address and OpenSSL's reason
(:func:`describe_tls_error`; never certificate subjects: they can name a person) and the edge keeps serving.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.errors import DaemonError

if TYPE_CHECKING:
    from daemon.settings import Settings

__all__ = [
    "BCP195_CIPHERS",
    "ClientCertMode",
    "TLSFileError",
    "TLSPaths",
    "check_files",
    "client_context",
    "client_handshake_error",
    "describe_tls_error",
    "forward_context",
    "peer_closed_silently",
    "scp_context",
    "server_context",
]

#: TLS 1.2 suites (OpenSSL names): forward-secret key exchange with an AEAD cipher only. TLS 1.3 suites are set
#: separately by OpenSSL and are all AEAD with ephemeral key exchange.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS:@SECLEVEL=2"
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class ClientCertMode(enum.StrEnum):
    """What the SCP asks of a client certificate (``tls_client_cert``).

    ``none``: not requested. ``optional``: requested and verified against ``tls_ca`` when sent; a client without one
    is admitted. ``required``: a client without a certificate signed by ``tls_ca`` is refused in the handshake."""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


class TLSFileError(DaemonError, ValueError):
    """A TLS file setting is unusable; the message names the setting, the value and the rule."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TLSPaths:
    """PEM files: ``cert`` + ``key`` this node's certificate (chain) and private key, ``ca`` the bundle that peers'
    certificates must chain to. ``None``: not configured."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TLSPaths:
        def path(value: str) -> Path | None:
            return Path(value).expanduser() if value else None

        return cls(cert=path(settings.tls_cert), key=path(settings.tls_key), ca=path(settings.tls_ca))


def _file_reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _refuse_password() -> bytes:
    raise TLSFileError("encrypted")


def _readable(setting: str, path: Path) -> None:
    if not path.is_file():
        raise TLSFileError(f"Invalid {setting} {str(path)!r} - file not found (expected a PEM file)")
    if not os.access(path, os.R_OK):
        raise TLSFileError(f"Invalid {setting} {str(path)!r} - file is not readable by this user")


def check_files(paths: TLSPaths) -> None:
    """Check that the files exist, parse as PEM and that the key belongs to the certificate.

    Raises TLSFileError naming the setting (``tls_cert``, ``tls_key``, ``tls_ca``), the path and the rule: cert
    without key (or the reverse), missing or unreadable file, no PEM certificate in it, an encrypted key (chexd runs
    unattended and has no passphrase to give: protect the key with file permissions), a key that does not match
    the certificate."""
    if (paths.cert is None) != (paths.key is None):
        have, missing = ("tls_cert", "tls_key") if paths.cert is not None else ("tls_key", "tls_cert")
        value = paths.cert if paths.cert is not None else paths.key
        raise TLSFileError(
            f"Invalid {have} {str(value)!r} without {missing} - set both (the SCP then speaks TLS) or neither"
        )
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if paths.ca is not None:
        _readable("tls_ca", paths.ca)
        try:
            probe.load_verify_locations(cafile=str(paths.ca))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise TLSFileError(
                f"Invalid tls_ca {str(paths.ca)!r} - no PEM certificate could be read from it ({_file_reason(exc)})"
            ) from None
    if paths.cert is None or paths.key is None:
        return
    _readable("tls_cert", paths.cert)
    _readable("tls_key", paths.key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(paths.cert))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TLSFileError(
            f"Invalid tls_cert {str(paths.cert)!r} - no PEM certificate could be read from it ({_file_reason(exc)})"
        ) from None
    try:
        probe.load_cert_chain(str(paths.cert), str(paths.key), password=_refuse_password)
    except TLSFileError:
        raise TLSFileError(
            f"Invalid tls_key {str(paths.key)!r} - the key is encrypted; chexd needs an unencrypted PEM key "
            "(protect it with file permissions, e.g. chmod 600)"
        ) from None
    except OSError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TLSFileError(
                f"Invalid tls_key {str(paths.key)!r} - it is not the private key of tls_cert {str(paths.cert)!r}"
            ) from None
        raise TLSFileError(
            f"Invalid tls_key {str(paths.key)!r} - no PEM private key could be read from it ({_file_reason(exc)})"
        ) from None


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(
    *, cert: Path, key: Path, ca: Path | None = None, client_cert: ClientCertMode = ClientCertMode.NONE
) -> ssl.SSLContext:
    """The SCP's context: BCP 195 profile, this node's certificate, client certificates per ``client_cert``.

    Raises TLSFileError for unusable files, ValueError when ``client_cert`` asks for verification without ``ca``."""
    if client_cert is not ClientCertMode.NONE and ca is None:
        raise ValueError(f"Invalid tls_client_cert {client_cert.value!r} - needs tls_ca to verify client certificates")
    check_files(TLSPaths(cert=cert, key=key, ca=ca))
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(str(cert), str(key), password=_refuse_password)
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    context.verify_mode = {
        ClientCertMode.NONE: ssl.CERT_NONE,
        ClientCertMode.OPTIONAL: ssl.CERT_OPTIONAL,
        ClientCertMode.REQUIRED: ssl.CERT_REQUIRED,
    }[client_cert]
    return context


def client_context(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None, check_hostname: bool = True
) -> ssl.SSLContext:
    """A client context: BCP 195 profile; the server's certificate is always verified (against ``ca``, else the
    system trust store); ``cert``/``key`` are presented when the server asks. ``check_hostname``: the certificate
    must name the host or IP address dialled (subjectAltName). Raises TLSFileError for unusable files."""
    check_files(TLSPaths(cert=cert, key=key, ca=ca))
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key), password=_refuse_password)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _quiet_pynetdicom_handshake_tracebacks()
    return context


class _NoHandshakeTracebacks(logging.Filter):
    """pynetdicom logs a failed client handshake with ``LOGGER.exception``: keep its lines, drop the traceback
    (chexd's own message names the reason; a retried forward must not print a traceback per try)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ssl.SSLError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_pynetdicom_handshake_tracebacks() -> None:
    logger = logging.getLogger("pynetdicom.transport")
    if not any(isinstance(f, _NoHandshakeTracebacks) for f in logger.filters):
        logger.addFilter(_NoHandshakeTracebacks())


def scp_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's context from the settings, or None when ``tls_cert`` is not set (plain TCP)."""
    paths = TLSPaths.from_settings(settings)
    if paths.cert is None or paths.key is None:
        return None
    return server_context(
        cert=paths.cert, key=paths.key, ca=paths.ca, client_cert=ClientCertMode(settings.effective_tls_client_cert)
    )


def forward_context(settings: Settings) -> ssl.SSLContext:
    """The context for ``+tls`` forward destinations (and ``chexd echo/send --tls``): verifies the server against
    ``tls_ca``, presents ``tls_cert``/``tls_key`` when set, checks the host name per ``tls_verify_hostname``."""
    paths = TLSPaths.from_settings(settings)
    return client_context(ca=paths.ca, cert=paths.cert, key=paths.key, check_hostname=settings.tls_verify_hostname)


_EXPLAIN = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate and one is required",
    "UNSUPPORTED_PROTOCOL": "the peer offered only TLS versions below 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer refused TLS 1.2 and 1.3",
    "NO_SHARED_CIPHER": "the peer offered no BCP 195 cipher suite",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer found no common cipher suite or refused the handshake",
    "WRONG_VERSION_NUMBER": "not TLS - plain DICOM sent to the TLS port?",
    "HTTP_REQUEST": "not TLS - an HTTP request",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this node's certificate (its CA is not in the peer's list)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the handshake",
}


def describe_tls_error(exc: BaseException) -> str:
    """OpenSSL's short reason for an error (e.g. ``UNSUPPORTED_PROTOCOL``, ``certificate verify failed``), with
    what it usually means."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        explained = _EXPLAIN.get(str(exc.reason))
        return f"{exc.reason} ({explained})" if explained else str(exc.reason)
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLEOFError | ConnectionError):
        return "connection closed by the peer"
    return type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]


def peer_closed_silently(exc: BaseException) -> bool:
    """True when a handshake failed only because the peer closed or reset the connection without a TLS alert: a
    TCP health check, a port scan, ``chexd forward``'s is-the-daemon-up probe, a client that died. The edge treats
    it like a plain connection closed before its A-ASSOCIATE-RQ (not audited), not like a refused TLS peer."""
    return isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError)


def client_handshake_error(context: ssl.SSLContext, host: str, port: int, *, timeout: float) -> str | None:
    """Try one TLS handshake with ``host:port``; the reason it fails (OpenSSL's, e.g. ``certificate verify failed:
    self-signed certificate``), or None when it succeeds or no TCP connection can be made (then the problem is not
    TLS: the caller says the peer is unreachable). pynetdicom reports only that an association failed; this names
    the cause for an error message. Sends no DICOM data."""
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return None
        except (OSError, ValueError) as exc:
            return describe_tls_error(exc)
