"""DICOM TLS against real peers: dcmtk storescu/echoscu to a ``chexd serve`` that requires client certificates, hostile
TLS peers refused while it keeps serving, and forwarding to a dcmtk ``storescp +tls``.

One daemon for the module (SQLite; TLS is not database behaviour), certificates made here (tests/pki.py). Each hostile
case is followed by a normal C-ECHO and C-STORE over TLS that succeed.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.edge import scu
from daemon.edge.tls import client_context, forward_context
from daemon.settings import Settings
from daemon.store.tables import AuditEvent, Instance
from daemon.work.forward import ClaimedForward, Destination, ForwardLoop, deliver
from tests.conftest import DaemonProcess, free_port, running_daemon
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.forward_study import make_study
from tests.pki import PKI, Issued, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def chexd(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[DaemonProcess]:
    """chexd with TLS on and client certificates required (tls_client_cert auto + tls_ca); no job worker (only the
    edge and the store are under test)."""
    root = tmp_path_factory.mktemp("chexd-tls")
    with running_daemon(
        root / "data",
        f"sqlite:///{root / 'chexd.db'}",
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_ca=str(pki.ca.cert),
        worker_threads="0",
        report_workers="0",
    ) as daemon:
        yield daemon
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
    assert "CHEXD-TEST-0001" not in log and "Test^Chest" not in log  # the images' patient ID and name


def tls_options(cert: Issued | None, pki: PKI) -> list[str]:
    """dcmtk options: TLS with ``cert`` (anonymous TLS without one), the server verified against our CA."""
    if cert is None:
        return ["+tla", "+cf", str(pki.ca.cert)]
    return ["+tls", str(cert.key), str(cert.cert), "+cf", str(pki.ca.cert)]


def dcmtk(
    tool: str, daemon: DaemonProcess, *options: str, files: tuple[Path, ...] = (), host: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-v", "-to", "10", "-ta", "10", "-aec", daemon.ae_title, *options, host, str(daemon.port),
         *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def image(tmp_path: Path, seed: int = 0) -> tuple[Path, str]:
    ds = make_dataset(seed=seed)
    return write_dataset(ds, tmp_path / f"img{seed}.dcm"), str(ds.SOPInstanceUID)


def stored(daemon: DaemonProcess, sop_instance_uid: str) -> bool:
    engine = daemon.engine()
    try:
        with engine.connect() as conn:
            return conn.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)) is not None
    finally:
        engine.dispose()


def audited_drops(daemon: DaemonProcess, address: str, timeout: float = 5) -> list[str]:
    """Details of the connection_dropped audit rows from ``address`` (the edge writes them on a background thread)."""
    deadline = time.monotonic() + timeout
    engine = daemon.engine()
    try:
        while True:
            with engine.connect() as conn:
                details = list(
                    conn.scalars(
                        select(AuditEvent.detail).where(
                            AuditEvent.event == "connection_dropped", AuditEvent.peer_address == address
                        )
                    )
                )
            if details or time.monotonic() > deadline:
                return [d or "" for d in details]
            time.sleep(0.1)
    finally:
        engine.dispose()


def assert_serves_over_tls(daemon: DaemonProcess, pki: PKI, tmp_path: Path, seed: int) -> None:
    """A normal C-ECHO and C-STORE over TLS succeed, and the instance is in the database."""
    echo = dcmtk("echoscu", daemon, *tls_options(pki.client, pki))
    assert echo.returncode == 0, echo.stderr
    path, uid = image(tmp_path, seed)
    store = dcmtk("storescu", daemon, *tls_options(pki.client, pki), files=(path,))
    assert store.returncode == 0 and "Received Store Response (Success)" in store.stdout + store.stderr, store
    assert stored(daemon, uid)


def test_storescu_over_tls_is_acknowledged_and_stored(chexd: DaemonProcess, pki: PKI, tmp_path: Path) -> None:
    path, uid = image(tmp_path, seed=1)
    result = dcmtk("storescu", chexd, *tls_options(pki.client, pki), files=(path,))
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert stored(chexd, uid)
    echo = dcmtk("echoscu", chexd, *tls_options(pki.client, pki))
    assert echo.returncode == 0 and "Received Echo Response (Success)" in echo.stdout + echo.stderr


def python_client(pki: PKI, case: str) -> Callable[[socket.socket], None]:
    """What a hostile or outdated client does on a connected socket; each must fail."""
    if case == "plaintext":

        def plaintext(raw: socket.socket) -> None:
            raw.sendall(bytes.fromhex("010000000044") + b"\x00" * 68)  # an A-ASSOCIATE-RQ, no TLS
            raw.settimeout(5)
            try:
                assert not raw.recv(1)  # closed without an answer
            except ConnectionError:
                pass

        return plaintext

    def connect(raw: socket.socket) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cafile=str(pki.ca.cert))
        cert = {"no certificate": None, "other CA": pki.rogue}.get(case, pki.client)
        if cert is not None:
            context.load_cert_chain(str(cert.cert), str(cert.key))
        if case == "TLS 1.1":
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("ALL:@SECLEVEL=0")
        elif case == "RSA/CBC":
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers("AES128-SHA:AES256-SHA:AES128-SHA256:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw) as tls:
                tls.recv(1)  # TLS 1.3: a refused client certificate arrives as an alert after the handshake

    return connect


# (case, the peer, what the edge's log line must carry). Python peers connect from their own 127.0.0.N (the edge
# logs and rate-limits per address, so each leaves its own line); dcmtk cannot choose its source address, so its
# peers all come from 127.0.0.1 and only the first of them in a minute is logged.
HOSTILE = [
    ("plaintext echoscu to the TLS port", "dcmtk", "WRONG_VERSION_NUMBER"),
    ("storescu without a client certificate", "dcmtk", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("storescu with a certificate from another CA", "dcmtk", "certificate verify failed"),
    ("storescu with the retired AES profile (TLS_RSA_WITH_AES_128_CBC_SHA)", "dcmtk", "NO_SHARED_CIPHER"),
    ("plaintext A-ASSOCIATE-RQ", "plaintext", "WRONG_VERSION_NUMBER"),
    ("TLS client without a certificate", "no certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("TLS client with a certificate from another CA", "other CA", "certificate verify failed"),
    ("client offering TLS 1.0 and 1.1 only", "TLS 1.1", "UNSUPPORTED_PROTOCOL"),
    ("client offering RSA key exchange and CBC only", "RSA/CBC", "NO_SHARED_CIPHER"),
]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("case", "peer", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_tls_peer_is_refused_logged_once_and_chexd_keeps_serving(
    chexd: DaemonProcess, pki: PKI, tmp_path: Path, case: str, peer: str, reason: str
) -> None:
    offset = len(chexd.log())
    path, uid = image(tmp_path, seed=2)
    source = "127.0.0.1"
    if peer == "dcmtk":
        if case.startswith("plaintext"):
            result = dcmtk("echoscu", chexd)
        elif "without" in case:
            result = dcmtk("storescu", chexd, *tls_options(None, pki), files=(path,))
        elif "another CA" in case:
            result = dcmtk("storescu", chexd, *tls_options(pki.rogue, pki), files=(path,))
        else:
            result = dcmtk("storescu", chexd, *tls_options(pki.client, pki), "+pa", files=(path,))
        assert result.returncode != 0, f"{case}: accepted\n{result.stdout}{result.stderr}"
    else:
        source = f"127.0.0.{10 + HOSTILE.index((case, peer, reason))}"
        with socket.create_connection(("127.0.0.1", chexd.port), timeout=10, source_address=(source, 0)) as raw:
            python_client(pki, peer)(raw)
    assert not stored(chexd, uid)

    assert_serves_over_tls(chexd, pki, tmp_path, seed=3)
    lines = [line for line in chexd.log()[offset:].splitlines() if "TLS handshake failed" in line]
    assert len(lines) <= 1, lines  # once, never a traceback (dcmtk's 127.0.0.1 is rate-limited after its first)
    if peer != "dcmtk":
        assert len(lines) == 1, chexd.log()[offset:]
        assert any(reason in detail for detail in audited_drops(chexd, source)), "no audit row"
    for line in lines:
        assert f"peer={source}" in line and reason in line, line
        assert "cr01" not in line and "rogue" not in line  # certificate subjects never reach the log


def test_a_silent_connection_does_not_hold_the_tls_listener(chexd: DaemonProcess, pki: PKI, tmp_path: Path) -> None:
    """pynetdicom 3.0.4 alone handshakes in its accept loop: one idle TCP connection stopped every association."""
    silent = ("127.0.0.21", 0)
    with socket.create_connection(("127.0.0.1", chexd.port), timeout=10, source_address=silent), \
            socket.create_connection(("127.0.0.1", chexd.port), timeout=10, source_address=silent):
        started = time.monotonic()
        assert_serves_over_tls(chexd, pki, tmp_path, seed=4)
        assert time.monotonic() - started < 8


# --- forwarding to a TLS storescp -------------------------------------------------------------------------------


def start_storescp(pki: PKI, cert: Issued, folder: Path) -> tuple[subprocess.Popen[str], int]:
    """dcmtk storescp over TLS presenting ``cert``; it requires and verifies a client certificate from our CA.
    Another port is tried when the chosen one was taken meanwhile (storescp exits at once then)."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            ["storescp", "-v", "-aet", "PACS", "+tls", str(cert.key), str(cert.cert), "+cf", str(pki.ca.cert),
             "-od", str(folder), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    time.sleep(0.1)
                    if proc.poll() is None:  # ours answered, not another process that took the port
                        return proc, port
            time.sleep(0.05)
        stop(proc)
    raise RuntimeError("storescp did not start listening (3 tries)")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def forward_settings(pki: PKI, data_dir: Path, destination: str, **extra: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        forward_destinations=(destination,),
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_ca=str(pki.ca.cert),
        **extra,  # type: ignore[arg-type]
    )


