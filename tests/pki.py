"""A throw-away PKI for the DICOM TLS tests, made with ``cryptography``: two CAs and leaf certificates as PEM files.

RSA 2048 keys (OpenSSL security level 2 refuses smaller ones); certificates valid from a day ago for 30 days.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A leaf certificate and its key as PEM files (``key`` unencrypted)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate file and what it needs to sign."""

    cert: Path
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chexd tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: rsa.RSAPrivateKey, path: Path, password: bytes | None = None) -> Path:
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)
    return path


def make_ca(folder: Path, name: str) -> Authority:
    """A self-signed CA certificate ``<folder>/<name>.pem``."""
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(cert=path, certificate=cert, private_key=key)


def issue(
    ca: Authority,
    folder: Path,
    name: str,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    key_password: bytes | None = None,
) -> Issued:
    """A leaf certificate for ``name`` signed by ``ca``, usable as TLS server and client; ``hosts`` go in the
    subjectAltName (IP addresses as iPAddress entries)."""
    key = _key()
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca.private_key, hashes.SHA256())
    cert_path = folder / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert=cert_path, key=_write_key(key, folder / f"{name}.key", key_password))


@dataclass(frozen=True)
class PKI:
    """``ca`` signs ``server`` (chexd), ``client`` (a modality) and ``pacs`` (a forward destination); ``rogue`` is
    a client certificate from ``other_ca``, which chexd does not trust."""

    ca: Authority
    other_ca: Authority
    server: Issued
    client: Issued
    pacs: Issued
    rogue: Issued


def make_pki(folder: Path) -> PKI:
    """Write the whole PKI under ``folder`` (about 0.5 s: six RSA 2048 keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(folder, "ca")
    other = make_ca(folder, "other-ca")
    return PKI(
        ca=ca,
        other_ca=other,
        server=issue(ca, folder, "chexd"),
        client=issue(ca, folder, "cr01", hosts=()),
        pacs=issue(ca, folder, "pacs"),
        rogue=issue(other, folder, "rogue", hosts=()),
    )
