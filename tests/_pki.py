"""A small project PKI for tests: a root CA and site kits whose keys it certifies, as provisioning writes them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

NOW = dt.datetime.now(dt.UTC)


def _name(common: str, role: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if role is not None:  # FLARE's provisioning writes an admin's role here
        attributes.append(x509.NameAttribute(NameOID.UNSTRUCTURED_NAME, role))
    return x509.Name(attributes)


def make_ca(common: str = "project-ca") -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_kit(folder: Path, site: str, ca: tuple[rsa.RSAPrivateKey, x509.Certificate], *, stem: str = "client",
             server: str = "server", role: str | None = None) -> Path:
    """A kit's startup/ as provisioning writes it: STEM.key, STEM.crt (issued by the CA), rootCA.pem.

    A site kit's ``fed_client.json`` names the server (``server``) but no address; ``role`` goes
    into the certificate's subject, as FLARE's provisioning writes an admin's role.
    """
    ca_key, ca_cert = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(_name(site, role)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
            .sign(ca_key, hashes.SHA256()))
    startup = folder / site / "startup"
    startup.mkdir(parents=True)
    (startup / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    (startup / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (startup / "rootCA.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    if stem == "client":  # a site kit, as FLARE lays it out (the audit log reads its role from it)
        (startup / "fed_client.json").write_text(json.dumps({"servers": [{"identity": server}]}) + "\n")
    return startup