def test_results_are_forwarded_to_a_tls_storescp(pki: PKI, tmp_path: Path) -> None:
    proc, port = start_storescp(pki, pki.pacs, tmp_path / "received")
    try:
        destination = f"PACS@127.0.0.1:{port}+tls"
        data_dir = tmp_path / "data"
        study = make_study(f"sqlite:///{tmp_path / 'fwd.db'}", data_dir, (destination,))
        loop = ForwardLoop(study.sessions, forward_settings(pki, data_dir, destination))
        assert loop.run_once()
        states = study.states()
    finally:
        out = stop(proc)
    assert {state.value for state, _ in states.values()} == {"DONE"}, (states, out)
    received = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "received").iterdir()
    }
    assert received == set(study.results), out  # storescp +tls speaks only TLS: these came over it
    assert SecondaryCaptureImageStorage in study.results.values()


@pytest.mark.parametrize(
    ("case", "verify_hostname", "note"),
    [
        ("the PACS certificate comes from a CA chexd does not trust", True, "unable to get local issuer certificate"),
        ("the PACS certificate names no host and hostnames are checked", True, "IP address mismatch"),
        ("the PACS certificate names no host, tls_verify_hostname = false", False, None),
    ],
)
def test_forwarding_verifies_the_destination(
    pki: PKI, tmp_path: Path, case: str, verify_hostname: bool, note: str | None
) -> None:
    """The rogue certificate is signed by ``other_ca`` and names no host: trusted only when tls_ca is that CA."""
    trusted_ca = pki.ca.cert if "does not trust" in case else pki.other_ca.cert
    proc, port = start_storescp(pki, pki.rogue, tmp_path / "received")
    try:
        destination = f"PACS@127.0.0.1:{port}+tls"
        settings = Settings(
            data_dir=tmp_path,
            forward_destinations=(destination,),
            tls_ca=str(trusted_ca),
            tls_cert=str(pki.server.cert),
            tls_key=str(pki.server.key),
            tls_client_cert="none",
            tls_verify_hostname=verify_hostname,
        )
        context = forward_context(settings)
        ds = make_dataset(sop_class=SecondaryCaptureImageStorage, seed=7)
        path = write_dataset(ds, tmp_path / "sc.dcm")
        item = ClaimedForward(forward_id=1, attempts=1, destination=destination, path=path, sop_instance_uid="")
        outcome = deliver(Destination.parse(destination), [item], calling_ae="CHEXD", timeout=10, tls=context)[1]
    finally:
        stop(proc)
    if note is None:
        assert outcome.delivered, outcome
    else:
        assert not outcome.delivered and not outcome.permanent
        assert f"no association with {destination}: TLS handshake failed: certificate verify failed: {note}" in (
            outcome.note or ""
        ), outcome


