"""Certificates made on the spot: a CA, a server certificate for 127.0.0.1, a client
certificate."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


def _certificate(
    subject: str, key: Any, issuer: x509.Name | None, issuer_key: Any, *, ca: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA, a server certificate for 127.0.0.1, and a client certificate."""

    def __init__(self, directory: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("HealthAgent test CA", ca_key, None, ca_key, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = ca.public_bytes(serialization.Encoding.PEM)
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.ca_file = directory / "ca.pem"
        self.server_cert.write_bytes(
            _certificate("127.0.0.1", server_key, ca.subject, ca_key).public_bytes(
                serialization.Encoding.PEM
            )
        )
        self.server_key.write_bytes(_pem(server_key))
        self.ca_file.write_bytes(self.ca)
        self.client_cert = _certificate(
            "billing-service", client_key, ca.subject, ca_key
        ).public_bytes(serialization.Encoding.PEM)
        self.client_key = _pem(client_key)
