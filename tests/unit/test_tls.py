"""daemon.edge.tls and the tls_* settings: the BCP 195 contexts, file validation at load, and the server handshake under
real handshakes on loopback with Python's ssl as the peer."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.edge.tls import (
    ClientCertMode,
    client_context,
    client_handshake_error,
    describe_tls_error,
    forward_context,
    peer_closed_silently,
    scp_context,
    server_context,
)
from daemon.settings import Settings, SettingsError, load_settings
from daemon.work.forward import Destination
from tests.conftest import REPO
from tests.pki import PKI, Issued, issue, make_pki

# --- certificates (one PKI for the module: six RSA keys) -------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: PKI, **extra: str) -> dict[str, str]:
    return {
        "CHEXD_TLS_CERT": str(pki.server.cert),
        "CHEXD_TLS_KEY": str(pki.server.key),
        "CHEXD_TLS_CA": str(pki.ca.cert),
        **extra,
    }


# --- the contexts ---------------------------------------------------------------------------------------------


def assert_bcp195(context: ssl.SSLContext) -> None:
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    ciphers = context.get_ciphers()
    assert ciphers, "no cipher suite enabled"
    for cipher in ciphers:
        name, protocol = cipher["name"], cipher["protocol"]
        assert protocol in ("TLSv1.2", "TLSv1.3"), cipher
        assert cipher["aead"], f"{name}: not an AEAD cipher (CBC, RC4, NULL ...)"
        assert "CBC" not in cipher["description"] and "SHA1" not in cipher["description"], cipher
        for weak in ("RC4", "3DES", "DES-CBC", "NULL", "EXP", "MD5", "PSK", "SRP", "ADH", "AECDH"):
            assert weak not in name, cipher
        if protocol == "TLSv1.2":
            assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), f"{name}: no forward secrecy (RSA key exchange?)"
    names = {c["name"] for c in ciphers}
    assert "ECDHE-RSA-AES128-GCM-SHA256" in names and "TLS_AES_128_GCM_SHA256" in names  # BCP 195's must-haves


@pytest.mark.parametrize(
    ("mode", "verify"),
    [
        (ClientCertMode.NONE, ssl.CERT_NONE),
        (ClientCertMode.OPTIONAL, ssl.CERT_OPTIONAL),
        (ClientCertMode.REQUIRED, ssl.CERT_REQUIRED),
    ],
)
def test_server_context_is_bcp195_and_verifies_clients_per_mode(
    pki: PKI, mode: ClientCertMode, verify: ssl.VerifyMode
) -> None:
    context = server_context(cert=pki.server.cert, key=pki.server.key, ca=pki.ca.cert, client_cert=mode)
    assert_bcp195(context)
    assert context.verify_mode == verify
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_server_context_refuses_client_verification_without_a_ca(pki: PKI) -> None:
    with pytest.raises(ValueError, match="tls_client_cert 'required' - needs tls_ca"):
        server_context(cert=pki.server.cert, key=pki.server.key, client_cert=ClientCertMode.REQUIRED)


@pytest.mark.parametrize("check_hostname", [True, False])
def test_client_context_is_bcp195_and_always_verifies_the_server(pki: PKI, check_hostname: bool) -> None:
    context = client_context(
        ca=pki.ca.cert, cert=pki.server.cert, key=pki.server.key, check_hostname=check_hostname
    )
    assert_bcp195(context)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is check_hostname


def test_a_failed_client_handshake_is_logged_by_pynetdicom_without_a_traceback(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    client_context(ca=pki.ca.cert)  # installs the filter on pynetdicom's transport logger
    caplog.set_level(logging.ERROR, logger="pynetdicom.transport")
    try:
        raise ssl.SSLCertVerificationError("certificate verify failed")
    except ssl.SSLError as exc:
        logging.getLogger("pynetdicom.transport").exception(exc)  # what pynetdicom 3.0.4 does (transport.py)
    [record] = [r for r in caplog.records if r.name == "pynetdicom.transport"]
    assert record.exc_info is None and "Traceback" not in caplog.text
    assert "certificate verify failed" in record.getMessage()


def test_contexts_follow_the_settings(pki: PKI, tmp_path: Path) -> None:
    assert scp_context(Settings(data_dir=tmp_path)) is None  # no tls_cert: plain TCP
    settings = load_settings(environ={"CHEXD_DATA_DIR": str(tmp_path), **tls_env(pki)})
    assert settings.tls_client_cert == "auto" and settings.effective_tls_client_cert == "required"
    assert scp_context(settings).verify_mode == ssl.CERT_REQUIRED  # type: ignore[union-attr]
    relaxed = load_settings(
        environ={"CHEXD_DATA_DIR": str(tmp_path), **tls_env(pki, CHEXD_TLS_CLIENT_CERT="optional")}
    )
    assert scp_context(relaxed).verify_mode == ssl.CERT_OPTIONAL  # type: ignore[union-attr]
    no_ca = Settings(data_dir=tmp_path, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    assert no_ca.effective_tls_client_cert == "none"
    assert scp_context(no_ca).verify_mode == ssl.CERT_NONE  # type: ignore[union-attr]
    by_ip = load_settings(
        environ={"CHEXD_DATA_DIR": str(tmp_path), **tls_env(pki, CHEXD_TLS_VERIFY_HOSTNAME="false")}
    )
    assert forward_context(by_ip).check_hostname is False
    assert forward_context(settings).check_hostname is True


# --- validation at load -------------------------------------------------------------------------------------------


def settings_error(pki: PKI, tmp_path: Path, **env: str) -> str:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"CHEXD_DATA_DIR": str(tmp_path), **env})
    return str(raised.value)


def test_cert_without_key_and_key_without_cert_are_refused(pki: PKI, tmp_path: Path) -> None:
    message = settings_error(pki, tmp_path, CHEXD_TLS_CERT=str(pki.server.cert))
    assert f"tls_cert '{pki.server.cert}' without tls_key - set both" in message
    message = settings_error(pki, tmp_path, CHEXD_TLS_KEY=str(pki.server.key))
    assert f"tls_key '{pki.server.key}' without tls_cert" in message


@pytest.mark.parametrize("setting", ["tls_cert", "tls_key", "tls_ca"])
def test_missing_file_names_the_setting_and_path(pki: PKI, tmp_path: Path, setting: str) -> None:
    env = tls_env(pki)
    env[f"CHEXD_{setting.upper()}"] = str(tmp_path / "nope.pem")
    message = settings_error(pki, tmp_path, **env)
    assert f"Invalid {setting} '{tmp_path / 'nope.pem'}' - file not found" in message


@pytest.mark.parametrize("setting", ["tls_cert", "tls_key", "tls_ca"])
def test_a_file_that_is_not_pem_is_refused(pki: PKI, tmp_path: Path, setting: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    env = tls_env(pki)
    env[f"CHEXD_{setting.upper()}"] = str(garbage)
    message = settings_error(pki, tmp_path, **env)
    assert f"Invalid {setting} '{garbage}' - no PEM" in message


def test_key_of_another_certificate_is_refused(pki: PKI, tmp_path: Path) -> None:
    message = settings_error(pki, tmp_path, **tls_env(pki, CHEXD_TLS_KEY=str(pki.client.key)))
    assert f"Invalid tls_key '{pki.client.key}' - it is not the private key of tls_cert '{pki.server.cert}'" in message


def test_encrypted_key_is_refused_without_prompting(pki: PKI, tmp_path: Path) -> None:
    locked = issue(pki.ca, tmp_path, "locked", key_password=b"secret")
    message = settings_error(
        pki, tmp_path, **tls_env(pki, CHEXD_TLS_CERT=str(locked.cert), CHEXD_TLS_KEY=str(locked.key))
    )
    assert "the key is encrypted; chexd needs an unencrypted PEM key" in message


def test_client_cert_mode_is_validated(pki: PKI, tmp_path: Path) -> None:
    assert "expected one of auto, none, optional, required" in settings_error(
        pki, tmp_path, **tls_env(pki, CHEXD_TLS_CLIENT_CERT="always")
    )
    assert "tls_client_cert 'required' without tls_ca" in settings_error(
        pki, tmp_path, CHEXD_TLS_CERT=str(pki.server.cert), CHEXD_TLS_KEY=str(pki.server.key),
        CHEXD_TLS_CLIENT_CERT="required",
    )
    assert "tls_client_cert 'optional' without tls_cert/tls_key" in settings_error(
        pki, tmp_path, CHEXD_TLS_CA=str(pki.ca.cert), CHEXD_TLS_CLIENT_CERT="optional"
    )
    ca_only = load_settings(environ={"CHEXD_DATA_DIR": str(tmp_path), "CHEXD_TLS_CA": str(pki.ca.cert)})
    assert ca_only.effective_tls_client_cert == "none" and scp_context(ca_only) is None  # CA only: for forwarding


def test_tls_destinations_parse_and_validate(tmp_path: Path) -> None:
    plain, secure = Destination.parse("PACS@10.0.0.5:104"), Destination.parse("PACS@pacs.example:2762+tls")
    assert (plain.tls, secure.tls, secure.host, secure.port) == (False, True, "pacs.example", 2762)
    assert str(secure) == "PACS@pacs.example:2762+tls" and str(plain) == "PACS@10.0.0.5:104"
    assert str(Destination.parse("P@[::1]:2762+tls")) == "P@[::1]:2762+tls"
    assert Settings(data_dir=tmp_path, forward_destinations=("PACS@h:2762+tls",)).forward_destinations
    for bad in ("PACS@h:2762+ssl", "PACS@h:2762 +tls", "PACS@h+tls"):
        with pytest.raises(SettingsError, match="expected 'AE@host:port' or 'AE@host:port\\+tls'"):
            Settings(data_dir=tmp_path, forward_destinations=(bad,))
        with pytest.raises(ValueError, match="Invalid destination"):
            Destination.parse(bad)


def test_chexd_config_fails_with_a_message_not_a_traceback(pki: PKI, tmp_path: Path) -> None:
    env = {"CHEXD_DATA_DIR": str(tmp_path), **tls_env(pki, CHEXD_TLS_KEY=str(pki.client.key)), "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "config"], env=env, capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode != 0
    assert "is not the private key of tls_cert" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


# --- handshakes: what the SCP context admits and refuses ----------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def handshake_in_thread(context: ssl.SSLContext, listener: socket.socket) -> tuple[threading.Thread, dict[str, object]]:
    """Accept one connection and complete the server handshake in a thread (as daemon.edge.server does, blocking here);
    the outcome lands in the dict: ``version`` and ``peer_cert``, or ``error`` (describe_tls_error's text)."""
    result: dict[str, object] = {}

    def run() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                result["version"] = tls.version()
                result["peer_cert"] = bool(tls.getpeercert())
                tls.sendall(b"ok")
        except OSError as exc:
            result["error"] = describe_tls_error(exc)
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def peer_context(pki: PKI, *, cert: Issued | None = None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
        context.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer what chexd must refuse
    return context


def test_optional_mode_admits_a_client_without_a_certificate_and_one_with(pki: PKI, listener: socket.socket) -> None:
    context = server_context(
        cert=pki.server.cert, key=pki.server.key, ca=pki.ca.cert, client_cert=ClientCertMode.OPTIONAL
    )
    for cert, has_cert in ((None, False), (pki.client, True)):
        thread, result = handshake_in_thread(context, listener)
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with peer_context(pki, cert=cert).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"ok"
        thread.join(5)
        assert result.get("error") is None and result["peer_cert"] is has_cert
        assert result["version"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no client certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE (the client sent no certificate"),
        ("certificate from another CA", "certificate verify failed: unable to get local issuer certificate"),
        ("TLS 1.1", "UNSUPPORTED_PROTOCOL (the peer offered only TLS versions below 1.2)"),
        ("RSA key exchange, CBC", "NO_SHARED_CIPHER (the peer offered no BCP 195 cipher suite)"),
        ("plaintext DICOM", "WRONG_VERSION_NUMBER (not TLS - plain DICOM sent to the TLS port?)"),
    ],
)
def test_required_mode_refuses_and_says_why(pki: PKI, listener: socket.socket, case: str, reason: str) -> None:
    context = server_context(
        cert=pki.server.cert, key=pki.server.key, ca=pki.ca.cert, client_cert=ClientCertMode.REQUIRED
    )
    thread, result = handshake_in_thread(context, listener)
    with socket.create_connection(listener.getsockname(), timeout=5) as raw:
        if case == "plaintext DICOM":
            raw.sendall(bytes.fromhex("010000000044") + b"\x00" * 68)  # the start of an A-ASSOCIATE-RQ
        else:
            client = {
                "no client certificate": lambda: peer_context(pki),
                "certificate from another CA": lambda: peer_context(pki, cert=pki.rogue),
                "TLS 1.1": lambda: peer_context(pki, cert=pki.client, maximum=ssl.TLSVersion.TLSv1_1),
                "RSA key exchange, CBC": lambda: peer_context(pki, cert=pki.client, maximum=ssl.TLSVersion.TLSv1_2),
            }[case]()
            if case == "RSA key exchange, CBC":
                client.set_ciphers("AES128-SHA:AES256-SHA256:@SECLEVEL=0")
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.recv(2)  # TLS 1.3: a refused client certificate arrives as an alert after the handshake
        thread.join(5)
    assert not thread.is_alive()
    assert result.get("error") is not None and reason in str(result["error"]), (case, result)
    assert "cr01" not in str(result["error"]) and "rogue" not in str(result["error"])  # no certificate subjects


def test_client_handshake_error_names_the_cause(pki: PKI, listener: socket.socket) -> None:
    """What chexd's clients (echo/send, forwarding) say when a TLS peer refuses them or cannot be trusted."""
    stranger = server_context(cert=pki.rogue.cert, key=pki.rogue.key)  # a server whose CA chexd does not trust
    thread, _ = handshake_in_thread(stranger, listener)
    host, port = listener.getsockname()
    reason = client_handshake_error(client_context(ca=pki.ca.cert), host, port, timeout=5)
    thread.join(5)
    assert reason == "certificate verify failed: unable to get local issuer certificate"
    thread, _ = handshake_in_thread(stranger, listener)
    reason = client_handshake_error(client_context(ca=pki.other_ca.cert), host, port, timeout=5)
    thread.join(5)
    assert reason is not None and "IP address mismatch" in reason  # the rogue certificate names no host
    thread, _ = handshake_in_thread(stranger, listener)
    by_ip = client_context(ca=pki.other_ca.cert, check_hostname=False)  # tls_verify_hostname = false
    assert client_handshake_error(by_ip, host, port, timeout=5) is None
    thread.join(5)
    listener.close()  # nothing listens: not a TLS problem, the caller says the peer is unreachable
    assert client_handshake_error(by_ip, host, port, timeout=5) is None


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_peer_that_connects_and_goes_is_told_apart_from_a_refused_one(
    pki: PKI, listener: socket.socket, reset: bool
) -> None:
    """A TCP probe (health check, port scan) is not a TLS failure worth an audit row; a refused client is."""
    context = server_context(
        cert=pki.server.cert, key=pki.server.key, ca=pki.ca.cert, client_cert=ClientCertMode.REQUIRED
    )
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            context.wrap_socket(conn, server_side=True)
        except OSError as exc:
            errors.append(exc)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    probe = socket.create_connection(listener.getsockname())
    if reset:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with an RST
    probe.close()
    thread.join(5)
    [error] = errors
    assert peer_closed_silently(error)
    assert describe_tls_error(error) in (
        "UNEXPECTED_EOF_WHILE_READING (the peer closed the connection during the handshake)",
        "connection closed by the peer",
    )
    thread, result = handshake_in_thread(context, listener)  # a client without a certificate: refused, not "gone"
    with socket.create_connection(listener.getsockname(), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with peer_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(2)
    thread.join(5)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(result["error"])
    assert not peer_closed_silently(ssl.SSLError(1, "[SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE]"))
