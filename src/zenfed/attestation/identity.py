"""Attestation keys for the emulated TEE: a project root certifies each participant's key.

Provisioning creates one Ed25519 root per project and issues every participant
an Ed25519 attestation key with an X.509 certificate signed by that root. A
verifier trusts only its own project's root, so a key from another project is
refused even when the participant name matches.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from zenfed import signing
from zenfed.atomic import atomic_write_bytes
from zenfed.attestation.records import AttestationError, EvidenceRejected

KEY_FILE = "attestation_key.pem"
CERT_FILE = "attestation_cert.pem"
ROOT_CERT_FILE = "attestation_root.pem"
_ROOT_OU = "zenfed attestation root"
_LEAF_OU = "zenfed attestation"


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
        ]
    )


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(data: bytes, source: str) -> Ed25519PrivateKey:
    try:
        return signing.private_key_from_pem(data, source=source, kinds=(Ed25519PrivateKey,))
    except signing.SigningKeyError as err:
        raise AttestationError(f"{err}; re-provision the kit") from None


@dataclass(frozen=True)
class AttestationIdentity:
    """A participant's attestation key and its certificate."""

    participant: str
    key: Ed25519PrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        """Return the certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def save(self, *, startup_dir: Path) -> None:
        """Write the key (0600) and certificate into a kit's ``startup/``."""
        atomic_write_bytes(Path(startup_dir) / KEY_FILE, _private_pem(self.key), mode=0o600)
        (Path(startup_dir) / CERT_FILE).write_bytes(self.cert_pem())


@dataclass(frozen=True)
class AttestationRoot:
    """A project's attestation root: certifies participants' attestation keys."""

    key: Ed25519PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, *, project: str, valid_days: int = 3650) -> AttestationRoot:
        """Create a new self-signed root for ``project``."""
        key = Ed25519PrivateKey.generate()
        name = _name(project, _ROOT_OU)
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, None)
        )
        return cls(key=key, cert=cert)

    def cert_pem(self) -> bytes:
        """Return the root certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *, participant: str, valid_days: int = 825) -> AttestationIdentity:
        """Issue ``participant`` a fresh attestation key certified by this root."""
        key = Ed25519PrivateKey.generate()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(participant, _LEAF_OU))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, None)
        )
        return AttestationIdentity(participant=participant, key=key, cert=cert)

    def save(self, *, key_path: Path, cert_path: Path) -> None:
        """Write the root key (0600) and certificate, e.g. into the provisioning state."""
        atomic_write_bytes(Path(key_path), _private_pem(self.key), mode=0o600)
        Path(cert_path).write_bytes(self.cert_pem())

    @classmethod
    def load(cls, *, key_path: Path, cert_path: Path) -> AttestationRoot:
        """Load a root saved with ``save``."""
        key = _load_key(Path(key_path).read_bytes(), str(key_path))
        cert = load_cert(Path(cert_path).read_bytes(), source=str(cert_path))
        return cls(key=key, cert=cert)


def load_cert(data: bytes, *, source: str) -> x509.Certificate:
    """Parse a PEM certificate, raising AttestationError naming ``source`` if it is not one."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise AttestationError(f"{source} is not a PEM certificate: {err}") from None


def load_identity(*, startup_dir: Path, participant: str) -> AttestationIdentity:
    """Load a participant's attestation key and certificate from its kit's ``startup/``.

    Raises:
        AttestationError: If a file is missing or unreadable; the message says which.

    """
    key_path = Path(startup_dir) / KEY_FILE
    cert_path = Path(startup_dir) / CERT_FILE
    for path in (key_path, cert_path):
        if not path.is_file():
            raise AttestationError(
                f"{path} is missing; this kit was not provisioned with an emulated-TEE key "
                "(add AttestationBuilder to the project's builders and re-provision)"
            )
    key = _load_key(key_path.read_bytes(), str(key_path))
    cert = load_cert(cert_path.read_bytes(), source=str(cert_path))
    return AttestationIdentity(participant=participant, key=key, cert=cert)


def verify_participant_cert(
    *, cert_pem: str, root: x509.Certificate, participant: str, now: float
) -> Ed25519PublicKey:
    """Check that ``cert_pem`` is ``participant``'s key, certified by ``root``, valid at ``now``.

    Returns:
        The certified public key.

    Raises:
        EvidenceRejected: With the reason, if any check fails.

    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        raise EvidenceRejected("the attestation certificate is not a PEM certificate") from None
    root_key = root.public_key()
    if not isinstance(root_key, Ed25519PublicKey):
        raise EvidenceRejected("this project's attestation root is not an Ed25519 key")
    try:
        if cert.issuer != root.subject:
            raise InvalidSignature
        root_key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        raise EvidenceRejected(
            f"the attestation key of {participant!r} is not certified by this project's "
            "attestation root (a key from another project, or a forged certificate)"
        ) from None
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise EvidenceRejected(
            f"the attestation certificate of {participant!r} is not valid now "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}); "
            "re-provision the participant"
        )
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != participant:
        got = names[0].value if names else "(none)"
        raise EvidenceRejected(
            f"the attestation certificate is issued to {got!r}, not to {participant!r}"
        )
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise EvidenceRejected("the attestation certificate does not hold an Ed25519 key")
    return key