def test_chexd_echo_and_send_speak_tls(chexd: DaemonProcess, pki: PKI, tmp_path: Path) -> None:
    """``chexd echo/send --tls`` use the forwarding context: tls_ca verifies the peer, tls_cert is presented."""
    from daemon.cli import app

    env = {
        "CHEXD_DATA_DIR": str(tmp_path / "client"),
        "CHEXD_TLS_CERT": str(pki.client.cert),
        "CHEXD_TLS_KEY": str(pki.client.key),
        "CHEXD_TLS_CA": str(pki.ca.cert),
        "CHEXD_TLS_CLIENT_CERT": "none",  # this client's own settings: it runs no TLS server
    }
    runner = CliRunner()
    port = str(chexd.port)
    echoed = runner.invoke(app, ["echo", "127.0.0.1", port, "--aec", "CHEXD", "--tls"], env=env)
    assert echoed.exit_code == 0 and "success (0x0000)" in echoed.stdout, echoed.output
    path, uid = image(tmp_path, seed=5)
    sent = runner.invoke(app, ["send", str(path), "--port", port, "--aec", "CHEXD", "--tls", "--json"], env=env)
    assert sent.exit_code == 0, sent.output
    assert stored(chexd, uid)
    plain = runner.invoke(app, ["echo", "127.0.0.1", port, "--aec", "CHEXD"], env=env)
    assert plain.exit_code == 1
    distrust = runner.invoke(
        app, ["echo", "127.0.0.1", port, "--aec", "CHEXD", "--tls"], env={**env, "CHEXD_TLS_CA": str(pki.other_ca.cert)}
    )
    assert distrust.exit_code == 1
    assert "TLS handshake failed: certificate verify failed: self-signed certificate in certificate chain" in (
        distrust.output  # chexd sends its chain up to its CA, which this client does not trust
    )


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_both_serve(chexd: DaemonProcess, pki: PKI, version: ssl.TLSVersion) -> None:
    context = client_context(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key)
    context.minimum_version = context.maximum_version = version
    assert scu.echo("127.0.0.1", chexd.port, called_ae=chexd.ae_title, tls=context) == 0


def test_an_ae_title_refusal_reaches_a_tls_peer_as_a_reject(chexd: DaemonProcess, pki: PKI) -> None:
    """The edge's A-ASSOCIATE-RJ travels inside the TLS session, so the modality reads the reason."""
    result = subprocess.run(
        ["echoscu", "-v", "-to", "10", "-aec", "NOT-CHEXD", *tls_options(pki.client, pki), "127.0.0.1",
         str(chexd.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr, result


def test_a_tcp_probe_of_the_tls_port_is_not_logged_as_a_tls_failure(
    chexd: DaemonProcess, pki: PKI, tmp_path: Path
) -> None:
    """A health check or ``chexd forward``'s is-the-daemon-up probe connects and closes: like a plain connection
    closed before its request, it is neither logged nor audited (daemon.edge.tls.peer_closed_silently)."""
    offset = len(chexd.log())
    probe = ("127.0.0.41", 0)
    socket.create_connection(("127.0.0.1", chexd.port), timeout=5, source_address=probe).close()
    assert_serves_over_tls(chexd, pki, tmp_path, seed=6)
    time.sleep(0.3)
    assert "peer=127.0.0.41" not in chexd.log()[offset:]
    assert audited_drops(chexd, "127.0.0.41", timeout=0.5) == []
